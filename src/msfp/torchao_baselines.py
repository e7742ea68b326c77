"""torchao's MXFP4 and NVFP4 W4A4 recipes, emulated on any denoiser: the "what a user would pick instead" rows.

torchao's inference configs (``MXDynamicActivationMXWeightConfig``, ``NVFP4DynamicActivationNVFP4WeightConfig``)
handle ``nn.Linear`` only and their real kernels need Blackwell GPUs, while diffusion UNets are mostly
convolutions. torchao's *emulated* GEMM dequantizes both operands and multiplies in high precision, so this module
does the same for every selected ``Conv2d``/``Linear``: weights and inputs go through torchao's own quantizers
(``MXTensor.to_mx`` / ``NVFP4Tensor.to_nvfp4``) and back, with the recipe's block size and scale rule, blocks running
along the input channels (the reduction dimension, as in an NHWC implicit GEMM). Activation scales are dynamic (per
call), as in torchao's recipes, so there is no calibration. One departure: NVFP4's per-tensor scale of an activation is
taken per sample, where torchao's dynamic recipe takes it over the whole batch, so that an image does not depend on the
other images in its batch.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.nn import functional as F

RECIPES = {
    "mxfp4": "MXFP4 (E2M1 values, one E8M0 scale per 32 input channels)",
    "nvfp4": "NVFP4 (E2M1 values, one E4M3 scale per 16 input channels and one FP32 scale per tensor)",
}


def unavailable_reason(recipe: str = "nvfp4") -> str | None:
    """Why torchao's ``recipe`` row cannot run here, or None when it can."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao)"
    try:
        import torchao
        from torchao.prototype.mx_formats.mx_tensor import MXTensor  # noqa: F401
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
    except Exception as e:  # a torchao built for another torch fails in many ways; all mean "cannot run"
        return f"torchao is installed but its MX/NVFP4 formats do not import ({type(e).__name__}: {e})"
    if not hasattr(torch, "float4_e2m1fn_x2"):
        return f"torch {torch.__version__} has no float4_e2m1fn_x2 dtype, which torchao's FP4 formats need"
    if recipe != "nvfp4":
        return None
    try:  # per-sample NVFP4 activation scales go through per-expert (3-D) scales, new in torchao (pytorch/ao#4315)
        NVFP4Tensor.to_nvfp4(torch.ones(2, 1, 16), per_tensor_scale=torch.ones(2, 1, 1)).dequantize(torch.float32)
    except Exception as e:
        return (f"torchao {torchao.__version__}'s NVFP4Tensor takes no per-expert scales, which the per-sample NVFP4 "
                f"activation scales need (pip install -U torchao) ({type(e).__name__}: {e})")
    return None


def _fake_quantizer(recipe: str):
    """``fq(x)``: x, a (groups, rows, channels) tensor, quantized and dequantized by torchao along its last dimension,
    each group with its own per-tensor scale where the recipe has one; and the block size."""
    if recipe == "mxfp4":
        from torchao.prototype.mx_formats.inference_workflow import MXDynamicActivationMXWeightConfig
        from torchao.prototype.mx_formats.mx_tensor import MXTensor

        config = MXDynamicActivationMXWeightConfig(activation_dtype=torch.float4_e2m1fn_x2,
                                                   weight_dtype=torch.float4_e2m1fn_x2)

        def mxfp4(x):  # block scales only, so the groups can go through together
            return MXTensor.to_mx(x.flatten(0, 1), config.weight_dtype, block_size=config.block_size,
                                  scaling_mode=config.scaling_mode).dequantize(x.dtype).view(x.shape)

        return mxfp4, config.block_size
    if recipe == "nvfp4":
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

        def nvfp4(x):
            # The recipe's default: per-tensor scale from the tensor's own amax (use_dynamic_per_tensor_scale=True),
            # here per group, through NVFP4Tensor's per-expert (3-D) outer scales.
            amax = x.abs().amax((1, 2), keepdim=True)
            # A scale of 0 gives 0/0; with any other, an all-zero group (a zero-initialised conv) is exactly 0 in FP4.
            amax = torch.where(amax == 0, 1.0, amax)
            return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(amax)).dequantize(x.dtype)

        return nvfp4, 16
    raise ValueError(f"unknown torchao recipe {recipe!r}; choose from {', '.join(RECIPES)}")


def _along_channels(fq, x: torch.Tensor, channel_dim: int, per_sample: bool = False) -> torch.Tensor:
    """``fq`` with blocks along ``channel_dim``, on the whole tensor (a weight) or, ``per_sample``, on each sample along
    dim 0 on its own (an activation); torchao's quantizers take float32 or bfloat16 (other dtypes, e.g. float16, go
    through float32)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return _along_channels(fq, x.float(), channel_dim, per_sample).to(x.dtype)
    moved = x.movedim(channel_dim, -1)
    groups = moved.shape[0] if per_sample else 1
    return fq(moved.reshape(groups, -1, moved.shape[-1]).contiguous()).view(moved.shape).movedim(-1, channel_dim)


class TorchaoFakeQuant(nn.Module):
    """A ``Conv2d``/``Linear`` whose weight (once) and input (every call) pass through a torchao W4A4 recipe."""

    def __init__(self, module: nn.Module, recipe: str):
        super().__init__()
        fq, block = _fake_quantizer(recipe)
        in_channels = module.weight.shape[1]
        if in_channels % block:
            raise ValueError(f"{recipe} needs input channels divisible by {block}, got {in_channels}")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise ValueError("only ungrouped, zero-padded convolutions are supported")
        self.module, self.fq = module, fq
        with torch.no_grad():
            weight = _along_channels(fq, module.weight.detach().float(), 1).to(module.weight.dtype)
        self.register_buffer("qweight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            # An unbatched input (nn.Linear's 1-D, nn.Conv2d's (C, H, W)) is one sample.
            return F.linear(_along_channels(self.fq, x, -1, per_sample=x.dim() > 1), self.qweight, m.bias)
        batched = x.dim() == 4
        return F.conv2d(_along_channels(self.fq, x, 1 if batched else 0, per_sample=batched), self.qweight, m.bias,
                        m.stride, m.padding, m.dilation)


def quantize_torchao(model: nn.Module, recipe: str, layer_names) -> tuple[nn.Module, dict[str, str]]:
    """Replace the named ``Conv2d``/``Linear`` layers by :class:`TorchaoFakeQuant` in place.

    Returns the model and ``{name: reason}`` for the named layers the recipe cannot take (they stay full precision).
    """
    reason = unavailable_reason(recipe)
    if reason is not None:
        raise ImportError(reason)
    skipped = {}
    for name in layer_names:
        module = model.get_submodule(name)
        try:
            wrapped = TorchaoFakeQuant(module, recipe)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    return model, skipped
