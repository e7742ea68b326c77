"""msfp: 4-bit floating-point quantization of diffusion models."""

__version__ = "0.1.0"

from msfp.formats import Format, fake_quant, get_format  # noqa: E402
from msfp.quantizers import ActivationQuantizer, WeightQuantizer, search_quant_params  # noqa: E402
from msfp.models import load_model  # noqa: E402
from msfp.config import QuantConfig  # noqa: E402
from msfp.surgery import quantize  # noqa: E402
from msfp.calibration import calibrate  # noqa: E402
from msfp.checkpoint import load_quantized, save_quantized  # noqa: E402
