"""Triton kernels for real W4A4 inference on FP8 (E4M3) tensor cores (issue #8, SPEC §5).

Every value of the 4-bit grids used here (signed E2M1, unsigned E2M2/E3M1, INT4…) is exactly representable in
``torch.float8_e4m3fn`` after a power-of-two shift, so a quantized layer can run as an FP8 GEMM whose products are
exact and whose only rounding is the fp32 accumulation.

``act_codes``
    Quantizes activations to FP8 codes in one pass, bit-for-bit equal to the torch reference
    ``(round_to_grid(clamp((x - z) / s, lo, max), fmt) * 2**shift).to(torch.float8_e4m3fn)``; NCHW input is written
    NHWC, the layout the convolution reads.
``conv2d_fp8`` / ``linear_fp8``
    Implicit-GEMM convolution on FP8 codes (no im2col copy): one K loop walks (kh, kw, channel block), computing the
    input addresses and zero-padding masks on the fly (or, with ``tma=True``, loading each tile with one TMA copy);
    per-sample and per-output-channel scales, bias and the zero-point correction are applied in the epilogue. A
    linear layer is the 1×1 convolution of a 1×1 image.
``compile_ahead`` / ``kernel_stats``
    Compile what a launcher would run for a given GPU architecture without that GPU, and report its registers,
    spills, shared memory and tensor-core instructions (``benchmarks/kernel_compile.py``).
``conv2d_fp8_reference``
    The float64 result the FP8 GEMMs approximate, with the magnitudes that bound their rounding errors.
``precompile``
    Compile every kernel a function (a model's forward, say) launches, in parallel processes, before it first runs.

The module imports without Triton (``HAS_TRITON`` is then False and the launchers raise). Kernels need CUDA tensors
on a GPU with FP8 support (sm_89+), or CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run without a GPU).
The interpreter's ``tl.dot`` decodes E4M3 codes with a float conversion that has no NaN, reading ``act_codes``'s NaN
code 0x7F as 480: interpreted, a NaN input gives finite outputs where the fake-quant layer and the emulated
:class:`msfp.fp8.Fp8Layer` give NaN. E4M3 tensor cores read 0x7F as NaN (not yet checked on a GPU here).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import multiprocessing
import numbers
import os
import pickle
import re
import subprocess
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from msfp.formats import Format, get_format

try:
    import triton
    import triton.language as tl
    from triton.runtime.driver import driver
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None
    tl = None

HAS_TRITON = triton is not None

FP8_DTYPE = torch.float8_e4m3fn
_SCALE_DTYPE = torch.float32
_ACT_BLOCKS = (64, 64)  # (rows, channels) per program; the kernel is memory-bound, this is a plain 2-D tile
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: a constexpr function in Triton 3.6 and 3.9, whose call costs microseconds per launch.
    return -(-a // b)


class KernelsUnavailable(RuntimeError):
    """The kernels cannot run here: no Triton, or tensors on a device Triton does not launch on."""


# A ROCm torch calls AMD GPUs "cuda"; the kernels use NVIDIA's E4M3 type (tl.float8e4nv), TMA and wgmma-sized tiles.
HIP_UNSUPPORTED = "ROCm/HIP device: the FP8 kernels target NVIDIA sm_89+"


def interpreted() -> bool:
    """Whether Triton interprets kernels on CPU tensors (``TRITON_INTERPRET=1``: how the tests run without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _require_triton(*tensors: torch.Tensor) -> None:
    if torch.version.hip and any(t.is_cuda for t in tensors):  # first: installing Triton would not help
        raise KernelsUnavailable(HIP_UNSUPPORTED)
    if not HAS_TRITON:
        raise KernelsUnavailable("msfp.triton_kernels needs the `triton` package, which is not installed")
    for t in tensors:
        if not t.is_cuda and not interpreted():  # read only then: it costs µs per launch
            raise KernelsUnavailable(f"Triton kernels need CUDA tensors (got a tensor on {t.device}); "
                                     "CPU tensors only work under TRITON_INTERPRET=1")


def _check_vector(t: torch.Tensor | None, name: str, length: int, device, *, dtype=None, optional=False):
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(t, torch.Tensor) or t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(getattr(t, 'shape', ()))}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _pair(v, name: str) -> tuple[int, int]:
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:  # every layer's call: fast
        return v
    pair = (v, v) if isinstance(v, numbers.Integral) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(pair[0]), int(pair[1])  # a numpy integer too


@functools.lru_cache(maxsize=None)
def _several_gpus() -> bool:
    return torch.cuda.device_count() > 1


@functools.lru_cache(maxsize=None)
def _check_representable(fmt: Format, shift: int) -> None:
    # Exactness makes the float32 → FP8 conversion independent of its rounding and saturation rules (which differ
    # between the interpreter, the GPU and torch); a grid that does not fit is a caller error, not silently rounded.
    values = fmt.values().double() * 2.0**shift
    if (values.to(FP8_DTYPE).double() != values).any():
        raise ValueError(f"format {fmt.name} shifted by 2^{shift} is not exactly representable in float8_e4m3fn "
                         f"(largest value {fmt.max_value * 2.0**shift:g}, FP8 E4M3 range ±448, smallest step 2^-9)")


@dataclasses.dataclass
class _Launch:
    """A validated kernel launch: what the launchers run and what :func:`compile_ahead` compiles."""

    kernel: object  # a @triton.jit function or its autotuner; None when the output is empty
    grid: object
    args: tuple
    flags: dict  # compile-time arguments, block sizes and launch options included unless autotuned
    configs: tuple  # the block configurations the launch may compile: the autotuner's, or ({},)
    result: torch.Tensor
    # What Triton specializes this launch on (see _launch): its plan (kernel, flags, int arguments, and the layouts
    # and alignments of the tensors it was planned for) and whether the tensor the launch allocated is 16-byte
    # aligned; None for a launch without a kernel.
    kind: tuple | None
    # Called with a configuration's flags before compiling it ahead of time (the autotuner's pre-launch hook)
    configure: object = None
    finish: object = None  # fills `result` after the kernel ran (split-K: sums the workspace into it)

    def check_gpu_blocks(self) -> None:
        if self.flags.get("BLOCK_K", 32) < 32:
            raise ValueError(f"block_k must be ≥ 32 on GPUs (FP8 MMA depth), got {self.flags['BLOCK_K']}")

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        if tensors[0].is_cuda:
            self.check_gpu_blocks()
        _require_triton(*tensors)
        # Triton launches on the current device, not the tensors': a layer of a model split across GPUs would run on
        # another GPU than its data. (Only there: switching costs host time every launch.)
        several = tensors[0].is_cuda and _several_gpus()
        with torch.cuda.device(tensors[0].device) if several else contextlib.nullcontext():
            if self.kernel is not None:
                self._launch()
            if self.finish is not None:
                self.finish()
        return self.result

    def _launch(self) -> None:
        # Triton's dispatch — the JIT binding and specializing every argument and building its cache key, the
        # autotuner keying every call — cost more host time than the rest of a layer's forward. A launch of the same
        # kind as an earlier one (same plan: kernel, compile-time flags, int arguments, and tensors alike in all
        # that Triton specializes on — dtypes, 16-byte alignment; the tensor descriptors' shapes, strides and
        # blocks follow from the plan) gets what Triton chose for that one: the autotuner's configuration, and the
        # compiled kernel, launched directly. Compile options read from Triton's knobs (debug, instrumentation)
        # are those of the first such launch.
        known = _known_launches.get(self.kind)
        if known is None:
            _known_launches[self.kind] = self._launch_through_triton()
            return
        grid = self.grid
        if isinstance(self.kernel, triton.runtime.Autotuner):
            grid = grid(known.flags)  # ours read only the block sizes
            if self.configure is not None:
                self.configure(known.flags)  # the TMA block shapes: what the configuration's pre-launch hook does
        if known.compiled is None:  # interpreted: no compiled kernel to call
            known.jit[grid](*self.args, **known.flags)
            return
        device = driver.active.get_current_device()
        if device != known.device:
            _known_launches[self.kind] = self._launch_through_triton()
            return
        stream = driver.active.get_current_stream(device)
        known.compiled[(*grid, 1, 1)[:3]](*self.args, *known.constants, stream=stream)

    def _launch_through_triton(self) -> _KnownLaunch:
        compiled = self.kernel[self.grid](*self.args, **self.flags)
        if isinstance(self.kernel, triton.runtime.Autotuner):
            jit, flags = self.kernel.fn, {**self.flags, **self.kernel.best_config.all_kwargs()}
        else:
            jit, flags = self.kernel, self.flags
        if not isinstance(compiled, triton.compiler.CompiledKernel):
            return _KnownLaunch(jit, flags)
        params = jit.signature.parameters
        # A compiled kernel takes every parameter positionally, compile-time ones included.
        constants = tuple(flags[name] if name in flags else params[name].default
                          for name in jit.arg_names[len(self.args):])
        return _KnownLaunch(jit, flags, compiled, constants, driver.active.get_current_device())


@dataclasses.dataclass
class _KnownLaunch:
    """What Triton chose for a kind of launch (see _Launch._launch): the JIT function and the compile-time flags with
    the autotuner's block configuration; the compiled kernel, with the values of its parameters after the positional
    arguments, and the device it is loaded on (None where Triton interprets the kernels)."""

    jit: object
    flags: dict
    compiled: object = None
    constants: tuple | None = None
    device: int | None = None


# What Triton chose for each kind of launch made so far (see _Launch._launch).
_known_launches: dict[tuple, _KnownLaunch] = {}

# The launches recorded by `precompile`, when it is running its function (None otherwise).
_recorded_launches: contextvars.ContextVar[list | None] = contextvars.ContextVar("msfp_recorded_launches",
                                                                                default=None)


def _recordable(launcher):
    """A launcher that, while :func:`precompile` records, validates its arguments, notes the launch and returns a
    zero-filled output instead of running."""

    @functools.wraps(launcher)
    def launch_or_record(*args, **kwargs):
        recorded = _recorded_launches.get()
        if recorded is None:
            return launcher(*args, **kwargs)
        launch = _prepare(launcher.__name__, *args, **kwargs)
        if launch.kernel is not None:
            recorded.append(_map_leaves((launcher.__name__, args, kwargs), torch.Tensor, _TensorSpec.of))
        return launch.result.zero_()

    return launch_or_record


if HAS_TRITON:

    @triton.jit
    def _act_codes_kernel(x_ptr, scale_ptr, zp_ptr, out_ptr, rows, C, HW, W,
                          sxb, sxc, sxh, sxw, s_scale, s_zp, sob, soh, sow,
                          HAS_ZP: tl.constexpr, IS_INT: tl.constexpr, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                          FIXED_MAGIC: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, OUT_MUL: tl.constexpr,
                          PLANES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Row r = (b, h, w) of the NHWC output; column = channel. The input is read through its own strides (NCHW,
        # channels_last or a 2-D (M, K) matrix with H = W = 1).
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        if PLANES:
            # Each channel's H×W plane is contiguous (NCHW): a program takes BLOCK_R positions of one sample, so
            # the input offsets are visibly consecutive along rows and load as vectors (Triton transposes the tile
            # through shared memory for the channels-innermost store). Row blocks that straddle samples would hide it.
            tiles = (HW + BLOCK_R - 1) // BLOCK_R
            sample = tl.program_id(0) // tiles
            hw = tl.program_id(0) % tiles * BLOCK_R + tl.arange(0, BLOCK_R)
            b = sample + hw * 0
            h = hw // W
            w = hw % W
            row_ok = hw < HW
            in_off = sample.to(tl.int64) * sxb + hw
        else:
            r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
            b = r // HW
            h = (r % HW) // W
            w = r % W
            row_ok = r < rows
            in_off = b.to(tl.int64) * sxb + h * sxh + w * sxw
        mask = row_ok[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + in_off[:, None] + c[None, :].to(tl.int64) * sxc, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + b * s_scale, mask=row_ok, other=1.0)
        if HAS_ZP:
            x = x - tl.load(zp_ptr + b * s_zp, mask=row_ok, other=0.0)[:, None]
        v = tl.math.div_rn(x, s[:, None])  # IEEE division: the default `/` is approximate on GPUs
        # Clamp with comparisons rather than minimum/maximum so that NaN stays NaN (as torch.clamp does). `<=` puts
        # -0.0 on an unsigned grid's +0.0 bound (msfp.fp8.act_codes does the same); a signed grid keeps it.
        v = tl.where(v <= LO, LO, v)
        v = tl.where(v > HI, HI, v)
        # Round |v| to the grid, half to even, in few instructions: by our count of them, they rather than the bytes
        # moved bound this kernel on a Hopper GPU. Where the grid's step is fixed (integers, and FP subnormals:
        # |v| < MIN_NORMAL), adding FIXED_MAGIC = 2^23 · step makes float32's own rounding (half to even) round to
        # that step, and subtracting it again is exact.
        a = tl.abs(v)
        rounded = (a + FIXED_MAGIC) - FIXED_MAGIC
        if not IS_INT:
            # In a normal binade the step is 2^-MBITS of it: round the float32 bits to MBITS mantissa bits, half to
            # even on the last kept bit. With MBITS = 0 that is the exponent field's, and float32's bias (127) and
            # the format's (odd from 2 exponent bits on; 1 bit gives one normal binade, so no such tie) give it the
            # same parity: round_to_grid's rule for a tie between 2^k and 2^(k+1). A carry goes into the exponent, as
            # it should; |v| ≤ HI, a grid value, cannot round past it.
            DROP: tl.constexpr = 23 - MBITS
            bits = a.to(tl.int32, bitcast=True)
            bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & -(1 << DROP)
            rounded = tl.where(a < MIN_NORMAL, rounded, bits.to(tl.float32, bitcast=True))
        # Put v's sign back on (torch.round keeps it: negatives that round to zero give -0.0). NaN is handled below.
        q = ((rounded * OUT_MUL).to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & -2147483648)).to(
            tl.float32, bitcast=True)
        code = q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        # The interpreter's float32 → FP8 conversion has no NaN path, and the bit rounding above may turn a NaN with
        # a full payload into a number: write the canonical NaN code wherever v is NaN.
        code = tl.where(v != v, 0x7F, code)
        out_off = b.to(tl.int64) * sob + h * soh + w * sow
        tl.store(out_ptr + out_off[:, None] + c[None, :], code, mask=mask)


@_recordable
def act_codes(x: torch.Tensor, fmt: str | Format, scale: torch.Tensor, zero_point: torch.Tensor | None,
              shift: int = 0, out: torch.Tensor | None = None, *, pad=0, block_r: int | None = None,
              block_c: int | None = None) -> torch.Tensor:
    """Quantize activations to FP8 E4M3 codes of ``fmt``'s grid times ``2**shift``.

    ``x``: float32/bfloat16/float16, NCHW ``(B, C, H, W)`` (any strides) or ``(M, K)``. ``scale`` and ``zero_point``:
    float32 ``(B,)`` / ``(M,)``, one per sample or row (expand a scalar for per-tensor quantization);
    ``zero_point`` is None for signed formats. Returns (or fills ``out``) contiguous ``(B, H, W, C)`` / ``(M, K)``
    float8_e4m3fn codes equal bit for bit to :func:`msfp.fp8.act_codes`,
    ``(round_to_grid(clamp((x.float() - z) / s, lo, max), fmt) * 2**shift).to(torch.float8_e4m3fn)``, including
    signed zeros (-0.0 on signed grids, +0.0 only on unsigned ones); ±inf saturates; NaN gives the NaN code 0x7F (its
    sign is not kept). ``pad=(ph, pw)`` (4-D input, no ``out``) writes the codes inside a zero border of that width
    and returns the interior view ``padded[:, ph:ph+H, pw:pw+W]``, which :func:`conv2d_fp8` takes with
    ``zero_bordered=True`` to read a padded convolution's input as flat rows.
    """
    return _prepare_act_codes(x, fmt, scale, zero_point, shift, out, pad, block_r, block_c).run(x)


def _prepare_act_codes(x, fmt, scale, zero_point, shift, out, pad, block_r, block_c) -> _Launch:
    pad = _pair(pad, "pad")
    # The types too: 1.0 == 1 would find the plan checked for the int.
    key = (_layout(x), fmt, _layout(scale), _layout(zero_point), shift, type(shift), _layout(out), pad, block_r,
           block_c)
    plan = _act_plans.get(key)
    if plan is None:
        # Checked once per kind of launch, as convolutions are (_prepare_conv2d_fp8).
        plan = _act_plans[key] = _act_codes_plan(x, fmt, scale, zero_point, shift, out, pad, block_r, block_c)
    else:
        _require_triton()
    ph, pw = pad
    if ph or pw:
        padded = torch.zeros(plan.padded_shape, dtype=FP8_DTYPE, device=x.device)
        out = padded[:, ph:ph + x.shape[2], pw:pw + x.shape[3]]
    elif out is None:
        out = torch.empty(plan.out_shape, dtype=FP8_DTYPE, device=x.device)
    if plan.kernel is None:  # an empty output
        return _Launch(None, None, (), {}, ({},), out, None)
    zp = zero_point if zero_point is not None else scale  # unread when HAS_ZP is False
    return _Launch(plan.kernel, plan.grid, (x, scale, zp, out.view(torch.uint8), *plan.int_args), plan.flags, ({},),
                   out, (plan, out.data_ptr() % 16 == 0))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a launch's kind (_Launch.kind)
class _ActCodesPlan:
    """The part of an activation-codes launch that its arguments' layouts determine (:func:`_act_codes_plan`)."""

    out_shape: tuple
    padded_shape: tuple  # of the buffer the codes are written into: out_shape (NHWC) inside the zero border
    kernel: object  # None when the output is empty
    grid: tuple
    int_args: tuple  # the kernel's arguments after its four tensors
    flags: types.MappingProxyType


# Each kind of activation-codes launch made so far, by its arguments' layouts (see _prepare_act_codes).
_act_plans: dict[tuple, _ActCodesPlan] = {}


def _act_codes_plan(x, fmt, scale, zero_point, shift, out, pad, block_r, block_c) -> _ActCodesPlan:
    """Check an activation-codes launch's arguments and plan it (``pad``: a pair)."""
    fmt = get_format(fmt)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 4:
        B, C, H, W = x.shape
        sxb, sxc, sxh, sxw = x.stride()
        out_shape = (B, H, W, C)
    elif x.dim() == 2:
        (B, C), H, W = x.shape, 1, 1
        (sxb, sxc), sxh, sxw = x.stride(), 0, 0
        out_shape = (B, C)
    else:
        raise ValueError(f"x must be 4-D NCHW or 2-D (M, K), got shape {tuple(x.shape)}")
    if not isinstance(shift, int):
        raise ValueError(f"shift must be an int (a power-of-two exponent), got {shift!r}")
    _check_vector(scale, "scale", B, x.device, dtype=_SCALE_DTYPE)
    if fmt.needs_zero_point:
        if zero_point is None:
            raise ValueError(f"unsigned format {fmt.name} needs a zero_point")
        _check_vector(zero_point, "zero_point", B, x.device, dtype=_SCALE_DTYPE)
    elif zero_point is not None:
        raise ValueError(f"signed format {fmt.name} is symmetric and takes no zero_point")
    _check_representable(fmt, shift)
    ph, pw = pad
    padded_shape = (B, H + 2 * ph, W + 2 * pw, C) if x.dim() == 4 else out_shape
    if ph or pw:
        if x.dim() != 4 or out is not None or min(ph, pw) < 0:
            raise ValueError(f"pad needs a 4-D input, no out and non-negative widths, got pad={pad!r}, input shape "
                             f"{tuple(x.shape)}, out given: {out is not None}")
        # The interior view's strides: those of the whole buffer.
        sob, soh, sow = (H + 2 * ph) * (W + 2 * pw) * C, (W + 2 * pw) * C, C
    elif out is not None and (out.shape != out_shape or out.dtype != FP8_DTYPE or not out.is_contiguous()
                              or out.device != x.device):
        raise ValueError(f"out must be a contiguous float8_e4m3fn tensor of shape {out_shape} on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous: {out.is_contiguous()})")
    else:  # a contiguous output, given or allocated: 2-D outputs have (M, K) = (B, C), H = W = 1
        sob, soh, sow = (H * W * C, W * C, C) if x.dim() == 4 else (C, 0, 0)
    _require_triton()
    if B * H * W * C == 0:
        return _ActCodesPlan(out_shape, padded_shape, None, (), (), types.MappingProxyType({}))
    block_r, block_c = block_r or _ACT_BLOCKS[0], block_c or _ACT_BLOCKS[1]
    if not all(isinstance(b, int) and b > 0 and not b & (b - 1) for b in (block_r, block_c)):
        raise ValueError(f"block_r and block_c must be powers of two (tl.arange), got {(block_r, block_c)}")
    rows = B * H * W
    # Contiguous planes (NCHW, not channels_last): row blocks within one sample (see the kernel).
    planes = sxc != 1 and sxw == 1 and sxh == W and H * W > 1
    grid = (B * _cdiv(H * W, block_r) if planes else _cdiv(rows, block_r), _cdiv(C, block_c))
    zp = zero_point if zero_point is not None else scale
    int_args = (rows, C, H * W, W, sxb, sxc, sxh, sxw, scale.stride(0), zp.stride(0), sob, soh, sow)
    # No FMA contraction: it could not change a value here (see the kernel), but off, exactness needs no argument.
    # Set explicitly in both kernels, as Triton's default changes in 3.10.
    flags = dict(HAS_ZP=zero_point is not None, IS_INT=fmt.kind == "int", MBITS=fmt.mbits,
                 MIN_NORMAL=2.0**fmt.min_exponent,
                 FIXED_MAGIC=2.0 ** (23 + fmt.min_exponent - fmt.mbits if fmt.kind == "fp" else 23),  # 2^23 · step
                 LO=-fmt.max_value if fmt.signed else 0.0, HI=fmt.max_value, OUT_MUL=2.0**shift,
                 PLANES=planes, BLOCK_R=block_r, BLOCK_C=block_c, enable_fp_fusion=False)
    return _ActCodesPlan(out_shape, padded_shape, _act_codes_kernel, grid, int_args, types.MappingProxyType(flags))


if HAS_TRITON:

    @triton.jit
    def _conv_fp8_kernel(x, w, y_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, zp_ptr, wsum_ptr,
                         B, H, W, C, O, OH, OW,
                         stride_h, stride_w, dil_h, dil_w,
                         sxb, sxh, sxw, sxc, swo, swh, sww, swc, s_as, s_ws, s_bias, s_zp, sso, ssh, ssw,
                         KH: tl.constexpr, KW: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
                         CHANNEL_MASK: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_ZP: tl.constexpr, PRECISE_ACC: tl.constexpr, TMA: tl.constexpr,
                         FLAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr = 1, WARP_SPECIALIZE: tl.constexpr = False):
        # GEMM view: M = B*OH*OW output pixels, N = O output channels, K = KH*KW*C. `x` and `w` are pointers, or
        # with TMA tensor descriptors of the input and of the (O, KH*KW, C) weights (stride 1 only). With
        # SPLIT_K > 1, program (pid, k) sums the k-th share of the K loop and writes its partial result (scaled; bias
        # and zero point from share 0 only) to slice k of a (SPLIT_K, M, N) float32 workspace.
        if TMA:
            if FLAT:
                # The input, zero-bordered by the padding (HP × WP per sample), read as one flat (1, 1, rows, C)
                # tensor: a row block is BLOCK_M consecutive input positions, each the top-left tap of an output,
                # and a tap's tile is the same block shifted by kh·WP + kw rows: one TMA copy, wgmma reads it from
                # shared memory. Positions in the border or the bottom/right margin anchor no output; their rows
                # are computed and not stored.
                HP = H + 2 * PAD_H
                WP = W + 2 * PAD_W
                num_m = (B * HP * WP + BLOCK_M - 1) // BLOCK_M
            else:
                # A row block is a box of BB samples × BH rows × BW columns of the output (the descriptor's block
                # shape), so each tap's input tile is one TMA copy of the unpadded input; out-of-bounds coordinates
                # (the zero padding and ragged edges) read zeros. Triton hands such a box to wgmma via registers.
                BB: tl.constexpr = x.block_shape[0]
                BH: tl.constexpr = x.block_shape[1]
                BW: tl.constexpr = x.block_shape[2]
                tiles_w = (OW + BW - 1) // BW
                tiles_h = (OH + BH - 1) // BH
                num_m = (B + BB - 1) // BB * tiles_h * tiles_w
        else:
            num_m = (B * OH * OW + BLOCK_M - 1) // BLOCK_M
        TAPS: tl.constexpr = KH * KW
        # Grouped launch order: GROUP_M row blocks share their weight tiles while those are still in L2.
        pid = tl.program_id(0)
        # Only builtins inside the kernels (no tl.cdiv/tl.zeros, which are @jit helpers): under the interpreter those
        # fail when Triton was imported before TRITON_INTERPRET was set, as it is when tests set it themselves.
        num_n = (O + BLOCK_N - 1) // BLOCK_N
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < O
        if TMA:
            if FLAT:
                row0 = pid_m * BLOCK_M
                anchor = row0 + tl.arange(0, BLOCK_M)
                # Unsigned, as for the pointer loads below; one division for both b and pix.
                b = (anchor.to(tl.uint32) // tl.cast(HP * WP, tl.uint32)).to(tl.int32)
                pix = anchor.to(tl.uint32) % tl.cast(HP * WP, tl.uint32)
                oh = (pix // tl.cast(WP, tl.uint32)).to(tl.int32)
                ow = (pix % tl.cast(WP, tl.uint32)).to(tl.int32)
            else:
                b0 = pid_m // (tiles_h * tiles_w) * BB
                oh0 = (pid_m // tiles_w) % tiles_h * BH
                ow0 = pid_m % tiles_w * BW
                i = tl.arange(0, BLOCK_M)
                b = b0 + i // (BH * BW)
                oh = oh0 + (i // BW) % BH
                ow = ow0 + i % BW
            m_ok = (b < B) & (oh < OH) & (ow < OW)
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_k = tl.arange(0, BLOCK_K)
            m_ok = offs_m < B * OH * OW
            # Rows past the end stand in for the last row (their results are not stored), so the loads need no row
            # mask: a linear's K loop then tests nothing per row.
            rows = tl.minimum(offs_m, B * OH * OW - 1).to(tl.uint32)
            # Unsigned: row indices are never negative, and dividing unsigned by a run-time value takes no sign
            # fix-ups (104 fewer SASS instructions for a 3×3 convolution's 128×128×128 tile on sm_90).
            pix = rows % tl.cast(OH * OW, tl.uint32)
            b = (rows // tl.cast(OH * OW, tl.uint32)).to(tl.int32)
            oh = (pix // tl.cast(OW, tl.uint32)).to(tl.int32)
            ow = (pix % tl.cast(OW, tl.uint32)).to(tl.int32)
            ih0 = oh * stride_h - PAD_H
            iw0 = ow * stride_w - PAD_W
            # A tap's input pixel is the row's first one moved by a per-tap offset that all rows share, and whether
            # it lies inside the input (not in the padding) is one bit per tap, set here: a K step then adds a
            # scalar to the addresses and tests a bit a row, where it recomputed both per row (14–30% of the K
            # loop's instructions on sm_90). Up to 32 taps; larger kernels test the bounds in the loop.
            x_row = x + b.to(tl.int64) * sxb + (ih0 * sxh + iw0 * sxw)
            if TAPS <= 32:
                taps_inside = tl.full((BLOCK_M,), 0, tl.int32)
                for t in tl.static_range(TAPS):
                    ih = ih0 + t // KW * dil_h
                    iw = iw0 + t % KW * dil_w
                    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    taps_inside |= inside.to(tl.int32) << t
            # Columns past O stand in for the last one, as rows do: the weight loads need no column mask either.
            w_col = w + tl.minimum(offs_n, O - 1).to(tl.int64) * swo

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        # One flat loop over (channel block, kh, kw) rather than three nested ones, so Triton pipelines it. The taps
        # are innermost: splitting the step index by their constexpr count takes a multiply and shifts, where
        # dividing by the channel blocks' count (known at run time only) took two integer divisions a K step, about
        # 40 instructions: a sixth to a quarter of the K loop on sm_90 (kernel_compile.py).
        c_blocks = (C + BLOCK_K - 1) // BLOCK_K
        k_iters = TAPS * c_blocks
        if SPLIT_K == 1:
            it_start = 0
            it_end = k_iters
        else:
            share = (k_iters + SPLIT_K - 1) // SPLIT_K
            it_start = tl.program_id(1) * share
            it_end = tl.minimum(it_start + share, k_iters)
        # WARP_SPECIALIZE: Triton splits the loop between a warp group issuing the TMA loads and two computing.
        for it in tl.range(it_start, it_end, warp_specialize=WARP_SPECIALIZE):
            tap = it % TAPS
            kh = tap // KW
            kw = tap % KW
            c0 = it // TAPS * BLOCK_K
            if TMA:
                # Channels past C read zeros in both tiles, so a ragged last channel block adds nothing.
                if FLAT:
                    a = x.load([0, 0, row0 + kh * dil_h * WP + kw * dil_w, c0]).reshape(BLOCK_M, BLOCK_K)
                else:
                    a = x.load([b0, oh0 - PAD_H + kh * dil_h, ow0 - PAD_W + kw * dil_w, c0]).reshape(BLOCK_M, BLOCK_K)
                wt = w.load([pid_n * BLOCK_N, tap, c0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                c = c0 + offs_k
                # Positions in the zero padding load 0 and add nothing to the sum.
                if TAPS <= 32:
                    inside = (taps_inside & (1 << tap)) != 0
                else:
                    ih = ih0 + kh * dil_h
                    iw = iw0 + kw * dil_w
                    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_ptrs = x_row[:, None] + (kh * dil_h * sxh + kw * dil_w * sxw) + c[None, :] * sxc
                w_ptrs = w_col[None, :] + (kh * swh + kw * sww) + c[:, None] * swc
                # CHANNEL_MASK is False where BLOCK_K divides C: every channel block is full.
                if CHANNEL_MASK:
                    c_ok = c < C
                    a = tl.load(a_ptrs, mask=inside[:, None] & c_ok[None, :], other=0.0)
                    wt = tl.load(w_ptrs, mask=c_ok[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=inside[:, None], other=0.0)
                    wt = tl.load(w_ptrs)
            if PRECISE_ACC:
                # Hopper's FP8 MMA adds into its accumulator with fewer bits than fp32 (Triton's sm_90 default lets
                # it accumulate the whole K loop there); this adds each step's BLOCK_K products to a true fp32
                # accumulator. Not dot(…, max_num_imprecise_acc=BLOCK_K): Triton 3.6–3.9 ignore it when wgmma
                # reads A from registers (TMA boxes), whose K loop then summed in reduced precision all along.
                acc += tl.dot(a, wt, out_dtype=tl.float32)
            else:
                acc = tl.dot(a, wt, acc, out_dtype=tl.float32)

        a_s = tl.load(a_scale_ptr + b * s_as, mask=m_ok, other=0.0)
        w_s = tl.load(w_scale_ptr + offs_n * s_ws, mask=n_ok, other=0.0)
        y = acc * a_s[:, None] * w_s[None, :]
        # With split-K the bias and zero point come from share 0 only (a constexpr test: without split-K a run-time
        # one cost a select per output column).
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * s_bias, mask=n_ok, other=0.0).to(tl.float32)
            if SPLIT_K > 1:
                bias = tl.where(tl.program_id(1) == 0, bias, 0.0)
            y += bias[None, :]
        if HAS_ZP:
            # The zero point's share z·(1_valid ⊛ Q_w(W)): the weight's per-tap channel sums over the taps that see
            # real input at each position (all taps, away from padded borders). Built here from KH·KW vectors rather
            # than loaded as a (BLOCK_M, BLOCK_N) tile: no tile of registers and no tile of memory traffic.
            z = tl.load(zp_ptr + b * s_zp, mask=m_ok, other=0.0).to(tl.float32)
            if SPLIT_K > 1:
                z = tl.where(tl.program_id(1) == 0, z, 0.0)
            for tap in range(0, TAPS):
                kh = tap // KW
                kw = tap % KW
                ih = oh * stride_h - PAD_H + kh * dil_h
                iw = ow * stride_w - PAD_W + kw * dil_w
                seen = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                tap_sum = tl.load(wsum_ptr + offs_n * sso + kh * ssh + kw * ssw, mask=n_ok, other=0.0)
                y += tl.where(seen, z, 0.0)[:, None] * tap_sum.to(tl.float32)[None, :]
        if SPLIT_K > 1:
            y_ptr += tl.program_id(1).to(tl.int64) * B * OH * OW * O
        row = (b * OH + oh) * OW + ow  # int32 like the pointer path's row offsets; widened for the store
        tl.store(y_ptr + row[:, None].to(tl.int64) * O + offs_n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])

    # A few H100 configurations (FP8 wgmma wants BLOCK_K ≥ 32), as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    # num_stages); keyed on the GEMM shape. The 128-deep 4-warp tiles are there because issuing a 64-deep step of the
    # 4-warp tiles takes 1.02–1.39× the tensor cores' time for it with fp32 accumulation (kernel_compile.py's
    # k_step_issue_over_tensor_cycles at 852ed68), the 128-deep ones 0.55–0.86×. 64×128×128 is for TMA loads only:
    # with pointer loads it needs all 255 registers and spills 12–16 bytes (sm_90, Triton 3.6 and 3.9).
    _TILES = ((128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
              (128, 64, 128, 4, 4))
    _TMA_ONLY_TILES = ((64, 128, 128, 4, 4),)
    _DEPTHS = sorted({tile[2] for tile in _TILES})

    def _config(tile: tuple, channel_mask: bool, **options) -> triton.Config:
        block_m, block_n, block_k, num_warps, num_stages = tile
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
                              "CHANNEL_MASK": channel_mask}, num_warps=num_warps, num_stages=num_stages, **options)

    # With pointer loads, one autotuner per depth that channel blocks fill exactly (see _full_depth), whose candidates
    # mask channels only where they are deeper. Each candidate is then one compiled kernel whatever C: where the
    # kernel derived the mask from C's alignment, the 64-deep candidates compiled twice, for channels that are
    # multiples of 128 and of only 64.
    def _pointer_autotuner(depth: int):
        return triton.autotune(
            configs=[_config(tile, channel_mask=tile[2] > depth) for tile in _TILES],
            key=["B", "H", "W", "C", "O", "KH", "KW", "stride_h", "stride_w", "PRECISE_ACC"],
        )(_conv_fp8_kernel)

    _conv_fp8_tuned = {depth: _pointer_autotuner(depth) for depth in (0, *_DEPTHS)}

    def _set_tma_blocks(nargs: dict) -> None:
        # The autotuner's pre-launch hook: the descriptors' block shapes follow the configuration being run.
        _tma_block_shapes(nargs["x"], nargs["w"], nargs["OH"], nargs["OW"], nargs["FLAT"], nargs["BLOCK_M"],
                          nargs["BLOCK_N"], nargs["BLOCK_K"])

    # The same tiles fed by TMA copies. (256×128 tiles fit 3×3 convolutions' registers without the pointer loads'
    # address arithmetic, but spill 96–116 bytes on linears on sm_90; conv_tiles.py times them.)
    _conv_fp8_tma_tuned = triton.autotune(
        # TMA copies read zeros past C, so these never mask channels.
        configs=[_config(tile, channel_mask=False, pre_hook=_set_tma_blocks) for tile in _TILES + _TMA_ONLY_TILES],
        key=["B", "H", "W", "C", "O", "KH", "KW", "PRECISE_ACC"],
    )(_conv_fp8_kernel)


def _full_depth(C: int) -> int:
    """The deepest pointer-load candidate BLOCK_K that divides ``C`` channels (0 for none): which autotuner's
    candidates mask channels."""
    return max((depth for depth in _DEPTHS if C % depth == 0), default=0)


def _tma_tile(OH: int, OW: int, block_m: int) -> tuple[int, int, int]:
    """A block of ``block_m`` output pixels as samples × rows × columns: as wide as the output (to the next power of
    two), then as tall, then across samples."""
    bw = min(triton.next_power_of_2(OW), block_m)
    bh = min(triton.next_power_of_2(OH), block_m // bw)
    return block_m // (bw * bh), bh, bw


def _tma_block_shapes(x_desc, w_desc, OH: int, OW: int, flat: bool, block_m: int, block_n: int, block_k: int) -> None:
    x_desc.block_shape = [1, 1, block_m, block_k] if flat else [*_tma_tile(OH, OW, block_m), block_k]
    w_desc.block_shape = [block_n, 1, block_k]


def _zero_bordered_buffer(x_codes: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """The whole (B, H + 2·ph, W + 2·pw, C) buffer whose interior view ``x_codes`` is."""
    B, H, W, C = x_codes.shape
    HP, WP = H + 2 * ph, W + 2 * pw
    start = x_codes.storage_offset() - (ph * WP + pw) * C
    if (x_codes.stride() != (HP * WP * C, WP * C, C, 1) or start < 0
            or start + B * HP * WP * C > x_codes.untyped_storage().nbytes()):
        raise ValueError(f"zero_bordered: x_codes {tuple(x_codes.shape)} with strides {x_codes.stride()} is not the "
                         f"interior of a contiguous {(B, HP, WP, C)} buffer (act_codes(..., pad={(ph, pw)}) makes one)")
    return torch.as_strided(x_codes, (B, HP, WP, C), x_codes.stride(), start)


def tma_unsupported(x_codes: torch.Tensor, w_codes: torch.Tensor, stride=1) -> str | None:
    """Why :func:`conv2d_fp8` cannot load these tensors with TMA (``tma=True``), or None if it can."""
    if _pair(stride, "stride") != (1, 1):
        return f"stride {stride}: TMA tiles need stride 1"
    for name, t in (("x_codes", x_codes), ("w_codes", w_codes)):
        # TMA's rules: unit stride in the innermost dimension, 16-byte aligned base and outer strides.
        if t.stride(-1) != 1 or any(st % 16 for st in t.stride()[:-1]) or t.data_ptr() % 16:
            return (f"{name} {tuple(t.shape)} with strides {t.stride()}: TMA needs channels innermost (stride 1), a "
                    f"16-byte aligned start and the other strides multiples of 16 bytes (channels a multiple of 16)")
    if not w_codes.is_contiguous():
        return f"w_codes {tuple(w_codes.shape)} with strides {w_codes.stride()}: TMA reads it as (O, KH*KW, C)"
    if x_codes.is_cuda and torch.version.hip:  # an MI300's capability reads 9.4
        return HIP_UNSUPPORTED
    if x_codes.is_cuda and torch.cuda.get_device_capability(x_codes.device) < (9, 0):
        return f"{torch.cuda.get_device_name(x_codes.device)} has no TMA (compute capability 9.0+ has)"
    return None


def major_minor(version: str) -> tuple[int, int]:
    """``(3, 6)`` of a version string such as ``"3.6.0"`` or ``"3.10.0+git1a2b3c"``."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _warp_specialize_unsupported(flat_rows: bool, num_warps: int, zero_point_taps: bool) -> str | None:
    """Why :func:`conv2d_fp8` cannot warp-specialize a launch, or None if it can: what Triton's Hopper warp
    specialization compiled for sm_90 (checked with compile_ahead, not yet on a GPU). Triton 3.6 compiles it for TMA
    loads of flat rows (linears, 1×1 convolutions, zero-bordered codes) with ``num_warps=4`` (one warp group per
    consumer; it makes 12 warps), except a zero point's epilogue over several taps; 3.7–3.9 reject its split TMA
    copies of host-built descriptors, and 8 warps are left unspecialized."""
    if major_minor(triton.__version__) != (3, 6):
        return (f"Triton {triton.__version__}: only Triton 3.6's Hopper warp specialization compiles this kernel "
                f"(3.7.1, 3.8.0 and 3.9.0 reject its split TMA copies)")
    if not flat_rows:
        return "it needs TMA loads of flat rows: tma=True with zero-bordered codes, or no padding and contiguous codes"
    if num_warps != 4:
        return f"it needs num_warps=4 (each consumer a warp group; Triton leaves {num_warps} warps unspecialized)"
    if zero_point_taps:
        return "the zero point's epilogue loops over the taps, which Triton 3.6's warp specialization fails on"
    return None


@_recordable
def conv2d_fp8(x_codes: torch.Tensor, w_codes: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, zp: torch.Tensor | None = None,
               zp_weight_sums: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
               out_dtype: torch.dtype = torch.float32, groups: int = 1, *, precise_acc: bool = True,
               tma: bool = False, zero_bordered: bool = False, split_k: int = 1, block_m: int | None = None,
               block_n: int | None = None, block_k: int | None = None, num_warps: int = 4,
               num_stages: int = 2, maxnreg: int | None = None, warp_specialize: bool = False) -> torch.Tensor:
    """Convolution of FP8 codes, NHWC in and out.

    ``x_codes``: ``(B, H, W, C)`` float8_e4m3fn; ``w_codes``: ``(O, KH, KW, C)`` float8_e4m3fn; ``a_scale``/``zp``:
    ``(B,)``; ``w_scale``/``bias``: ``(O,)``; ``zp_weight_sums``: ``(O, KH, KW)``. Returns ``(B, OH, OW, O)`` in
    ``out_dtype`` with ``y[b, oh, ow, o] = a_scale[b] * w_scale[o] * Σ_{kh, kw, c} X[b, oh*sh - ph + kh*dh,
    ow*sw - pw + kw*dw, c] * W[o, kh, kw, c] + bias[o] + zp[b] * Σ_{kh, kw inside} zp_weight_sums[o, kh, kw]``,
    zero-padded, summed in fp32; the last sum runs over the taps that fall inside the input at (oh, ow) (the
    dequantized weight's channel sums: the zero point's share of a layer whose padding is exact zeros). ``zp`` and
    ``zp_weight_sums`` go together. ``precise_acc=False`` lets Hopper's FP8 MMA keep the whole sum in its
    reduced-precision accumulator (faster, less exact; no effect under the interpreter). ``tma=True`` loads the
    input and weight tiles with Hopper's tensor memory accelerator instead of per-thread address arithmetic: one
    copy per tap and channel block, its out-of-bounds zeros serving as the padding; it needs stride 1, channels
    innermost and multiples of 16 (:func:`tma_unsupported` says why not). A padded convolution's input is then
    read in boxes of several output rows, which Triton passes to wgmma through registers; with
    ``zero_bordered=True`` (``x_codes`` is the interior of a buffer whose ``padding``-wide border is zeros, as
    ``act_codes(…, pad=padding)`` returns) it is read as flat rows that wgmma takes from shared memory, computing
    (and discarding) the outputs anchored in the border; so is any input without padding. Block sizes default to an
    autotuned set; pass all three of ``block_m``, ``block_n``, ``block_k`` to fix them (each a power of two, as
    ``tl.arange`` needs, ≥ 16 for ``tl.dot``, ``block_k`` ≥ 32 on GPUs, whose FP8 MMA instructions are 32 deep), and
    with them ``num_warps``, ``num_stages`` and ``maxnreg`` (a cap on registers per thread, PTX's ``.maxnreg``), and
    ``warp_specialize=True`` (experimental: compiled for sm_90, not yet timed on a GPU): the K loop split between a
    producer warp group issuing the TMA copies and consumer warp groups running wgmma, 12 warps in all from
    ``num_warps=4``; it needs Triton 3.6, TMA loads of flat rows, ``num_warps=4`` and, for kernels larger than 1×1,
    no zero point (the error says which is missing). ``split_k > 1``
    splits the K loop over that many programs per output tile (more parallel work for layers with few output tiles),
    each writing a float32 partial result that a torch sum then adds in a fixed order: deterministic, one extra pass
    over the output per share.
    """
    return _prepare_conv2d_fp8(x_codes, w_codes, a_scale, w_scale, bias, zp, zp_weight_sums, stride, padding, dilation,
                               out_dtype, groups, precise_acc=precise_acc, tma=tma, zero_bordered=zero_bordered,
                               split_k=split_k, block_m=block_m, block_n=block_n, block_k=block_k,
                               num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
                               warp_specialize=warp_specialize).run(x_codes)


def _prepare_conv2d_fp8(x_codes, w_codes, a_scale, w_scale, bias=None, zp=None, zp_weight_sums=None, stride=1,
                        padding=0, dilation=1, out_dtype=torch.float32, groups=1, *, precise_acc=True, tma=False,
                        zero_bordered=False, split_k=1, block_m=None, block_n=None, block_k=None, num_warps=4,
                        num_stages=2, maxnreg=None, warp_specialize=False) -> _Launch:
    tensors = (x_codes, w_codes, a_scale, w_scale, bias, zp, zp_weight_sums)
    pairs = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    options = (out_dtype, groups, precise_acc, tma, zero_bordered, split_k, block_m, block_n, block_k, num_warps,
               num_stages, maxnreg, warp_specialize)
    key = (*map(_layout, tensors), *pairs, *options, type(split_k))  # 2.0 == 2 would find the int's checked plan
    plan = _conv_plans.get(key)
    if plan is None:
        # Checked once per kind of launch: what the checks read is all in the key (errors are never stored).
        plan = _conv_plans[key] = _conv_plan(*tensors, *pairs, *options)
    else:
        _require_triton()
    (sh, sw), (ph, pw), _ = pairs
    y = torch.empty(plan.out_shape, dtype=out_dtype, device=x_codes.device)
    if plan.kernel is None:  # an empty output
        return _Launch(None, None, (), {}, ({},), y, None)
    target, finish = y, None  # what the kernel writes: the output, or with split_k its shares' workspace
    if split_k > 1:
        target = torch.empty((split_k, *plan.out_shape), dtype=torch.float32, device=x_codes.device)
        finish = functools.partial(_sum_shares, target, y)
    x_arg, w_arg, configure = x_codes, w_codes, None
    if tma:
        C = x_codes.shape[3]
        O, KH, KW, _ = w_codes.shape
        # Flat rows where the input's padding is in memory (or there is none), boxes of output rows otherwise.
        if plan.flat:
            x_arg = (_zero_bordered_buffer(x_codes, ph, pw) if zero_bordered else x_codes).view(1, 1, -1, C)
        w_flat = w_codes.view(O, KH * KW, C)
        # Placeholder block shapes: set per configuration (by the autotuner's hook, or below for fixed blocks).
        x_arg = TensorDescriptor(x_arg, list(x_arg.shape), list(x_arg.stride()), [1, 1, 1, 16])
        w_arg = TensorDescriptor(w_flat, list(w_flat.shape), list(w_flat.stride()), [16, 1, 16])
        OH, OW = plan.out_shape[1:3]

        def configure(flags):
            _tma_block_shapes(x_arg, w_arg, OH, OW, plan.flat, flags["BLOCK_M"], flags["BLOCK_N"], flags["BLOCK_K"])

        if block_m is not None:
            configure(plan.flags)
    args = (x_arg, w_arg, target, a_scale, w_scale,
            bias if bias is not None else a_scale, zp if zp is not None else a_scale,
            zp_weight_sums if zp_weight_sums is not None else a_scale,  # placeholders are never read
            *plan.int_args)
    return _Launch(plan.kernel, plan.grid, args, plan.flags, plan.configs, y, (plan, target.data_ptr() % 16 == 0),
                   configure, finish)


def _layout(t) -> tuple | None:
    """What a launch's checks and its kernel depend on in a tensor argument, short of its values: dtype, shape,
    strides, device and 16-byte alignment (``None`` stays ``None``; anything else fails the checks anyway)."""
    if isinstance(t, torch.Tensor):
        return t.dtype, t.shape, t.stride(), t.device, t.data_ptr() % 16
    return None if t is None else (type(t),)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a launch's kind (_Launch.kind)
class _ConvPlan:
    """The part of a convolution launch that its arguments' layouts determine (:func:`_conv_plan`)."""

    out_shape: tuple
    kernel: object  # the kernel or its autotuner; None when the output is empty
    grid: object
    int_args: tuple  # the kernel's arguments after its eight tensors
    flags: types.MappingProxyType  # shared by the plan's launches, so read-only
    configs: tuple
    flat: bool  # TMA loads the input as flat rows


# Each kind of convolution launch made so far, by its arguments' layouts (see _prepare_conv2d_fp8).
_conv_plans: dict[tuple, _ConvPlan] = {}


def _conv_plan(x_codes, w_codes, a_scale, w_scale, bias, zp, zp_weight_sums, stride, padding, dilation, out_dtype,
               groups, precise_acc, tma, zero_bordered, split_k, block_m, block_n, block_k, num_warps, num_stages,
               maxnreg, warp_specialize) -> _ConvPlan:
    """Check a convolution's arguments and plan its launch (``stride``, ``padding``, ``dilation``: pairs)."""
    if groups != 1:
        raise ValueError(f"conv2d_fp8 supports groups=1 only, got groups={groups}")
    for name, t in (("x_codes", x_codes), ("w_codes", w_codes)):
        if not isinstance(t, torch.Tensor) or t.dtype != FP8_DTYPE or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D float8_e4m3fn tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    B, H, W, C = x_codes.shape
    O, KH, KW, Cw = w_codes.shape
    if Cw != C:
        # Only a multiple of the weight's channels is what a grouped convolution's weight would have.
        grouped = " (grouped convolutions are unsupported)" if Cw and C % Cw == 0 else ""
        raise ValueError(f"w_codes must have shape (O, KH, KW, {C}) to match x_codes (B, H, W, C) = "
                         f"{tuple(x_codes.shape)}, got {tuple(w_codes.shape)}{grouped}")
    if w_codes.device != x_codes.device:
        raise ValueError(f"w_codes is on {w_codes.device}, expected {x_codes.device}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride and dilation must be ≥ 1 and padding ≥ 0, got {stride}, {dilation}, {padding}")
    OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"output would be empty: input {H}×{W}, kernel {KH}×{KW}, padding {(ph, pw)}, "
                         f"dilation {(dh, dw)}, stride {(sh, sw)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    dev = x_codes.device
    _check_vector(a_scale, "a_scale", B, dev)
    _check_vector(w_scale, "w_scale", O, dev)
    _check_vector(bias, "bias", O, dev, optional=True)
    if (zp is None) != (zp_weight_sums is None):
        raise ValueError("zp and zp_weight_sums must be given together (or both None)")
    if zp is not None:
        _check_vector(zp, "zp", B, dev)
        sums = zp_weight_sums
        if not isinstance(sums, torch.Tensor) or sums.shape != (O, KH, KW) or not sums.is_floating_point():
            raise ValueError(f"zp_weight_sums must be a floating-point tensor of shape {(O, KH, KW)}, got "
                             f"{getattr(sums, 'dtype', None)} {tuple(getattr(sums, 'shape', ()))}")
        if sums.device != dev:
            raise ValueError(f"zp_weight_sums is on {sums.device}, expected {dev}")
    explicit = (block_m, block_n, block_k)
    if any(v is not None for v in explicit):
        if None in explicit or min(explicit) < 16 or any(v & (v - 1) for v in explicit):
            raise ValueError(f"block_m, block_n, block_k must be given together and each be a power of two ≥ 16 "
                             f"(tl.arange), got {explicit}")
    elif maxnreg is not None or warp_specialize:
        raise ValueError("maxnreg and warp_specialize need fixed blocks (block_m, block_n, block_k); the autotuner's "
                         "candidates set none")
    if tma:
        reason = tma_unsupported(x_codes, w_codes, (sh, sw))
        if reason is not None:
            raise ValueError(f"conv2d_fp8(tma=True): {reason}")
    _require_triton()
    out_shape = (B, OH, OW, O)
    flat = bool(tma) and (zero_bordered or (ph == pw == 0 and x_codes.is_contiguous()))
    if warp_specialize:
        reason = _warp_specialize_unsupported(flat, num_warps, zp is not None and KH * KW > 1)
        if reason is not None:
            raise ValueError(f"conv2d_fp8(warp_specialize=True): {reason}")
    if B * OH * OW * O == 0:
        return _ConvPlan(out_shape, None, None, (), types.MappingProxyType({}), ({},), flat)
    int_args = (B, H, W, C, O, OH, OW, sh, sw, dh, dw,
                *x_codes.stride(), *w_codes.stride(), a_scale.stride(0), w_scale.stride(0),
                bias.stride(0) if bias is not None else 0, zp.stride(0) if zp is not None else 0,
                *(zp_weight_sums.stride() if zp_weight_sums is not None else (0, 0, 0)))
    # FMA contraction only changes the epilogue's rounding (within the fp32 summation bound), so it stays on.
    flags = {"KH": KH, "KW": KW, "PAD_H": ph, "PAD_W": pw, "HAS_BIAS": bias is not None, "HAS_ZP": zp is not None,
             "PRECISE_ACC": bool(precise_acc), "TMA": bool(tma), "FLAT": flat, "SPLIT_K": split_k,
             "enable_fp_fusion": True}
    M = B * OH * OW

    def num_m(block_m):
        if not tma:
            return _cdiv(M, block_m)
        if flat:
            return _cdiv(B * (H + 2 * ph) * (W + 2 * pw), block_m)
        bb, bh, bw = _tma_tile(OH, OW, block_m)
        return _cdiv(B, bb) * _cdiv(OH, bh) * _cdiv(OW, bw)

    if block_m is None:
        tuned = _conv_fp8_tma_tuned if tma else _conv_fp8_tuned[_full_depth(C)]
        grid = lambda meta: (num_m(meta["BLOCK_M"]) * _cdiv(O, meta["BLOCK_N"]), split_k)  # noqa: E731
        configs = tuple({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in tuned.configs)
        return _ConvPlan(out_shape, tuned, grid, int_args, types.MappingProxyType(flags), configs, flat)
    # TMA copies read zeros past C: no channel mask.
    flags.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                 CHANNEL_MASK=not tma and C % block_k != 0, num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        flags["maxnreg"] = maxnreg
    if warp_specialize:  # only then: other launches keep the flags (and compiled kernels) they had
        flags["WARP_SPECIALIZE"] = True
    grid = (num_m(block_m) * _cdiv(O, block_n), split_k)
    return _ConvPlan(out_shape, _conv_fp8_kernel, grid, int_args, types.MappingProxyType(flags), ({},), flat)


def _sum_shares(workspace: torch.Tensor, out: torch.Tensor) -> None:
    if out.dtype == torch.float32:
        torch.sum(workspace, 0, out=out)
    else:
        out.copy_(workspace.sum(0))


@_recordable
def linear_fp8(x_codes: torch.Tensor, w_codes: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, zp: torch.Tensor | None = None,
               zp_weight_sums: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
               **blocks) -> torch.Tensor:
    """``y[m, n] = a_scale[m] * w_scale[n] * Σ_k X[m, k] * W[n, k] + bias[n] + zp[m] * zp_weight_sums[n]``.

    ``x_codes``: ``(M, K)``, ``w_codes``: ``(N, K)`` float8_e4m3fn; ``a_scale``/``zp``: ``(M,)``;
    ``w_scale``/``bias``/``zp_weight_sums``: ``(N,)``. Runs :func:`conv2d_fp8` on a 1×1 image (``blocks`` as there).
    """
    return _prepare_linear_fp8(x_codes, w_codes, a_scale, w_scale, bias, zp, zp_weight_sums, out_dtype,
                               blocks).run(x_codes)


def _prepare_linear_fp8(x_codes, w_codes, a_scale, w_scale, bias, zp, zp_weight_sums, out_dtype, blocks) -> _Launch:
    for name, t in (("x_codes", x_codes), ("w_codes", w_codes)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(getattr(t, 'shape', ()))}")
    if w_codes.shape[1] != x_codes.shape[1]:
        raise ValueError(f"w_codes must have shape (N, {x_codes.shape[1]}) to match x_codes (M, K) = "
                         f"{tuple(x_codes.shape)}, got {tuple(w_codes.shape)}")
    sums = zp_weight_sums
    if sums is not None and (not isinstance(sums, torch.Tensor) or sums.shape != (w_codes.shape[0],)):
        raise ValueError(f"zp_weight_sums must have shape ({w_codes.shape[0]},), got "
                         f"{tuple(getattr(sums, 'shape', ()))}")
    # A direct call (not _prepare's signature binding): this runs on every linear layer's forward. Views that add
    # unit dimensions (any strides allow them) cost less host time than indexing with None.
    (M, K), N = x_codes.shape, w_codes.shape[0]
    launch = _prepare_conv2d_fp8(x_codes.view(M, 1, 1, K), w_codes.view(N, 1, 1, K), a_scale, w_scale, bias, zp,
                                 None if sums is None else sums.view(N, 1, 1), out_dtype=out_dtype, **blocks)
    launch.result = launch.result.view(M, N)
    return launch


def conv2d_fp8_reference(x_codes: torch.Tensor, w_codes: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, zp: torch.Tensor | None = None,
                         zp_weight_sums: torch.Tensor | None = None, stride=1, padding=0,
                         dilation=1) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`conv2d_fp8` computes, in float64 on the inputs' device (a linear is the convolution of a 1×1 image:
    ``x_codes[:, None, None]``), and Σ|terms|, the sum of the magnitudes of everything that enters each output, which
    bounds the kernel's rounding errors: ``(K + 8 + 2·taps)·2⁻²⁴·Σ|terms|`` with fp32 accumulation (the tests derive
    it). Both ``(B, OH, OW, O)``. The zero point's share is ``zp`` times the weight sums ``zp_weight_sums[o, kh, kw]``
    of the taps inside the input: a convolution of ones."""
    def conv(a, b):
        nchw = torch.nn.functional.conv2d(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), None, stride, padding,
                                          dilation)
        return nchw.permute(0, 2, 3, 1)

    x, w = x_codes.double(), w_codes.double()
    sa, sw = a_scale.double()[:, None, None, None], w_scale.double()
    y, magnitude = sa * sw * conv(x, w), sa.abs() * sw.abs() * conv(x.abs(), w.abs())
    if bias is not None:
        y, magnitude = y + bias.double(), magnitude + bias.double().abs()
    if zp is not None:
        ones, sums = torch.ones_like(x[..., :1]), zp_weight_sums.double()[..., None]
        z = zp.double()[:, None, None, None]
        y, magnitude = y + z * conv(ones, sums), magnitude + z.abs() * conv(ones, sums.abs())
    return y, magnitude


# Each launcher with the function that prepares its launch from the same parameters (the originals: tests may
# replace the module's launchers with partials).
_LAUNCHERS = {f.__name__: (f, prepare) for f, prepare in ((act_codes, _prepare_act_codes),
                                                          (conv2d_fp8, _prepare_conv2d_fp8),
                                                          (linear_fp8, _prepare_linear_fp8))}


def _prepare(name: str, *args, **kwargs) -> _Launch:
    """The launch that the launcher ``name`` would run for these arguments."""
    launcher, prepare = _LAUNCHERS[name]
    bound = inspect.signature(launcher).bind(*args, **kwargs)
    bound.apply_defaults()
    return prepare(**bound.arguments)


def compile_ahead(launcher, *args, arch: int = 90, **kwargs) -> list[tuple[dict, object]]:
    """Compile, without running it, the kernel that ``launcher(*args, **kwargs)`` would launch, for an NVIDIA GPU of
    compute capability ``arch`` (89 Ada, 90 Hopper, 100 Blackwell…): no GPU is needed, as Triton lowers the kernel to
    PTX and assembles it with the ptxas it bundles. So compile errors, the tensor-core instructions chosen, register
    spills and shared memory show on any machine (:func:`kernel_stats`).

    ``launcher`` is :func:`act_codes`, :func:`conv2d_fp8` or :func:`linear_fp8`, with its usual arguments; tensors may
    be on the CPU, since only their dtypes, strides and alignment (on which Triton specializes, as at launch time)
    matter. Returns ``(config, compiled)`` for each block configuration the launch can use: every autotuning
    candidate when the blocks are left to the autotuner. Uses Triton internals (checked with Triton 3.6 and 3.9).
    """
    name = next((name for name, (f, _) in _LAUNCHERS.items() if f is launcher), None)
    if name is None:
        raise ValueError(f"launcher must be one of {list(_LAUNCHERS)} from msfp.triton_kernels, got {launcher!r}")
    return _compile(_prepare(name, *args, **kwargs), arch)


def _compile(launch: _Launch, arch: int, configs: slice = slice(None)) -> list[tuple[dict, object]]:
    """:func:`compile_ahead` of a prepared launch, for its block ``configs`` (all by default)."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    return [(config, triton.compile(source, target=target, options=options.__dict__))
            for config, source, options in _sources(launch, arch, configs)]


def _sources(launch: _Launch, arch: int, configs: slice = slice(None)):
    """``(config, source, options)`` that Triton compiles for each block configuration ``configs`` of a launch: the
    ``ASTSource`` and options its JIT builds at launch time, and whose hashes key its cache."""
    if not isinstance(arch, int) or arch < 89:
        raise ValueError(f"FP8 tensor cores need compute capability ≥ 89 (8.9, Ada), got arch={arch!r}")
    launch.check_gpu_blocks()
    if launch.kernel is None:
        raise ValueError("nothing to compile: the output is empty")
    try:
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        raise RuntimeError(f"compile_ahead needs Triton's compiler internals (as in Triton 3.6–3.9), missing "
                           f"here: {e}") from e
    if not hasattr(JITFunction, "_pack_args"):  # Triton 3.4 and older bind arguments differently
        raise RuntimeError(f"compile_ahead needs Triton's compiler internals (as in Triton 3.6–3.9); Triton "
                           f"{triton.__version__} has no JITFunction._pack_args")
    # Unwrap autotuner → JIT (or, under TRITON_INTERPRET=1, interpreted) function → Python function, and compile a
    # JITFunction of that source whatever mode the module was imported in.
    fn = launch.kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    kernel, backend, bind = _binder(fn, arch)
    sources = []
    for config in launch.configs[configs]:
        flags = {**launch.flags, **config}
        if launch.configure is not None:
            launch.configure(flags)
        bound, specialization, options = bind(*launch.args, **flags)
        options, signature, constexprs, attrs = kernel._pack_args(backend, flags, bound, specialization, options)
        sources.append((config, ASTSource(kernel, signature, constexprs, attrs), options))
    return sources


@functools.lru_cache(maxsize=None)
def _binder(fn, arch: int):
    """A JITFunction of ``fn``, the backend for ``arch`` and the JIT's argument binder (built once: they parse the
    kernel's source)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = JITFunction(fn)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return kernel, backend, create_function_from_signature(kernel.signature, kernel.params, backend)


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    """What Triton specializes a tensor argument on: its dtype and strides, and its alignment (the storage offset:
    allocations are aligned far beyond Triton's 16 bytes on both CPU and GPU); with its storage's size, which the
    launchers check for zero-bordered codes. Rebuilt as a CPU tensor to compile."""

    shape: tuple
    stride: tuple
    storage_offset: int
    storage_size: int  # elements
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> _TensorSpec:
        return cls(tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().nbytes() // t.element_size(),
                   t.dtype)

    def materialize(self) -> torch.Tensor:
        storage = torch.empty(self.storage_size, dtype=self.dtype)
        return storage.as_strided(self.shape, self.stride, self.storage_offset)


def _map_leaves(value, kind: type, fn):
    """``value`` with every ``kind`` inside its tuples, lists and dicts replaced by ``fn`` of it."""
    if isinstance(value, kind):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_leaves(v, kind, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_leaves(v, kind, fn) for k, v in value.items()}
    return value


def _prepare_recorded(launch: tuple) -> _Launch:
    """The launch of a recorded ``(launcher name, args, kwargs)``, its tensors rebuilt on the CPU."""
    name, args, kwargs = _map_leaves(launch, _TensorSpec, _TensorSpec.materialize)
    return _prepare(name, *args, **kwargs)


def _compile_recorded(job) -> str | None:
    """Compile block configuration ``index`` of a recorded launch, ``job = ((launcher name, arg specs, kwarg specs),
    index, arch)``; returns the error, if any."""
    launch, index, arch = job
    try:
        _compile(_prepare_recorded(launch), arch, slice(index, index + 1))
    except Exception as e:  # noqa: BLE001 — returned, so that the other kernels still compile
        return _error(launch[0], e)
    return None


def _error(launcher: str, e: Exception) -> str:
    return f"{launcher}: {type(e).__name__}: {e}".strip().splitlines()[0]


_compile_pools: dict[int, ProcessPoolExecutor] = {}


def _compile_pool(workers: int) -> ProcessPoolExecutor:
    # Kept for the process's lifetime: starting a worker imports torch and Triton (seconds), and a benchmark
    # precompiles before each of its sections.
    if workers not in _compile_pools:
        _compile_pools[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _compile_pools[workers]


def precompile(fn, *, arch: int | None = None, workers: int | None = None, count_only: bool = False) -> dict:
    """Compile every kernel that ``fn()`` launches, in parallel processes, into Triton's cache, where the launches
    then find them. Without it a model compiles its kernels one by one at their first launches (each takes a CPU
    core for about a second; an autotuned launch compiles every candidate).

    ``fn`` runs once with the launchers recording instead of launching: they check their arguments and return
    zero-filled outputs, so what ``fn`` computes is meaningless, only which kernels it launches counts. Each distinct
    kernel (launches of different shapes often share one; an autotuned launch has one per candidate) is compiled as
    :func:`compile_ahead` does, for ``arch`` (default: the current CUDA device's compute capability), by ``workers``
    processes (default: one per CPU; 0 compiles in this process). The processes are started once and kept; as with
    any use of multiprocessing, a script calling this needs an ``if __name__ == "__main__":`` guard. Returns the
    number of ``launches`` recorded, ``distinct`` ones, ``kernels`` compiled, ``seconds`` and the ``errors`` met (as
    the launches will meet them again). With ``count_only`` it compiles nothing: ``kernels`` is how many it would
    compile, and only errors met before compiling are reported.
    """
    if arch is None:
        if not torch.cuda.is_available():
            raise ValueError("precompile needs arch= (e.g. 90 for Hopper) when no CUDA device is present")
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int ≥ 0 (0: compile in this process), got {workers!r}")
    token = _recorded_launches.set([])
    try:
        fn()
        recorded = _recorded_launches.get()
    finally:
        _recorded_launches.reset(token)
    started = time.perf_counter()
    distinct = list({pickle.dumps(launch): launch for launch in recorded}.values())
    # One job per kernel: launches of different shapes often specialize alike, and an autotuned launch's
    # candidates compile in parallel too. Keyed as Triton's cache is, on the source and options hashes.
    jobs, errors = {}, set()
    for launch in distinct:
        try:
            sources = _sources(_prepare_recorded(launch), arch)
        except Exception as e:  # noqa: BLE001 — reported, so that the other launches still compile
            errors.add(_error(launch[0], e))
            continue
        for index, (_, source, options) in enumerate(sources):
            jobs.setdefault((source.hash(), options.hash()), (launch, index, arch))
    if count_only:
        results = [None] * len(jobs)
    elif workers:
        try:
            results = list(_compile_pool(workers).map(_compile_recorded, jobs.values()))
        except BrokenProcessPool:  # a worker died (out of memory, say): the next call starts a new pool
            del _compile_pools[workers]
            raise
    else:
        results = list(map(_compile_recorded, jobs.values()))
    return dict(launches=len(recorded), distinct=len(distinct), kernels=results.count(None), arch=arch,
                workers=workers, seconds=round(time.perf_counter() - started, 1),
                errors=sorted(errors | {e for e in results if e is not None}))


# Per-SM resources by compute capability (CUDA C++ Programming Guide, technical specifications): 32-bit registers,
# resident warps, resident blocks, shared memory (of which the system reserves 1 KB per block).
_SM_RESOURCES = {89: (65536, 48, 24, 100 * 1024), 90: (65536, 64, 32, 228 * 1024)}


def ctas_per_sm(arch: int, registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str] | None:
    """How many blocks of a kernel fit on one SM of compute capability ``arch`` at once, and which resource stops
    more (None for an architecture not in the table). One block per SM leaves nothing to run while a block fills its
    pipeline or writes its tile."""
    if arch not in _SM_RESOURCES:
        return None
    sm_registers, sm_warps, sm_blocks, sm_shared = _SM_RESOURCES[arch]
    per_warp = _cdiv(registers * 32, 256) * 256  # registers are allocated per warp, 256 at a time
    limits = {"registers": sm_registers // per_warp // num_warps,
              "shared memory": sm_shared // (shared_bytes + 1024),
              "warps": sm_warps // num_warps, "blocks": sm_blocks}
    resource = min(limits, key=limits.get)  # the first of the tied ones, in this order
    return limits[resource], resource


def kernel_stats(compiled) -> dict:
    """What a kernel from :func:`compile_ahead` will use on the GPU: registers per thread and spilled bytes (from
    ``ptxas -v``), shared memory, how many blocks fit on one SM at once and what limits them (:func:`ctas_per_sm`),
    the tensor-core instructions in its PTX, where Hopper's wgmma reads its first operand from (``"shared"`` memory,
    or ``"registers"`` after a copy out of shared memory), and its asynchronous global→shared copies (how Triton
    pipelines the K loop: their number and vector widths in bytes; TMA copies counted apart), and how many machine
    instructions its SASS holds (``nvdisasm``; a static count, so a loop body counts once), in all and in the
    innermost loop around its tensor-core instructions (the K loop of a GEMM; None without one)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptx = compiled.asm["ptx"]
    arch = compiled.metadata.target.arch
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", path, "-o", cubin],
                             capture_output=True, text=True)
        if log.returncode != 0:
            raise RuntimeError(f"ptxas failed on {compiled.name} for sm_{arch}:\n{log.stderr}")
        # Triton bundles nvdisasm beside ptxas.
        labels, instructions = _sass(subprocess.run([os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c", cubin],
                                                    capture_output=True, text=True, check=True).stdout)
    registers = re.search(r"Used (\d+) registers", log.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.stderr)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read register use from ptxas -v output:\n{log.stderr}")
    # cp.async.{ca,cg}.shared.global [dst], [src], BYTES(, src-size): 16 bytes is a full vector per thread.
    copy_widths = re.findall(r"\bcp\.async\.c[ag]\.shared\.global\S*\s*\[[^\]]*\],\s*\[[^\]]*\],"
                             r"\s*(0x[0-9a-fA-F]+|\d+)", ptx)
    mma = re.findall(r"\b((?:wgmma\.mma_async|mma\.sync|tcgen05\.mma)\.[\w.]+)", ptx)
    # wgmma's operands: the accumulator registers {…}, then A as registers {…} or as a shared-memory descriptor.
    wgmma_a = {"registers" if a == "{" else "shared"
               for a in re.findall(r"\bwgmma\.mma_async\S*\s*\{[^}]*\}\s*,\s*(\{|%)", ptx)}
    used = int(registers.group(1))
    occupancy = ctas_per_sm(arch, used, compiled.metadata.shared, compiled.metadata.num_warps)
    return {"arch": f"sm_{arch}", "registers": used, "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2)), "shared_bytes": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps, "ctas_per_sm": occupancy and occupancy[0],
            "ctas_per_sm_limited_by": occupancy and occupancy[1], "mma_instructions": sorted(set(mma)),
            "mma_operand_a": sorted(wgmma_a), "tma_copies": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
            "async_copies": len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
            "async_copy_bytes": sorted({int(n, 0) for n in copy_widths}),
            "sass_instructions": len(instructions),
            "mma_loop_instructions": _mma_loop_instructions(labels, instructions)}


def _sass(listing: str) -> tuple[dict[str, int], list[str]]:
    """``nvdisasm -c``'s listing as its labels (each with the index of the instruction it precedes) and its
    instructions, one per ``/*address*/`` line: ``/*0380*/  @!P0 MUFU.RCP R0, R41 ;``."""
    labels, instructions = {}, []
    for line in listing.splitlines():
        if label := re.match(r"\s*(\.L\w+):", line):
            labels[label.group(1)] = len(instructions)
        elif instruction := re.match(r"\s*/\*[0-9a-f]+\*/\s+(\S.*)", line):
            instructions.append(instruction.group(1))
    return labels, instructions


def _mma_loop_instructions(labels: dict[str, int], instructions: list[str]) -> int | None:
    """The instructions between a label and a branch back to it, for the shortest such loop holding a tensor-core
    instruction (``HMMA``/``QGMMA``/…)."""
    loops = []
    for end, instruction in enumerate(instructions):
        branch = re.search(r"\bBRA\b.*`\((\.L\w+)\)", instruction)
        start = labels.get(branch.group(1), end + 1) if branch else end + 1
        if start <= end and any(re.search(r"\b[A-Z]*MMA\.", i) for i in instructions[start:end + 1]):
            loops.append(end + 1 - start)
    return min(loops, default=None)
