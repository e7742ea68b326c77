"""The ``msfp`` command line."""

from __future__ import annotations

import click

from msfp import __version__


@click.group(context_settings=dict(help_option_names=["-h", "--help"], show_default=True))
@click.version_option(__version__, prog_name="msfp")
def main() -> None:
    """msfp: 4-bit floating-point (W4A4) quantization of diffusion models."""


if __name__ == "__main__":
    main()
