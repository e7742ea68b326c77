"""Fused fake-quantization paths.

Eager ``fake_quant`` runs a chain of ~10 elementwise kernels (subtract, divide, clamp, mask the exponent, round…),
each a full pass over memory. ``torch.compile`` fuses the chain into one pass, which is what makes quantization-aware
fine-tuning cheap on GPUs (SPEC §5: ~15× slower than a copy eager, ~1× compiled). The compiled function computes the
same values as the eager one, bit for bit, on CPU and CUDA; tests check equality.
:func:`msfp.surgery.set_fused_rounding` switches a model's quantizers to this path.
"""

from __future__ import annotations

import functools

import torch

from msfp.formats import Format, _fake_quant, get_format

# Bit-exact with eager on CUDA: Triton's fp32 ``/`` is an approximate division (``div.full``), so a value within an
# ulp or two of a rounding boundary could land on the other grid point; and mul+add contracted to an FMA would change
# the last bit of ``q * scale + zero_point``. These options make Inductor emit IEEE division and no FMA contraction.
# (Older torch releases lack the first option; ``_exact_options`` leaves out what this torch does not know.)
_EXACT_OPTIONS = {"eager_numerics.division_rounding": True, "emulate_precision_casts": True}
# Every format and call signature (weights/activations, per-group scales, grad or not, zero point or not) is a graph
# of the one ``_fake_quant`` code object; dynamo's default of 8 graphs per code object would silently fall back to
# eager for the rest. Raise it while compiling and fail loudly if even that is exceeded.
_RECOMPILE_LIMIT = 128


def _exact_options() -> dict:
    from torch._inductor import config

    known = config.get_config_copy()
    return {k: v for k, v in _EXACT_OPTIONS.items() if k in known}


def fused_rounding_exact(device: torch.device | str) -> tuple[bool, str]:
    """Whether the fused rounding equals eager bit for bit on ``device`` with this torch, and why not.

    On CPU Inductor's C++ divides exactly. On CUDA it needs ``eager_numerics.division_rounding`` (torch ≥ 2.11):
    without it Triton's approximate division can put a value next to a rounding boundary on the other grid point.
    """
    if torch.device(device).type != "cuda" or "eager_numerics.division_rounding" in _exact_options():
        return True, ""
    return False, (f"torch {torch.__version__}'s Inductor has no IEEE-division option for CUDA (added in torch 2.11), "
                   f"so fused rounding could differ from eager rounding near rounding boundaries")


@functools.lru_cache(maxsize=None)
def _compiled(fmt: Format, dynamic: bool | None):
    # One compiled function per format keeps the format's constants (bias, mantissa bits, bounds) baked in.
    return torch.compile(functools.partial(_fake_quant, fmt=fmt), dynamic=dynamic, fullgraph=True,
                         options=_exact_options())


def compiled_fake_quant(x: torch.Tensor, fmt: str | Format, scale: torch.Tensor, zero_point=None,
                        dynamic: bool | None = None):
    """Fused ``fake_quant`` without input validation (the caller guarantees positive scales and matching shapes).

    ``dynamic=None`` lets dynamo generalise to dynamic shapes after the first shape change (one graph serves all the
    layers of a model); ``False`` specialises on every shape (benchmarks of one shape).
    """
    fmt = get_format(fmt)
    compiled = _compiled(fmt, dynamic)
    signature = _signature(fmt, dynamic, x, scale, zero_point)
    if signature in _compiled_signatures:
        try:
            return compiled(x, scale=scale, zero_point=zero_point)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            pass  # global state the signature misses made it compile past dynamo's default limit: raise it
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        out = compiled(x, scale=scale, zero_point=zero_point)
    _compiled_signatures.add(signature)
    return out


# The raised limit is needed only while dynamo compiles, but patching dynamo's config costs as much host time as the
# compiled call itself (~50 µs on a 2-core CPU), which a small model's GPU training step, bound by host work, pays
# twice per layer. So calls whose inputs match an earlier call (shapes, strides, dtypes, devices, requires_grad, grad
# and CUDA autocast mode) run unpatched. Should other global state make one recompile (CPU autocast, inference
# mode, ``torch._dynamo.reset()``), past dynamo's default limit the call is made again, patched.
_compiled_signatures: set = set()


def _signature(fmt: Format, dynamic, *tensors) -> tuple:
    return (fmt, dynamic, torch.is_grad_enabled(), torch.is_autocast_enabled(),
            *(None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in tensors))
