"""msfp: 4-bit floating-point quantization of diffusion models."""

__version__ = "0.1.0"
