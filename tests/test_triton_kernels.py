"""Triton FP8 kernels (msfp.triton_kernels) against torch references.

On a CUDA machine the kernels run on the GPU; without one they run on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set below before Triton is imported), so shapes stay tiny. Skipped without Triton.
"""

import argparse
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from msfp.formats import get_format  # noqa: E402
from msfp.fp8 import act_codes  # noqa: E402

# Kernels become interpreted or compiled when their module is imported; an import by an earlier test module, before
# TRITON_INTERPRET was set, would have made GPU kernels. Reloading rebuilds them in place (same module object).
if not CUDA and "msfp.triton_kernels" in sys.modules:
    tk = importlib.reload(sys.modules["msfp.triton_kernels"])
else:
    tk = importlib.import_module("msfp.triton_kernels")

DEV = "cuda" if CUDA else "cpu"
FP8 = torch.float8_e4m3fn
TRITON_3_6 = tk.triton.__version__.startswith("3.6.")  # the only version whose warp specialization compiles ours
only_triton_3_6 = pytest.mark.skipif(not TRITON_3_6, reason="warp specialization compiles with Triton 3.6 only")
FORMATS = ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "ufp4_e1m3", "ufp4_e2m2", "ufp4_e3m1", "ufp4_e4m0", "int4", "uint4"]
# Small tiles keep the interpreter fast and make the test shapes span several tiles with ragged edges.
ACT_BLOCKS = {"block_r": 16, "block_c": 16}
# GPUs need BLOCK_K ≥ 32 for FP8 and BLOCK_M = 64 per warp group for Hopper's wgmma.
GEMM_BLOCKS = {"block_m": 64, "block_n": 32, "block_k": 32} if CUDA else {"block_m": 16, "block_n": 16, "block_k": 16}


def reference_codes(x, fmt, scale, zero_point, shift=0):
    """The torch definition the kernel must match bit for bit (msfp.fp8.act_codes); NCHW input gives NHWC codes."""
    view = (-1,) + (1,) * (x.dim() - 1)
    codes = act_codes(x, fmt, scale.view(view), None if zero_point is None else zero_point.view(view), shift)
    return codes.permute(0, 2, 3, 1).contiguous() if x.dim() == 4 else codes


def assert_same_codes(codes, ref):
    assert codes.dtype == FP8 and codes.shape == ref.shape and codes.is_contiguous()
    got, want = codes.cpu().view(torch.uint8), ref.cpu().view(torch.uint8)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{len(bad)} codes differ, first at {bad[0].tolist()}: {got[tuple(bad[0])]:#04x} " \
                             f"vs reference {want[tuple(bad[0])]:#04x}"


def per_sample_params(fmt, n, gen):
    scale = (torch.rand(n, generator=gen) * 2 + 0.05).to(DEV)
    zp = (torch.randn(n, generator=gen) * 2).to(DEV) if fmt.needs_zero_point else None
    return scale, zp


@pytest.mark.parametrize("layout", ["nchw", "nchw_sliced", "channels_last", "2d"])
@pytest.mark.parametrize("name", FORMATS)
def test_act_codes_random_matches_reference(name, layout):
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{layout}".encode()))
    shape = (19, 21) if layout == "2d" else (3, 19, 3, 5)  # channels not a multiple of the 16-wide tile
    x = torch.randn(shape, generator=gen) * fmt.max_value
    x.view(-1)[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])  # saturation and signed zeros
    x = x.to(DEV)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "nchw_sliced":  # every other sample and channel of a larger tensor: contiguous planes, wider strides
        big = torch.zeros(2 * shape[0], 2 * shape[1], *shape[2:], device=DEV)
        big[::2, ::2] = x
        x = big[::2, ::2]
    scale, zp = per_sample_params(fmt, shape[0], gen)
    assert_same_codes(tk.act_codes(x, fmt, scale, zp, **ACT_BLOCKS), reference_codes(x, fmt, scale, zp))


@pytest.mark.parametrize("name", ["fp4_e2m1", "int4", "ufp4_e2m2", "uint4"])
def test_act_codes_zero_signs(name):
    """Negatives that round to zero keep their sign on signed grids (Triton's unary minus, 0 - q, once lost it on
    GPUs); an unsigned grid's zero is +0.0 on every device (torch.clamp's sign of a clamped -0.0 is not)."""
    fmt = get_format(name)
    x = torch.tensor([[-0.0, -0.1, 0.0, 0.1]], device=DEV)
    zero = torch.zeros(1, device=DEV) if fmt.needs_zero_point else None
    codes = tk.act_codes(x, fmt, torch.ones(1, device=DEV), zero, **ACT_BLOCKS).view(torch.uint8).cpu()
    expected = [0x80, 0x80, 0x00, 0x00] if fmt.signed else [0x00, 0x00, 0x00, 0x00]
    assert codes[0].tolist() == expected
    assert_same_codes(codes.view(FP8), reference_codes(x, fmt, torch.ones(1, device=DEV), zero).cpu())


def tie_values(fmt):
    """Unit-scale values on the grid, exactly at every midpoint between neighbours and one float32 ulp either side."""
    grid = fmt.values()
    mids = (grid[:-1] + grid[1:]) / 2  # exact in float32: neighbours differ by a small power-of-two multiple
    beside = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    top = fmt.max_value
    extra = torch.tensor([0.0, -0.0, top, -top, top * 1.5, -top * 1.5, 1e-30, -1e-30])
    return torch.cat([grid, mids, beside, extra])


@pytest.mark.parametrize("name", FORMATS)
def test_act_codes_ties_match_reference(name):
    fmt = get_format(name)
    u = tie_values(fmt)
    # Row 0: a power-of-two scale and no offset, so (x - z) / s reproduces every u exactly (ties and their
    # neighbours); row 1: a power-of-two scale and a zero point on a coarse grid, which reproduces the ties exactly;
    # row 2: a scale that is not a power of two, which lands next to the ties instead.
    scale = torch.tensor([0.25, 2.0, 0.3])
    zp = torch.tensor([0.0, -0.75, 0.1]) if fmt.needs_zero_point else torch.zeros(3)
    x = u[None, :] * scale[:, None] + zp[:, None]
    v = (x - zp[:, None]) / scale[:, None]
    finite, n = u.isfinite(), len(fmt.values())
    assert torch.equal(v[0, finite], u[finite]) and torch.equal(v[1, n:2 * n - 1], u[n:2 * n - 1]), "ties missed"
    zp = zp.to(DEV) if fmt.needs_zero_point else None
    x, scale = x.to(DEV), scale.to(DEV)
    assert_same_codes(tk.act_codes(x, fmt, scale, zp, **ACT_BLOCKS), reference_codes(x, fmt, scale, zp))
    # The same values through the NCHW path (channels = the tie values, one pixel).
    x4 = x[:, :, None, None]
    assert_same_codes(tk.act_codes(x4, fmt, scale, zp, **ACT_BLOCKS), reference_codes(x4, fmt, scale, zp))


@pytest.mark.parametrize("name", FORMATS + ["fp6_e3m2", "ufp6_e3m3", "fp5_e2m2"])
def test_act_codes_rounding_of_every_bit_pattern_class(name):
    """The kernel rounds on float32 bits (MBITS kept mantissa bits, half to even on the last) in normal binades and
    with float32's own addition where the step is fixed. Every binade from 2^-12 to past the clamp, every value of
    the top 7 mantissa bits (every kept prefix for MBITS ≤ 7) and the low 16 bits at 0, 1, just below, at and above
    their half and all ones: for every MBITS ≤ 7 that puts the dropped bits at zero, at their half and one float32
    ulp either side, with and without a carry into the exponent."""
    fmt = get_format(name)
    exponents = torch.arange(-12, 10, dtype=torch.int32)[:, None, None]
    prefixes = torch.arange(128, dtype=torch.int32)[None, :, None]
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int32)[None, None, :]
    bits = ((exponents + 127) << 23 | prefixes << 16 | low).flatten()
    x = torch.cat([bits, bits | -2**31]).view(torch.float32).view(-1, 128).to(DEV)
    one = torch.ones(x.shape[0], device=DEV)
    zero = torch.zeros_like(one) if fmt.needs_zero_point else None
    assert_same_codes(tk.act_codes(x, fmt, one, zero, block_r=64, block_c=128), reference_codes(x, fmt, one, zero))


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(FORMATS),
       data=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=40),
       scale=st.floats(2.0**-10, 2.0**10, width=32), zp=st.floats(-10, 10, width=32))
def test_act_codes_property(name, data, scale, zp):
    fmt = get_format(name)
    x = torch.tensor([data], dtype=torch.float32, device=DEV)
    s = torch.tensor([scale], device=DEV)
    z = torch.tensor([zp], device=DEV) if fmt.needs_zero_point else None
    assert_same_codes(tk.act_codes(x, fmt, s, z, **ACT_BLOCKS), reference_codes(x, fmt, s, z))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["fp4_e2m1", "uint4"])
def test_act_codes_half_inputs_and_per_tensor_scale(name, dtype):
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, 4, 4, generator=gen) * 3).to(dtype).to(DEV)
    scale = torch.tensor(0.7, device=DEV).expand(2)  # per-tensor: an expanded scalar (stride 0)
    zp = torch.tensor(-0.4, device=DEV).expand(2) if fmt.needs_zero_point else None
    assert_same_codes(tk.act_codes(x, fmt, scale, zp, **ACT_BLOCKS), reference_codes(x, fmt, scale, zp))


@pytest.mark.parametrize("name,shift", [("fp4_e2m1", -3), ("fp4_e2m1", 6), ("ufp4_e2m2", 2), ("int4", -1)])
def test_act_codes_shift_and_out(name, shift):
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 20, generator=gen) * 4).to(DEV)
    scale, zp = per_sample_params(fmt, 3, gen)
    out = torch.empty(3, 20, dtype=FP8, device=DEV)
    assert tk.act_codes(x, fmt, scale, zp, shift, out=out, **ACT_BLOCKS) is out
    assert_same_codes(out, reference_codes(x, fmt, scale, zp, shift))


def test_act_codes_nan_gives_nan_code():
    # The last two are NaNs with every payload bit set, which rounding on the float32 bits would carry into the sign.
    x = torch.tensor([[0x7FC00000, 0x3F800000, -0x400000, 0x7FFFFFFF, -1]], dtype=torch.int32).view(torch.float32)
    codes = tk.act_codes(x.to(DEV), "fp4_e2m1", torch.ones(1, device=DEV), None, **ACT_BLOCKS)
    # The reference gives NaN too (with the input's sign, which GPUs do not keep through arithmetic).
    assert codes.float().isnan().tolist() == [[True, False, True, True, True]]


def test_act_codes_rejects_bad_arguments():
    x = torch.randn(2, 4, device=DEV)
    one = torch.ones(2, device=DEV)
    with pytest.raises(ValueError, match=r"scale must have shape \(2,\)"):
        tk.act_codes(x, "fp4_e2m1", torch.ones(3, device=DEV), None)
    with pytest.raises(ValueError, match="scale must be torch.float32"):
        tk.act_codes(x, "fp4_e2m1", one.double(), None)
    with pytest.raises(ValueError, match="needs a zero_point"):
        tk.act_codes(x, "uint4", one, None)
    with pytest.raises(ValueError, match="takes no zero_point"):
        tk.act_codes(x, "int4", one, one)
    with pytest.raises(ValueError, match="not exactly representable"):
        tk.act_codes(x, "fp4_e2m1", one, None, shift=7)  # 6 · 2^7 > 448
    with pytest.raises(ValueError, match="not exactly representable"):
        tk.act_codes(x, "ufp4_e4m0", one, one, shift=-4)  # 2^-10 is below FP8's smallest step 2^-9
    with pytest.raises(ValueError, match=r"out must be a contiguous float8_e4m3fn tensor of shape \(2, 4\)"):
        tk.act_codes(x, "fp4_e2m1", one, None, out=torch.empty(4, 2, dtype=FP8, device=DEV))
    with pytest.raises(ValueError, match="4-D NCHW or 2-D"):
        tk.act_codes(x[0], "fp4_e2m1", one, None)
    with pytest.raises(ValueError, match=r"block_r and block_c must be powers of two \(tl.arange\), got \(48, "):
        tk.act_codes(x, "fp4_e2m1", one, None, block_r=48)  # failed inside the kernel
    tk.act_codes(x, "fp4_e2m1", one, None, shift=1)
    with pytest.raises(ValueError, match="shift must be an int"):  # accepted once the int's plan was made (1.0 == 1)
        tk.act_codes(x, "fp4_e2m1", one, None, shift=1.0)


def random_codes(shape, gen, spread=4.0):
    """Arbitrary finite FP8 values (normal and subnormal): any product of two is exact in float32."""
    return (torch.randn(shape, generator=gen) * spread).to(FP8)


def assert_within_accumulation_error(y, ref, mag, k, out_dtype=torch.float32, taps=1):
    # Every product of two E4M3 values is exact in fp32 (4-bit × 4-bit significands), so the only errors are fp32
    # roundings: summing k products in any order is off by at most (k - 1)·u·Σ|products| (u = 2^-24), and the
    # epilogue (two scale multiplies, the bias add, two roundings per tap of the zero point's share) adds at most
    # 3 + 2·taps more roundings of at most Σ|terms|; (k + 8 + 2·taps)·u·Σ|terms| bounds it all. Hopper's FP8 MMA
    # adds with fewer bits inside each BLOCK_K chunk; 2^-10 of Σ|terms| is a guess for the GPU, to be checked there.
    # A half-precision output adds its rounding.
    tol = (k + 8 + 2 * taps) * 2.0**-24 * mag
    if CUDA:
        tol = torch.maximum(tol, 2.0**-10 * mag)
    if out_dtype != torch.float32:
        tol = tol + torch.finfo(out_dtype).eps * ref.abs()
    err = (y.cpu().double() - ref).abs()
    worst = (err - tol).argmax()
    assert (err <= tol).all(), f"error {err.flatten()[worst]:.3g} > bound {tol.flatten()[worst]:.3g}"


def conv_operands(B, H, W, C, O, KH, KW, has_bias, has_zp, seed):
    """Random codes, scales, bias, zero points and per-tap weight sums for one convolution case (on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    x, w = random_codes((B, H, W, C), gen), random_codes((O, KH, KW, C), gen)
    a_scale, w_scale = torch.rand(B, generator=gen) + 0.1, torch.rand(O, generator=gen) * 0.1 + 0.01
    bias = torch.randn(O, generator=gen) if has_bias else None
    zp = torch.randn(B, generator=gen) if has_zp else None
    sums = torch.randn(O, KH, KW, generator=gen) * 10 if has_zp else None
    return x, w, a_scale, w_scale, bias, zp, sums


CONV_CASES = {
    # B, H, W, C, O, (KH, KW), stride, padding, dilation, bias, zero point
    "3x3_pad1": (2, 5, 5, 19, 20, (3, 3), 1, 1, 1, True, True),
    "3x3_stride2_downsample": (2, 6, 6, 16, 8, (3, 3), 2, 1, 1, False, False),
    "1x1": (3, 4, 3, 40, 24, (1, 1), 1, 0, 1, True, False),
    "3x3_dilation2": (1, 6, 6, 8, 16, (3, 3), 1, 2, 2, False, True),
    "3x2_asymmetric": (2, 5, 4, 12, 10, (3, 2), (2, 1), (1, 0), (1, 2), True, True),
    # The pointer loads keep one bit per tap for the padding: 32 taps use all of an int32's bits, 35 are too many.
    "4x8_32_taps": (1, 6, 9, 8, 8, (4, 8), 1, (1, 3), 1, True, True),
    "7x5_35_taps": (1, 7, 6, 8, 8, (7, 5), 1, (3, 2), 1, False, True),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_fp8_matches_float64_conv(case):
    B, H, W, C, O, (KH, KW), stride, padding, dilation, has_bias, has_zp = CONV_CASES[case]
    operands = conv_operands(B, H, W, C, O, KH, KW, has_bias, has_zp, seed=3)
    ref, mag = tk.conv2d_fp8_reference(*operands, stride, padding, dilation)
    to_dev = [t.to(DEV) if t is not None else None for t in operands]
    y = tk.conv2d_fp8(*to_dev, stride=stride, padding=padding, dilation=dilation, **GEMM_BLOCKS)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert_within_accumulation_error(y, ref, mag, KH * KW * C, taps=KH * KW)


@pytest.mark.parametrize("C", [19, 40, 64, 80, 128])
def test_channel_blocks_full_or_ragged_match_float64(C):
    # 64-deep channel blocks: where they fill C (64, 128) the loads take no channel mask, else (19, 40, 80) the last
    # block of each tap is masked past C. Output channels past O (24 of 32) read the last weight row, not stored.
    operands = conv_operands(2, 4, 5, C, 24, 3, 3, True, True, seed=C)
    ref, mag = tk.conv2d_fp8_reference(*operands, 1, 1, 1)
    to_dev = [t.to(DEV) if t is not None else None for t in operands]
    blocks = dict(GEMM_BLOCKS, block_n=32, block_k=64)
    for split_k in (1, 2):
        y = tk.conv2d_fp8(*to_dev, padding=1, split_k=split_k, **blocks)
        assert_within_accumulation_error(y, ref, mag, 9 * C + split_k, taps=9)
    assert_linear_fp8_matches_float64_matmul(10, C, 24, seed=C, **blocks)


def test_conv2d_fp8_strided_input_bf16_output_and_options():
    gen = torch.Generator().manual_seed(4)
    # An NHWC view of a contiguous NCHW tensor: the kernel follows strides, nothing is copied.
    x = random_codes((2, 33, 4, 4), gen).permute(0, 2, 3, 1)
    w = random_codes((16, 3, 3, 33), gen)
    a_scale, w_scale, bias = torch.rand(2, generator=gen) + 0.5, torch.rand(16, generator=gen) * 0.1, torch.randn(16)
    ref, mag = tk.conv2d_fp8_reference(x, w, a_scale, w_scale, bias, None, None, 1, 1, 1)
    args = [t.to(DEV) for t in (x, w, a_scale, w_scale, bias)]
    y = tk.conv2d_fp8(*args, padding=1, out_dtype=torch.bfloat16, precise_acc=False,
                      block_m=32, block_n=16, block_k=32)
    assert y.dtype == torch.bfloat16
    assert_within_accumulation_error(y, ref, mag, 9 * 33, torch.bfloat16)


def assert_linear_fp8_matches_float64_matmul(M, K, N, seed, with_terms=True, **options):
    """linear_fp8 on random (M, K) × (N, K) codes, with bias and zero point unless not ``with_terms``, within the
    accumulation bound of the float64 result."""
    gen = torch.Generator().manual_seed(seed)
    x, w = random_codes((M, K), gen), random_codes((N, K), gen)
    a_scale, w_scale = torch.rand(M, generator=gen) + 0.1, torch.rand(N, generator=gen) * 0.1
    bias, zp, sums = torch.randn(N, generator=gen), torch.randn(M, generator=gen), torch.randn(N, generator=gen)
    if not with_terms:
        bias = zp = sums = None
    ref, mag = tk.conv2d_fp8_reference(x[:, None, None], w[:, None, None], a_scale, w_scale, bias, zp,
                                       None if sums is None else sums[:, None, None], 1, 0, 1)
    args = [t.to(DEV) if t is not None else None for t in (x, w, a_scale, w_scale, bias, zp, sums)]
    y = tk.linear_fp8(*args, **options)
    assert y.shape == (M, N)
    assert_within_accumulation_error(y, ref.view(M, N), mag.view(M, N), K)


@pytest.mark.parametrize("with_terms", [False, True])
def test_linear_fp8_matches_float64_matmul(with_terms):
    assert_linear_fp8_matches_float64_matmul(5, 40, 24, seed=5, with_terms=with_terms, **GEMM_BLOCKS)


TMA_CASES = {
    # B, H, W, C, O, (KH, KW), padding, dilation, bias, zero point; channels multiples of 16 (TMA's 16-byte rule)
    "3x3_pad1_ragged": (3, 5, 7, 32, 20, (3, 3), 1, 1, True, True),
    "1x1_flattened": (2, 4, 3, 48, 24, (1, 1), 0, 1, True, True),
    "3x3_dilation2": (1, 6, 6, 16, 16, (3, 3), 2, 2, False, True),
    "3x2_asymmetric": (2, 5, 4, 32, 10, (3, 2), (1, 0), (1, 2), True, True),
    "3x3_on_1x1_image": (2, 1, 1, 32, 16, (3, 3), 1, 1, True, True),  # every tap but the centre is padding
}


def zero_bordered(x, padding):
    """``x`` (B, H, W, C) as the interior view of a zero-bordered buffer, as ``act_codes(…, pad=padding)`` gives."""
    (ph, pw), (B, H, W, C) = ((padding, padding) if isinstance(padding, int) else padding), x.shape
    buffer = torch.zeros(B, H + 2 * ph, W + 2 * pw, C, dtype=x.dtype, device=x.device)
    interior = buffer[:, ph:ph + H, pw:pw + W]
    interior.copy_(x)
    return interior


@pytest.mark.parametrize("tiles", ["boxes", "flat_rows"])
@pytest.mark.parametrize("block_m", [16, 64])  # tiles of 1 sample × 2 rows × 8 columns; of several samples
@pytest.mark.parametrize("case", TMA_CASES)
def test_conv2d_fp8_tma_matches_float64_conv(case, block_m, tiles):
    # Boxes read the unpadded input; flat rows read a zero-bordered copy and compute outputs anchored in the border
    # too, to be discarded.
    B, H, W, C, O, (KH, KW), padding, dilation, has_bias, has_zp = TMA_CASES[case]
    operands = conv_operands(B, H, W, C, O, KH, KW, has_bias, has_zp, seed=7)
    ref, mag = tk.conv2d_fp8_reference(*operands, 1, padding, dilation)
    to_dev = [t.to(DEV) if t is not None else None for t in operands]
    if tiles == "flat_rows":
        to_dev[0] = zero_bordered(to_dev[0], padding)
    # block_k 32 leaves a ragged last channel block for C = 16 and 48: TMA's out-of-bounds zeros must cover it.
    y = tk.conv2d_fp8(*to_dev, padding=padding, dilation=dilation, tma=True, zero_bordered=tiles == "flat_rows",
                      block_m=block_m, block_n=GEMM_BLOCKS["block_n"], block_k=32)
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    assert_within_accumulation_error(y, ref, mag, KH * KW * C, taps=KH * KW)


def test_linear_fp8_tma_matches_float64_matmul():
    assert_linear_fp8_matches_float64_matmul(37, 48, 24, seed=8, tma=True, **GEMM_BLOCKS)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loads", ["pointers", "tma_boxes", "tma_flat_rows"])
def test_split_k_matches_float64_conv(loads, out_dtype):
    # 9 taps × 1 channel block of 32 = 9 K iterations in 4 shares of 3: the last share is empty and adds nothing.
    gen = torch.Generator().manual_seed(9)
    B, H, W, C, O = 3, 5, 7, 32, 20
    x, w = random_codes((B, H, W, C), gen), random_codes((O, 3, 3, C), gen)
    a_scale, w_scale = torch.rand(B, generator=gen) + 0.1, torch.rand(O, generator=gen) * 0.1 + 0.01
    bias, zp, sums = torch.randn(O, generator=gen), torch.randn(B, generator=gen), torch.randn(O, 3, 3, generator=gen)
    ref, mag = tk.conv2d_fp8_reference(x, w, a_scale, w_scale, bias, zp, sums, 1, 1, 1)
    args = [t.to(DEV) for t in (x, w, a_scale, w_scale, bias, zp, sums)]
    tma, bordered = loads != "pointers", loads == "tma_flat_rows"
    if bordered:
        args[0] = zero_bordered(args[0], 1)
    y = tk.conv2d_fp8(*args, padding=1, out_dtype=out_dtype, tma=tma, zero_bordered=bordered, split_k=4,
                      **GEMM_BLOCKS)
    assert y.shape == ref.shape and y.dtype == out_dtype
    # Each share's partial sum is rounded once more when the shares are added.
    assert_within_accumulation_error(y, ref, mag, 9 * C + 4, out_dtype, taps=9)
    again = tk.conv2d_fp8(*args, padding=1, out_dtype=out_dtype, tma=tma, zero_bordered=bordered, split_k=4,
                          **GEMM_BLOCKS)
    assert torch.equal(y, again)  # the shares are added in a fixed order
    xl, wl = random_codes((5, 64), gen), random_codes((24, 64), gen)
    refl, magl = tk.conv2d_fp8_reference(xl[:, None, None], wl[:, None, None], a_scale[:1].expand(5),
                                         w_scale[:1].expand(24), None, None, None, 1, 0, 1)
    yl = tk.linear_fp8(xl.to(DEV), wl.to(DEV), a_scale[:1].expand(5).to(DEV), w_scale[:1].expand(24).to(DEV),
                       tma=tma, split_k=2, **GEMM_BLOCKS)
    assert yl.shape == (5, 24)
    assert_within_accumulation_error(yl, refl.view(5, 24), magl.view(5, 24), 64 + 2)
    with pytest.raises(ValueError, match="split_k must be a positive int, got 0"):
        tk.conv2d_fp8(*args, padding=1, split_k=0)


def test_tma_rejects_what_it_cannot_load():
    x, w = torch.zeros(1, 4, 4, 32, dtype=FP8, device=DEV), torch.zeros(16, 3, 3, 32, dtype=FP8, device=DEV)
    one, sixteen = torch.ones(1, device=DEV), torch.ones(16, device=DEV)
    assert tk.tma_unsupported(x, w) is None
    with pytest.raises(ValueError, match=r"tma=True\): stride \(2, 2\): TMA tiles need stride 1"):
        tk.conv2d_fp8(x, w, one, sixteen, stride=2, tma=True)
    with pytest.raises(ValueError, match=r"x_codes \(1, 4, 4, 8\) with strides \(128, 32, 8, 1\): TMA needs"):
        tk.conv2d_fp8(x[..., :8].contiguous(), w[..., :8].contiguous(), one, sixteen, tma=True)
    with pytest.raises(ValueError, match="x_codes .* channels innermost"):  # an NHWC view of NCHW memory
        tk.conv2d_fp8(x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), w, one, sixteen, tma=True)
    with pytest.raises(ValueError, match=r"w_codes .* TMA reads it as \(O, KH\*KW, C\)"):
        tk.conv2d_fp8(x, w.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3), one, sixteen, tma=True)
    for tma in (True, False):  # without TMA it failed inside the kernel ("arange's range must be a power of 2")
        with pytest.raises(ValueError, match=r"block_m, block_n, block_k must be given together and each be a power "
                                             r"of two ≥ 16 \(tl.arange\), got \(48"):
            tk.conv2d_fp8(x, w, one, sixteen, tma=tma, block_m=48, block_n=16, block_k=32)
    with pytest.raises(ValueError, match=r"zero_bordered: x_codes \(1, 4, 4, 32\) with strides \(512, 128, 32, 1\) "
                                         r"is not the interior of a contiguous \(1, 6, 6, 32\) buffer"):
        tk.conv2d_fp8(x, w, one, sixteen, padding=1, tma=True, zero_bordered=True)
    with pytest.raises(ValueError, match=r"not the interior"):  # a border narrower than the padding
        tk.conv2d_fp8(zero_bordered(x, 1), w, one, sixteen, padding=2, tma=True, zero_bordered=True)


def test_launches_check_once_per_layout_and_every_call_what_the_layout_does_not_fix():
    # A launcher checks its arguments once per layout (dtypes, shapes, strides, devices, 16-byte alignment) and
    # keeps the launch's plan; a failed check stores nothing, and what the data decides (whether a zero-bordered
    # input's storage holds its border) is checked on every call.
    x, w, a_scale, w_scale, bias, zp, sums = conv_operands(1, 4, 4, 32, 16, 3, 3, True, True, seed=11)
    ref, mag = tk.conv2d_fp8_reference(x, w, a_scale, w_scale, bias, zp, sums, 1, 1, 1)
    rest = [t.to(DEV) for t in (w, a_scale, w_scale, bias, zp, sums)]
    blocks = dict(block_m=16, block_n=16, block_k=32)

    def conv(codes, **options):
        return tk.conv2d_fp8(codes, *rest, padding=1, **blocks, **options)

    bordered = zero_bordered(x.to(DEV), 1)
    plans = len(tk._conv_plans)
    assert_within_accumulation_error(conv(bordered, tma=True, zero_bordered=True), ref, mag, 9 * 32, taps=9)
    assert len(tk._conv_plans) in (plans, plans + 1)  # another test may have made this plan
    plans = len(tk._conv_plans)
    again = zero_bordered(x.to(DEV), 1)  # the same layout, other storage: the same plan
    assert_within_accumulation_error(conv(again, tma=True, zero_bordered=True), ref, mag, 9 * 32, taps=9)
    assert len(tk._conv_plans) == plans
    # The same layout (shape, strides, alignment) at the start of its buffer: no border before it.
    unbordered = torch.zeros(1, 6, 6, 32, dtype=FP8, device=DEV)[:, :4, :4]
    for _ in range(2):
        with pytest.raises(ValueError, match="is not the interior"):
            conv(unbordered, tma=True, zero_bordered=True)
    # A new layout (an NHWC view of NCHW memory) makes a new plan; the kernel follows its strides.
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1).to(DEV)
    assert_within_accumulation_error(conv(strided), ref, mag, 9 * 32, taps=9)
    assert_within_accumulation_error(conv(x.to(DEV)), ref, mag, 9 * 32, taps=9)
    assert len(tk._conv_plans) >= plans + 1
    plans, act_plans = len(tk._conv_plans), len(tk._act_plans)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"w_scale must have shape \(16,\)"):
            tk.conv2d_fp8(x.to(DEV), rest[0], rest[1], rest[1], padding=1, **blocks)
        with pytest.raises(ValueError, match="scale must be torch.float32"):
            tk.act_codes(torch.zeros(2, 32, device=DEV), "fp4_e2m1", torch.ones(2, dtype=torch.float64, device=DEV),
                         None)
    assert (len(tk._conv_plans), len(tk._act_plans)) == (plans, act_plans)


def test_act_codes_pad_writes_inside_a_zero_border():
    gen = torch.Generator().manual_seed(10)
    x = (torch.randn(2, 32, 5, 6, generator=gen) * 3).to(DEV)
    scale, zp = per_sample_params(get_format("ufp4_e2m2"), 2, gen)
    codes = tk.act_codes(x, "ufp4_e2m2", scale, zp, 2, pad=(1, 2), **ACT_BLOCKS)
    assert codes.shape == (2, 5, 6, 32)
    assert_same_codes(codes.contiguous(), reference_codes(x, get_format("ufp4_e2m2"), scale, zp, 2))
    buffer = tk._zero_bordered_buffer(codes, 1, 2)
    assert buffer.shape == (2, 7, 10, 32) and buffer.is_contiguous()
    border = torch.ones(2, 7, 10, 32, dtype=torch.bool, device=DEV)
    border[:, 1:6, 2:8] = False
    assert (buffer.view(torch.uint8)[border] == 0).all()  # +0.0 codes
    with pytest.raises(ValueError, match="pad needs a 4-D input, no out"):
        tk.act_codes(x[:, :, 0, 0], "ufp4_e2m2", scale, zp, pad=1)


def test_gemm_launchers_reject_bad_arguments():
    x, w = torch.zeros(1, 4, 4, 8, dtype=FP8, device=DEV), torch.zeros(6, 3, 3, 8, dtype=FP8, device=DEV)
    one, six = torch.ones(1, device=DEV), torch.ones(6, device=DEV)
    with pytest.raises(ValueError, match="groups=1 only"):
        tk.conv2d_fp8(x, w, one, six, groups=2)
    with pytest.raises(ValueError, match=r"w_codes must have shape \(O, KH, KW, 8\) .* got \(6, 3, 3, 4\) \(grouped "
                                         r"convolutions are unsupported\)"):
        tk.conv2d_fp8(x, w[..., :4], one, six)  # what groups=2 would give
    with pytest.raises(ValueError, match=r"w_codes must have shape \(O, KH, KW, 8\) .* got \(6, 3, 3, 5\)$"):
        tk.conv2d_fp8(x, w[..., :5], one, six)  # no grouping gives 8 channels from 5
    with pytest.raises(ValueError, match="x_codes must be a 4-D float8_e4m3fn"):
        tk.conv2d_fp8(x.float(), w, one, six)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(6,\)"):
        tk.conv2d_fp8(x, w, one, one)
    with pytest.raises(ValueError, match="zp and zp_weight_sums must be given together"):
        tk.conv2d_fp8(x, w, one, six, zp=one)
    with pytest.raises(ValueError, match=r"zp_weight_sums must be a floating-point tensor of shape \(6, 3, 3\)"):
        tk.conv2d_fp8(x, w, one, six, zp=one, zp_weight_sums=torch.zeros(2, 2, 6, device=DEV))
    with pytest.raises(ValueError, match="must be given together and each be a power of two ≥ 16"):
        tk.conv2d_fp8(x, w, one, six, block_m=16)
    tk.conv2d_fp8(x, w, one, six, split_k=2, **GEMM_BLOCKS)
    with pytest.raises(ValueError, match="split_k must be a positive int, got 2.0"):  # was a TypeError inside torch
        tk.conv2d_fp8(x, w, one, six, split_k=2.0, **GEMM_BLOCKS)
    # A numpy integer is an int (it was "not iterable"); a bool is not.
    assert tk.conv2d_fp8(x, w, one, six, padding=np.int64(1), **GEMM_BLOCKS).shape == (1, 4, 4, 6)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints, got True"):
        tk.conv2d_fp8(x, w, one, six, stride=True)
    with pytest.raises(ValueError, match="maxnreg and warp_specialize need fixed blocks"):
        tk.conv2d_fp8(x, w, one, six, maxnreg=128)
    with pytest.raises(ValueError, match=r"w_codes must have shape \(N, 8\)"):
        tk.linear_fp8(x[0, 0], w[:, 0, 0, :4], torch.ones(4, device=DEV), six)


@pytest.mark.skipif(not CUDA, reason="autotuning times kernels on a GPU")
@pytest.mark.parametrize("tma", [False, True])
def test_conv2d_fp8_autotuned_default_blocks(tma):
    gen = torch.Generator().manual_seed(6)
    x, w = random_codes((2, 16, 16, 64), gen), random_codes((128, 3, 3, 64), gen)
    a_scale, w_scale, bias = torch.rand(2, generator=gen) + 0.5, torch.rand(128, generator=gen) * 0.01, torch.randn(128)
    ref, mag = tk.conv2d_fp8_reference(x, w, a_scale, w_scale, bias, None, None, 1, 1, 1)
    y = tk.conv2d_fp8(*[t.to(DEV) for t in (x, w, a_scale, w_scale, bias)], padding=1, tma=tma)
    assert_within_accumulation_error(y, ref, mag, 9 * 64)
    # Again: the autotuner's choice, launched without it (_Launch._run_tuned; with TMA, on new descriptors whose
    # blocks it sets as the autotuner's hook did), computes the same bits.
    again = tk.conv2d_fp8(*[t.to(DEV) for t in (x, w, a_scale, w_scale, bias)], padding=1, tma=tma)
    assert torch.equal(again, y)


def record_gemm_launches(monkeypatch, **blocks) -> list[dict]:
    """Run the GEMM launchers with ``blocks`` fixed, recording each launch's load options and input shape."""
    launches = []
    for launcher in ("conv2d_fp8", "linear_fp8"):
        run = functools.partial(getattr(tk, launcher), **blocks)
        monkeypatch.setattr(tk, launcher, lambda x_codes, *a, run=run, **k: launches.append(
            dict(tma=k["tma"], zero_bordered=k.get("zero_bordered", False), split_k=k["split_k"],
                 shape=tuple(x_codes.shape))) or run(x_codes, *a, **k))
    return launches


def check_fp8_layers_on_the_kernels(q, inputs: dict, **options) -> tuple[int, set]:
    """Every FP8 layer of the quantized model ``q`` on the kernels (``options`` for :class:`Fp8Layer`) against the
    same layer emulated in torch, on its recorded input. Returns how many were checked and which layers stay
    fake-quant. Same codes, same exact products; only fp32 summation order differs (≤ K·2^-24 relative to
    Σ|terms|)."""
    from msfp.fp8 import Fp8Layer
    from msfp.surgery import quant_layers

    checked, kept = 0, set()
    for name, layer in quant_layers(q).items():
        try:
            emulated = Fp8Layer(layer, use_kernels=False)
            kernels = Fp8Layer(layer, use_kernels=True, **options)
        except ValueError:
            kept.add(name)
            continue
        with torch.no_grad():
            want, got = emulated(inputs[name]), kernels(inputs[name])
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
        checked += 1
    return checked, kept


@pytest.mark.parametrize("tma,split_k", [(None, 1), ("boxes", 1), ("rows", 1), (None, 2), ("rows", 3)])
@pytest.mark.parametrize("family", ["unet", "dit"])
def test_fp8_layers_on_the_kernels_equal_the_emulated_path(family, tma, split_k, monkeypatch):
    # Whole calibrated tiny models: every W4A4 layer (zero-point convs with padded borders, stride 2, 1×1 shortcuts,
    # 3-D linear inputs) through act_codes + conv2d_fp8/linear_fp8 against the same Fp8Layer emulated in torch;
    # with tma, the layers whose shapes allow it load through TMA descriptors (padded convolutions' inputs in boxes,
    # or inside a zero border as flat rows), the others as before; with split_k, every GEMM in shares.
    import copy

    import msfp
    from test_fp8 import layer_inputs
    from tiny_models import scheduler, tiny_dit, tiny_unet

    launches = record_gemm_launches(monkeypatch, **GEMM_BLOCKS)
    build, shape, cond = {"unet": (tiny_unet, (1, 8, 8), {}),
                          "dit": (tiny_dit, (4, 8, 8), {"class_labels": torch.tensor([0, 1, 2])})}[family]
    fp = build().to(DEV)
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=3, disable=True)
    torch.manual_seed(0)
    x, t = torch.randn(3, *shape, device=DEV), torch.tensor([5, 400, 999], device=DEV)
    inputs = layer_inputs(q, x, t, **{k: v.to(DEV) for k, v in cond.items()})
    q.msfp_context.set_timesteps(t, 3, x.device)
    checked, _ = check_fp8_layers_on_the_kernels(q, inputs, tma=tma, split_k=split_k)
    assert checked >= 6
    tma_calls = [launch["tma"] for launch in launches]
    # The tiny models' 16-channel layers qualify for TMA; their 8-channel ones do not (16-byte rows).
    assert any(tma_calls) == (tma is not None) and not all(tma_calls)
    # The UNet's padded 16-channel convolutions get zero-bordered codes with the flat-row tiling (the DiT has none).
    assert any(launch["zero_bordered"] for launch in launches) == (tma == "rows" and family == "unet")
    assert {launch["split_k"] for launch in launches} == {split_k}


@pytest.mark.parametrize("tma", ["boxes", "rows"])
def test_a_1x1_convolution_built_directly_loads_through_tma(tma, monkeypatch):
    # contiguous() left the (K, O, 1, 1, C) weight codes' size-1 dims at stride 1, which TMA refuses: a layer built
    # directly (as check_fp8_layers_on_the_kernels does; convert_to_fp8's .to() re-viewed them) fell back to pointer
    # loads, with a reason that blamed its channel count.
    from msfp.fp8 import Fp8Layer
    from msfp.layers import QuantContext, QuantLayer

    launches = record_gemm_launches(monkeypatch, **GEMM_BLOCKS)
    torch.manual_seed(0)
    layer = QuantLayer(torch.nn.Conv2d(16, 32, 1), "conv_shortcut", "fp4_e2m1", "ufp4_e2m2", QuantContext()).to(DEV)
    with torch.no_grad():
        layer.weight_quantizer.scale.copy_(layer.weight.abs().amax((1, 2, 3)) / 6)
        layer.act_quantizer.scale.fill_(0.3)
        layer.act_quantizer.zero_point.fill_(-0.5)
    kernels = Fp8Layer(layer, use_kernels=True, tma=tma)
    assert tk.tma_unsupported(torch.zeros(2, 4, 4, 16, dtype=FP8, device=DEV), kernels.weight_codes[0]) is None
    x = torch.randn(2, 16, 4, 4, device=DEV)
    with torch.no_grad():
        want, got = Fp8Layer(layer, use_kernels=False)(x), kernels(x)
    assert [launch["tma"] for launch in launches] == [True]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("tma", ["boxes", "rows"])
def test_default_model_fp8_layers_at_gpu_tiles_equal_the_emulated_path(tma, monkeypatch):
    # The shipped model's shapes (32–192 channels, 32×32 down to 8×8, attention linears) at the first autotuning
    # candidate's tiles, as on a GPU: ragged channel blocks, stride-2 convolutions falling back to pointer loads, and
    # 8×8 outputs whose 128-pixel TMA tiles span two samples. The tiny models' tests use 16-wide tiles.
    import copy

    import msfp
    from msfp.models import load_model
    from test_fp8 import layer_inputs

    block_m, block_n, block_k = tk._TILES[0][:3]
    launches = record_gemm_launches(monkeypatch, block_m=block_m, block_n=block_n, block_k=block_k)
    fp, scheduler = load_model("default")
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp").to(DEV)
    msfp.calibrate(q, fp.to(DEV), scheduler, num_samples=4, num_steps=3, disable=True)
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 32, 32, device=DEV), torch.tensor([10, 700], device=DEV)
    inputs = layer_inputs(q, x, t)
    q.msfp_context.set_timesteps(t, 2, x.device)
    checked, kept = check_fp8_layers_on_the_kernels(q, inputs, tma=tma)
    assert kept == {"conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_out"}  # 8-bit edges
    assert checked == len(launches) > 80
    tma_shapes = [launch["shape"] for launch in launches if launch["tma"]]
    assert 0 < len(tma_shapes) < checked  # stride-2 convolutions keep pointer loads
    assert min(s[1] * s[2] for s in tma_shapes if len(s) == 4) < block_m  # tiles spanning two samples
    assert any(launch["zero_bordered"] for launch in launches) == (tma == "rows")


def scaled_mm_layer(timestep_groups):
    import msfp
    from msfp.surgery import quant_layers

    torch.manual_seed(0)
    model = msfp.quantize(torch.nn.Sequential(torch.nn.Linear(64, 48)).to(DEV),
                          msfp.QuantConfig(weight_formats=["fp4_e2m1"], act_formats=["ufp4_e2m2"], aal_act_formats=[],
                                           eight_bit_layers=[], act_timestep_groups=timestep_groups))
    layer = quant_layers(model)["0"]
    x = torch.randn(4, 5, 64, device=DEV) + 0.5
    layer.weight_quantizer.initialize(layer.weight.detach())
    layer.act_quantizer.initialize(x.flatten())
    with torch.no_grad():  # groups with their own scale and zero point, so per-row terms are really per row
        layer.act_quantizer.scale.mul_(torch.linspace(1, 1.5, timestep_groups, device=DEV))
        layer.act_quantizer.zero_point.add_(torch.linspace(0, -0.3, timestep_groups, device=DEV))
    model.msfp_context.set_timesteps(torch.tensor([5, 300, 600, 999], device=DEV), 4, DEV)
    return layer, x.bfloat16()


@pytest.mark.parametrize("timestep_groups", [1, 4])
def test_linear_gemm_through_scaled_mm_equals_the_emulated_path(timestep_groups, monkeypatch):
    from msfp.fp8 import Fp8Layer

    layer, x = scaled_mm_layer(timestep_groups)
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(k["scale_a"].shape) or scaled_mm(*a, **k))
    fp8 = Fp8Layer(layer, use_kernels=True, linear_gemm="scaled_mm")
    with torch.no_grad():
        want = Fp8Layer(layer, use_kernels=False)(x)
        got = fp8(x)
    assert calls == [(20, 1)], "the GEMM did not go through torch._scaled_mm with one scale per row"
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape == (4, 5, 48)
    # Each bfloat16 rounding errs by at most 2^-8 of its value. Both paths round the output once. _scaled_mm also
    # rounds its bias operand (bias + z_a·corr), or, with per-row zero points, its result before z_a·corr is added;
    # either can be larger than the output, by at most max|bias| + max|z_a·corr|.
    zero_term = fp8.act_zero_point.abs().max() * fp8._zero_point_correction(0, (), kernels=True).abs().max()
    atol = 2**-8 * (3 * want.abs().max() + fp8.bias.abs().max() + zero_term).item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_launch_on_the_gpu_that_holds_their_tensors():
    # Triton launches on the current device: a layer on cuda:1 ran on cuda:0 with cuda:1's pointers.
    from msfp.fp8 import Fp8Layer

    layer, x = scaled_mm_layer(1)
    layer, x = layer.to("cuda:1"), x.float().to("cuda:1")
    with torch.no_grad(), torch.cuda.device(0):
        want = Fp8Layer(layer, use_kernels=False)(x)
        got = Fp8Layer(layer, use_kernels=True)(x)
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_scaled_mm_is_only_used_where_it_applies(monkeypatch):
    from msfp.fp8 import Fp8Layer

    layer, x = scaled_mm_layer(1)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("this input must use the Triton GEMM"))
    monkeypatch.setattr(tk, "linear_fp8", functools.partial(tk.linear_fp8, **GEMM_BLOCKS))
    with torch.no_grad():
        fp8 = Fp8Layer(layer, use_kernels=True, linear_gemm="scaled_mm")
        assert fp8(x.float()).dtype == torch.float32  # bfloat16 output only: the Triton kernel serves float32
        # No tokens, no rows: the per-tensor zero point's first row (zero[:1]) did not exist.
        assert fp8(x[:, :0]).shape == (4, 0, 48)
    assert "torch._scaled_mm" in repr(fp8)
    with pytest.raises(ValueError, match=r"0: unknown linear_gemm 'cublas'"):
        Fp8Layer(layer, linear_gemm="cublas")
    with pytest.raises(ValueError, match=r"0: unknown tma tiling True; expected one of \(None, 'boxes', 'rows'\)"):
        Fp8Layer(layer, tma=True)


def test_fast_accumulation_setting_reaches_both_linear_gemms(monkeypatch):
    from msfp.fp8 import Fp8Layer

    layer, x = scaled_mm_layer(1)
    seen, scaled_mm, linear_fp8 = [], torch._scaled_mm, tk.linear_fp8
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: seen.append(("scaled_mm", k["use_fast_accum"]))
                        or scaled_mm(*a, **k))
    monkeypatch.setattr(tk, "linear_fp8", lambda *a, **k: seen.append(("triton", k["precise_acc"]))
                        or linear_fp8(*a, **k, **GEMM_BLOCKS))
    with torch.no_grad():
        for gemm in ("triton", "scaled_mm"):
            Fp8Layer(layer, use_kernels=True, linear_gemm=gemm, precise_acc=False)(x)
            Fp8Layer(layer, use_kernels=True, linear_gemm=gemm)(x)  # fp32 sums by default
    assert seen == [("triton", False), ("triton", True), ("scaled_mm", True), ("scaled_mm", False)]
    with pytest.raises(ValueError, match="precise_acc must be True or False, got 'no'"):
        Fp8Layer(layer, use_kernels=True, precise_acc="no")


def test_split_k_setting_reaches_the_gemm(monkeypatch):
    from msfp.fp8 import Fp8Layer

    layer, x = scaled_mm_layer(1)
    x = x.float()  # float32 output: the Triton GEMM, compared within fp32 summation
    seen, linear_fp8 = [], tk.linear_fp8
    monkeypatch.setattr(tk, "linear_fp8", lambda *a, **k: seen.append(k["split_k"]) or linear_fp8(*a, **k,
                                                                                                  **GEMM_BLOCKS))
    with torch.no_grad():
        want = Fp8Layer(layer, use_kernels=False)(x)
        got = Fp8Layer(layer, use_kernels=True, split_k=3)(x)
        Fp8Layer(layer, use_kernels=True, split_k="auto")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # "auto": 20 rows × 48 channels is one 128×128 tile, so as many shares as SMs allow (at most 4); 1 off CUDA.
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count if CUDA else 0
    assert seen == [3, min(4, sms) if CUDA else 1]
    with pytest.raises(ValueError, match=r"0: split_k must be a positive int or 'auto', got 0"):
        Fp8Layer(layer, split_k=0)


# Ahead-of-time compilation for real GPUs (no GPU needed: Triton's compiler and bundled ptxas). Shapes are
# Stable-Diffusion-1.5-like, since Triton specializes on divisibility; only dtypes, strides and alignment matter.
H100_MAX_SHARED = 227 * 1024  # opt-in shared memory per block on sm_90


def fp8_zeros(*shape):
    return torch.zeros(shape, dtype=FP8)


def sd_conv_args(with_zp=True):
    B, H, W, C, O = 2, 32, 32, 320, 320
    zp_args = (torch.zeros(B), torch.zeros(O, 3, 3)) if with_zp else (None, None)
    return (fp8_zeros(B, H, W, C), fp8_zeros(O, 3, 3, C), torch.ones(B), torch.ones(O), torch.zeros(O), *zp_args)


def test_gemm_kernels_compile_for_hopper_fp8_tensor_cores():
    # Every autotuning candidate of the convolution, and a linear: FP8 wgmma (not an emulation or FMA fallback),
    # a pipelined K loop (asynchronous copies of full 16-byte vectors), no register spills, shared memory within the
    # H100's limit.
    compiled = tk.compile_ahead(tk.conv2d_fp8, *sd_conv_args(), padding=1, out_dtype=torch.bfloat16)
    compiled += tk.compile_ahead(tk.linear_fp8, fp8_zeros(256, 320), fp8_zeros(1280, 320), torch.ones(256),
                                 torch.ones(1280), torch.zeros(1280), block_m=128, block_n=128, block_k=64,
                                 num_warps=8, num_stages=3)
    assert len(compiled) == len(tk._conv_fp8_tuned[64].configs) + 1  # 320 channels fill 64-deep blocks
    for config, kernel in compiled:
        stats = tk.kernel_stats(kernel)
        assert stats["arch"] == "sm_90"
        assert stats["mma_instructions"] and all(i.startswith("wgmma.mma_async") and ".e4m3.e4m3" in i
                                                 for i in stats["mma_instructions"]), (config, stats)
        assert stats["async_copies"] > 0 and stats["async_copy_bytes"] == [16], (config, stats)
        assert stats["spill_store_bytes"] == stats["spill_load_bytes"] == 0, (config, stats)
        assert 0 < stats["shared_bytes"] <= H100_MAX_SHARED, (config, stats)
        assert stats["ctas_per_sm"] >= 1, (config, stats)  # at least one block fits on an SM
        assert 0 < stats["mma_loop_instructions"] < stats["sass_instructions"], (config, stats)  # a K loop around wgmma
        assert kernel.metadata.enable_fp_fusion is True


def test_tma_kernels_compile_for_hopper():
    # Every TMA autotuning candidate at an SD-1.5 3×3 shape, and a linear: TMA copies (no per-thread loads) into FP8
    # wgmma, no spills. Tiles spanning several output rows reach wgmma through registers (Triton keeps a reshape of
    # a multi-row box out of shared-memory descriptors); a linear's tile is one row block and stays in shared memory.
    compiled = tk.compile_ahead(tk.conv2d_fp8, *sd_conv_args(), padding=1, out_dtype=torch.bfloat16, tma=True)
    assert len(compiled) == len(tk._conv_fp8_tma_tuned.configs)
    [linear] = tk.compile_ahead(tk.linear_fp8, fp8_zeros(256, 320), fp8_zeros(1280, 320), torch.ones(256),
                                torch.ones(1280), torch.zeros(1280), tma=True, block_m=128, block_n=128, block_k=64,
                                num_warps=8, num_stages=3)
    for config, kernel in compiled + [linear]:
        stats = tk.kernel_stats(kernel)
        assert stats["mma_instructions"] and all(i.startswith("wgmma.mma_async") and ".e4m3.e4m3" in i
                                                 for i in stats["mma_instructions"]), (config, stats)
        assert stats["tma_copies"] > 0 and stats["async_copies"] == 0, (config, stats)
        assert stats["spill_store_bytes"] == stats["spill_load_bytes"] == 0, (config, stats)
        assert 0 < stats["shared_bytes"] <= H100_MAX_SHARED, (config, stats)
    assert tk.kernel_stats(linear[1])["mma_operand_a"] == ["shared"]
    # 32×32 outputs in 128-pixel blocks: 4 rows of 32, through registers.
    assert tk.kernel_stats(compiled[0][1])["mma_operand_a"] == ["registers"]
    # Flat rows of a zero-bordered input: both operands from shared memory.
    x, *rest = sd_conv_args()
    [(_, flat)] = tk.compile_ahead(tk.conv2d_fp8, zero_bordered(x, 1), *rest, padding=1, out_dtype=torch.bfloat16,
                                   tma=True, zero_bordered=True, block_m=128, block_n=128, block_k=64, num_warps=8,
                                   num_stages=3)
    stats = tk.kernel_stats(flat)
    assert stats["mma_operand_a"] == ["shared"] and stats["tma_copies"] > 0 and stats["spill_store_bytes"] == 0


def test_warp_specialize_says_what_it_needs():
    x, w, *rest = sd_conv_args()
    x_flat = zero_bordered(x, 1)
    ws = dict(padding=1, warp_specialize=True, block_m=128, block_n=128, block_k=64, num_warps=4)
    with pytest.raises(ValueError, match="maxnreg and warp_specialize need fixed blocks"):
        tk.conv2d_fp8(x, w, *rest, padding=1, tma=True, warp_specialize=True)
    if not TRITON_3_6:
        with pytest.raises(ValueError, match=rf"Triton {re.escape(tk.triton.__version__)}: only Triton 3.6's"):
            tk.compile_ahead(tk.conv2d_fp8, x_flat, w, *rest[:3], None, None, tma=True, zero_bordered=True, **ws)
        return
    with pytest.raises(ValueError, match="needs TMA loads of flat rows"):  # pointer loads, then boxes
        tk.compile_ahead(tk.conv2d_fp8, x, w, *rest, **ws)
    with pytest.raises(ValueError, match="needs TMA loads of flat rows"):
        tk.compile_ahead(tk.conv2d_fp8, x, w, *rest, tma=True, **ws)
    with pytest.raises(ValueError, match="needs num_warps=4"):
        tk.compile_ahead(tk.conv2d_fp8, x_flat, w, *rest[:3], None, None, tma=True, zero_bordered=True,
                         **dict(ws, num_warps=8))
    with pytest.raises(ValueError, match="zero point's epilogue loops over the taps"):
        tk.compile_ahead(tk.conv2d_fp8, x_flat, w, *rest, tma=True, zero_bordered=True, **ws)


@only_triton_3_6
def test_warp_specialized_gemms_compile_for_hopper():
    # A linear with its zero point, and a 3×3 convolution over zero-bordered codes without one: Triton splits the K
    # loop into a TMA producer warp group and two consumers (12 warps from 4), still FP8 wgmma, no spills.
    linear = (fp8_zeros(256, 320), fp8_zeros(1280, 320), torch.ones(256), torch.ones(1280), torch.zeros(1280),
              torch.zeros(256), torch.zeros(1280))
    x, w, *rest = sd_conv_args(with_zp=False)
    blocks = dict(tma=True, block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3)
    compiled = {
        "linear": tk.compile_ahead(tk.linear_fp8, *linear, warp_specialize=True, **blocks),
        "linear, not specialized": tk.compile_ahead(tk.linear_fp8, *linear, **blocks),
        "conv3x3": tk.compile_ahead(tk.conv2d_fp8, zero_bordered(x, 1), w, *rest, padding=1, zero_bordered=True,
                                    warp_specialize=True, **blocks),
    }
    stats = {name: tk.kernel_stats(kernel) for name, [(_, kernel)] in compiled.items()}
    assert {name: s["num_warps"] for name, s in stats.items()} == {"linear": 12, "linear, not specialized": 4,
                                                                  "conv3x3": 12}
    for s in (stats["linear"], stats["conv3x3"]):  # (4 warps unspecialized hold the 128×128 tile with spills)
        assert s["mma_instructions"] and all(".e4m3.e4m3" in i for i in s["mma_instructions"]), s
        assert s["tma_copies"] > 0 and s["spill_store_bytes"] == 0, s


@only_triton_3_6
def test_warp_specialized_gemms_match_float64():
    # On CPU the interpreter ignores the hint (this checks the launch path); on a Hopper GPU the kernel is the
    # warp-specialized one.
    blocks = dict(block_m=128, block_n=128, block_k=64) if CUDA else GEMM_BLOCKS
    blocks = dict(blocks, tma=True, num_warps=4, warp_specialize=True)  # a copy: GEMM_BLOCKS serves other tests
    assert_linear_fp8_matches_float64_matmul(150, 96, 144, seed=12, **blocks)
    operands = conv_operands(2, 6, 7, 32, 40, 3, 3, True, False, seed=12)
    ref, mag = tk.conv2d_fp8_reference(*operands, 1, 1, 1)
    to_dev = [t.to(DEV) if t is not None else None for t in operands]
    y = tk.conv2d_fp8(zero_bordered(to_dev[0], 1), *to_dev[1:], padding=1, zero_bordered=True, **blocks)
    assert_within_accumulation_error(y, ref, mag, 9 * 32, taps=9)


def test_ctas_per_sm_counts_each_resource_of_the_sm():
    # sm_90: 65536 registers, allocated per warp in units of 256; 64 warps; 32 blocks; 228 KB shared, +1 KB per block.
    assert tk.ctas_per_sm(90, 225, 49152, 8) == (1, "registers")  # 7424 per warp × 8 warps: 59392 of 65536
    assert tk.ctas_per_sm(90, 120, 49152, 8) == (2, "registers")  # 3840 per warp: 30720 per block
    assert tk.ctas_per_sm(90, 100, 0, 4) == (4, "registers")  # 3200 per warp rounds up to 3328: 19 warps, not 20
    assert tk.ctas_per_sm(90, 64, 98304, 4) == (2, "shared memory")  # 233472 // 99328
    assert tk.ctas_per_sm(90, 16, 0, 16) == (4, "warps")
    assert tk.ctas_per_sm(90, 16, 0, 1) == (32, "blocks")
    assert tk.ctas_per_sm(89, 32, 0, 16) == (3, "warps")  # Ada: 48 warps, 100 KB
    assert tk.ctas_per_sm(89, 64, 50 * 1024, 4) == (1, "shared memory")
    assert tk.ctas_per_sm(75, 64, 0, 4) is None


def test_conv_kernel_compiles_for_ada_fp8_mma():
    [(_, kernel)] = tk.compile_ahead(tk.conv2d_fp8, *sd_conv_args(with_zp=False), padding=1, arch=89,
                                     block_m=64, block_n=64, block_k=64)
    stats = tk.kernel_stats(kernel)
    assert stats["arch"] == "sm_89"
    assert stats["mma_instructions"] == ["mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"]
    assert stats["spill_store_bytes"] == 0


@pytest.mark.parametrize("loads", ["pointers", "tma_boxes", "tma_rows"])
def test_precise_accumulation_adds_partial_sums_in_fp32_on_hopper(loads):
    # With precise_acc the K loop moves wgmma's reduced-precision partial sums into fp32 registers: one extra fp32
    # add per accumulator element and iteration (BLOCK_M·BLOCK_N / threads = 64 here), whichever way the tiles load
    # (with TMA boxes wgmma reads A from registers, where Triton ignored max_num_imprecise_acc).
    x, *rest = sd_conv_args()
    options = {"pointers": {}, "tma_boxes": dict(tma=True), "tma_rows": dict(tma=True, zero_bordered=True)}[loads]
    x = zero_bordered(x, 1) if loads == "tma_rows" else x

    def fp32_adds(precise):
        [(_, kernel)] = tk.compile_ahead(tk.conv2d_fp8, x, *rest, padding=1, precise_acc=precise, **options,
                                         block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
        return len(re.findall(r"\badd\.(?:rn\.)?f32\b", kernel.asm["ptx"]))

    assert fp32_adds(True) - fp32_adds(False) == 128 * 128 // 256


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["fp4_e2m1", "ufp4_e2m2"])
def test_act_codes_kernel_compiles_with_ieee_division(name, layout):
    x = torch.zeros(2, 320, 32, 32, dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    zero = torch.zeros(2) if get_format(name).needs_zero_point else None
    [(_, kernel)] = tk.compile_ahead(tk.act_codes, x, name, torch.ones(2), zero)
    ptx = kernel.asm["ptx"]
    # Bit-exactness with the torch reference needs IEEE division: the approximate one moves values across ties.
    assert "div.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx
    assert kernel.metadata.enable_fp_fusion is False and "fma.rn.f32" not in ptx
    assert re.search(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)
    # The bf16 input loads as 16-byte vectors in both layouts (NCHW ones along a plane, transposed on chip), not as
    # one 2-byte load per element.
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx) and not re.search(r"ld\.global(\.\w+)*\.b16", ptx)
    stats = tk.kernel_stats(kernel)
    assert stats["spill_store_bytes"] == 0 and stats["mma_instructions"] == []
    # It rounds on float32 bits and with float32 additions, not with floor (cvt.rmi): by our count instructions bound
    # it on Hopper, and rounding that way took it from 54–56 SASS instructions per element to 42–44 (sm_90, Triton
    # 3.6 and 3.9; 32 elements per thread). The bound leaves room for other Triton versions' code, not for floors.
    assert "cvt.rmi" not in ptx and stats["mma_loop_instructions"] is None
    assert stats["sass_instructions"] <= 48 * tk._ACT_BLOCKS[0] * tk._ACT_BLOCKS[1] // (32 * stats["num_warps"])


def test_compile_ahead_rejects_bad_requests():
    with pytest.raises(ValueError, match="launcher must be one of"):
        tk.compile_ahead(torch.matmul, fp8_zeros(4, 4))
    with pytest.raises(ValueError, match=r"compute capability ≥ 89 .* got arch=80"):
        tk.compile_ahead(tk.conv2d_fp8, *sd_conv_args(), arch=80)
    with pytest.raises(ValueError, match="block_k must be ≥ 32 on GPUs"):
        tk.compile_ahead(tk.conv2d_fp8, *sd_conv_args(), padding=1, block_m=64, block_n=64, block_k=16)
    with pytest.raises(ValueError, match="nothing to compile"):
        tk.compile_ahead(tk.linear_fp8, fp8_zeros(0, 32), fp8_zeros(16, 32), torch.ones(0), torch.ones(16))
    with pytest.raises(TypeError):
        tk.compile_ahead(tk.linear_fp8, fp8_zeros(4, 32), fp8_zeros(16, 32), torch.ones(4), torch.ones(16), bogus=1)


def test_conv_tiles_benchmark_fails_when_no_configuration_ran(capsys, monkeypatch):
    # Every configuration failing (no interpreter on CPU, a broken launcher on a GPU) printed an empty sweep and
    # exited 0, which the GPU suite logged as passed.
    from test_benchmarks import BENCHMARKS, load_script

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    real = tk.conv2d_fp8

    def refusing_tiles(*args, **kwargs):
        if "block_m" in kwargs:
            raise RuntimeError("OutOfResources: shared memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "conv2d_fp8", refusing_tiles)
    with pytest.raises(SystemExit, match=r"no configuration ran on 1 of 1 shape\(s\); first error: RuntimeError: "
                                         "OutOfResources"):
        load_script("conv_tiles").main(["--smoke", "--compile-workers", "-1", "--no-warp-specialize"])
    assert json.loads(capsys.readouterr().out)["shapes"][0]["fastest"] is None


def test_conv_tiles_benchmark_smoke(capsys, monkeypatch):
    # The GPU tile sweep's whole flow on tiny shapes (interpreted on CPU), so a GPU session does not find it broken.
    from test_benchmarks import BENCHMARKS, load_script

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    load_script("conv_tiles").main(["--smoke", "--compile-workers", "0"])
    [row] = json.loads(capsys.readouterr().out)["shapes"]
    # Each step's kernels compiled for sm_90 before it is timed: 2 configurations × 3 loading methods, 4 variants
    # of each method's best, then a warp-specialized configuration (Triton 3.6 only) and the best rows tiles, both
    # without the zero point
    ws = 2 if TRITON_3_6 else 1
    assert [(p["distinct"], p["kernels"], p["errors"]) for p in row["precompile"]] == [(6, 6, []), (12, 12, []),
                                                                                        (ws, ws, [])]
    # 2 tile configurations × pointer/TMA-box/TMA-row loads; then per loading method its best tiles with fast
    # accumulation, without and with a 128-register cap, and split-K 2 and 4
    loads = ("pointers", "tma_boxes", "tma_rows")
    assert len(row["configs"]) == 6 and all("error" not in c for c in row["configs"])
    assert {c["loads"] for c in row["configs"]} == set(loads)
    assert row["configs"][0]["speedup"]["eager"] == pytest.approx(row["bf16"]["ms"] / row["configs"][0]["ms"])
    assert set(row["best"]) == set(loads) and row["best"]["tma_rows"] in row["configs"]
    assert sorted((v["loads"], v["precise_acc"], v["split_k"], v.get("maxnreg", 0)) for v in row["variants"]) == sorted(
        (m, p, k, cap) for m in loads for p, k, cap in ((False, 1, 0), (False, 1, 128), (True, 2, 0), (True, 4, 0)))
    assert all("error" not in v for v in row["variants"])
    specialized, plain = row["warp_specialized"]
    assert specialized["warp_specialize"] and specialized["num_warps"] == 4 and not specialized["zero_point"]
    assert ("error" in specialized) != TRITON_3_6
    assert plain == dict(plain, loads="tma_rows", zero_point=False, precise_acc=False, **{
        k: row["best"]["tma_rows"][k] for k in ("block_m", "block_n", "block_k", "num_warps", "num_stages")})
    every = row["configs"] + row["variants"]
    assert row["fastest"]["ms"] == min(e["ms"] for e in every)  # no CUDA graphs on CPU: ranked by eager time
    assert row["fastest_fp32_accumulation"]["precise_acc"]
    # Every output against the exact result, relative to Σ|terms|: the interpreter sums in fp32, so only the
    # bfloat16 output's rounding shows: at most 2^-8 rounding to nearest (the floor), 2^-7 as the interpreter
    # converts, by truncation.
    assert 0 < row["bf16_rounding_error"]["mean"] <= row["bf16_rounding_error"]["max"] <= 2**-8
    every += [e for e in row["warp_specialized"] if "error" not in e]
    assert all(0 < e["error_vs_exact"]["max"] <= 2**-7 + 2**-16 for e in every), [e["error_vs_exact"] for e in every]


@pytest.fixture
def gpu_w4a4(monkeypatch):
    """The module of benchmarks/gpu_w4a4.py (its own directory on sys.path, as when it runs as a script)."""
    from test_benchmarks import BENCHMARKS

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_w4a4")


@pytest.fixture
def fixed_gemm_blocks(monkeypatch):
    """The GEMM launchers with GEMM_BLOCKS: the autotuner times kernels on GPUs only."""
    for launcher in ("conv2d_fp8", "linear_fp8"):
        monkeypatch.setattr(tk, launcher, functools.partial(getattr(tk, launcher), **GEMM_BLOCKS))


def test_benchmark_timer_precompiles_what_it_times(gpu_w4a4):
    timer = gpu_w4a4.Timer(torch.device(DEV), iters=1, cuda_graphs=False, compile_arch=90, compile_workers=0)
    x = torch.randn(2, 32, device=DEV)
    timing = timer(lambda: tk.act_codes(x, "fp4_e2m1", torch.ones(2, device=DEV), None))
    assert timing["ms"] > 0 and timer.precompiled["kernels"] == 1 and timer.precompiled["errors"] == []
    timer(lambda: x + 1)  # no kernel of ours: nothing to compile
    assert timer.precompiled["kernels"] == 1


def test_gpu_benchmark_times_warp_specialized_linears_where_triton_compiles_them(gpu_w4a4):
    # gpu_w4a4.py's warp-specialized linear rows, through the kernels (interpreted on CPU): timed with Triton 3.6,
    # the launcher's reason recorded with any other.
    from msfp.fp8 import Fp8Layer

    x = torch.randn(2, 24, 64)
    fp8 = Fp8Layer(gpu_w4a4.quantized_layer(torch.nn.Linear(64, 48), x), use_kernels=True).to(DEV)
    xb = x.to(DEV, torch.bfloat16).reshape(-1, 64)
    s, z = fp8._act_params(2, 24)
    codes = gpu_w4a4.layer_act_codes(xb, s, z, use_kernels=True)
    bf16_t = dict(ms=1.0)
    fields = gpu_w4a4.warp_specialized_rows(gpu_w4a4.Timer(torch.device(DEV), iters=1, cuda_graphs=False), 1e6,
                                            bf16_t, None, fp8, codes, s, z)
    if TRITON_3_6:
        assert set(fields) == {"fp8_gemm_only_tma_ws", "speedup_gemm_only_tma_ws", "fp8_gemm_only_tma_ws_fast_accum",
                               "speedup_gemm_only_tma_ws_fast_accum"}
        assert fields["fp8_gemm_only_tma_ws"]["ms"] > 0
    else:
        assert set(fields) == {"fp8_gemm_only_tma_ws_error"}
        assert "only Triton 3.6's Hopper warp specialization" in fields["fp8_gemm_only_tma_ws_error"]


def assert_measured_accumulation_errors_within_bounds(errors: dict) -> None:
    """gpu_w4a4.py's accumulation errors within the fp32 bound on CPU (the interpreter sums in fp32 whatever
    precise_acc says) and within assert_within_accumulation_error's tolerance on a GPU."""
    for measured in errors.values():
        assert 0 <= measured["max_over_sum_abs_terms"] <= 2.0**-10
        assert CUDA or measured["max_over_fp32_bound"] <= 1


@pytest.mark.usefixtures("fixed_gemm_blocks")
@pytest.mark.parametrize("kind", ["conv3x3", "linear"])
def test_gpu_benchmark_measures_accumulation_error_through_the_kernels(kind, gpu_w4a4):
    # gpu_w4a4.py's accumulation_error on the kernels' layouts (NHWC codes seen as NCHW, flattened linear rows), with
    # a zero point; a layout, scale or zero-point mix-up would be off by far more than the bounds.
    from msfp.fp8 import Fp8Layer

    torch.manual_seed(0)
    if kind == "conv3x3":
        module, x, rows = torch.nn.Conv2d(32, 16, 3, padding=1), torch.randn(2, 32, 5, 6), 1
    else:
        module, x, rows = torch.nn.Linear(64, 48), torch.randn(2, 24, 64), 24
    fp8 = Fp8Layer(gpu_w4a4.quantized_layer(module, x), use_kernels=True).to(DEV)
    xb = x.to(DEV, torch.bfloat16)
    x2 = xb if kind == "conv3x3" else xb.reshape(-1, 64)
    s, z = fp8._act_params(2, rows)
    assert z is not None  # the benchmark's unsigned activation format
    codes = gpu_w4a4.layer_act_codes(x2, s, z, use_kernels=True)
    if kind == "conv3x3":
        codes = codes.permute(0, 3, 1, 2)  # as the benchmark hands them to Fp8Layer._gemm
    spatial = tuple(x.shape[-2:]) if kind == "conv3x3" else ()
    errors = gpu_w4a4.accumulation_errors(fp8, codes, s, z, spatial, use_kernels=True)
    assert set(errors) == {"fp32", "fast"} and fp8.precise_acc
    assert_measured_accumulation_errors_within_bounds(errors)


@pytest.mark.usefixtures("fixed_gemm_blocks")
def test_gpu_benchmark_layer_rows_run_through_the_kernels(monkeypatch, gpu_w4a4):
    # The branches of gpu_w4a4.py's layer rows that only the kernels take (NHWC codes, TMA boxes and zero-bordered
    # rows, warp specialization, the accumulation error) at tiny shapes, interpreted here, so that a GPU session does
    # not find them broken; the --smoke run covers the emulated path.
    monkeypatch.setattr(gpu_w4a4, "CONVS", [(16, 16, 6, 1), (16, 16, 6, 2)])
    monkeypatch.setattr(gpu_w4a4, "LINEARS", [(8, 32, 16)])
    monkeypatch.setattr(gpu_w4a4, "DIT_LINEARS", [])
    args = argparse.Namespace(batch=2, smoke=False)
    timer = gpu_w4a4.Timer(torch.device(DEV), iters=1, cuda_graphs=False)
    rows = gpu_w4a4.layer_rows(args, timer, None)
    assert [(row["kind"], row.get("stride")) for row in rows] == [("conv3x3", 1), ("conv3x3", 2), ("linear", None)]
    stride1, stride2, linear = rows
    for key in ("fp8_gemm_only_tma_boxes", "fp8_gemm_only_tma_rows", "fp8_layer_tma_rows"):
        assert stride1[key]["ms"] > 0 and key not in stride2
    assert linear["fp8_gemm_only_tma_rows"]["ms"] > 0 and linear["scaled_mm_layer"]["ms"] > 0
    ws = "fp8_gemm_only_tma_ws" if TRITON_3_6 else "fp8_gemm_only_tma_ws_error"
    assert ws in linear
    for row in rows:
        assert_measured_accumulation_errors_within_bounds(row["accumulation_error"])
    assert set(stride1["act_codes"]) == {"channels_last", "nchw"}


def test_benchmark_timer_reports_the_autotuners_new_choices(monkeypatch, gpu_w4a4):
    # The autotuner runs on GPUs only, so its choice is stood in for: a configuration cached under a new key while
    # a call is timed is reported with that timing (and by rates(), with the row), ones cached before are not.
    timer = gpu_w4a4.Timer(torch.device(DEV), iters=1, cuda_graphs=False)
    tuner = tk._conv_fp8_tuned[128]
    old, new = tuner.configs[:2]
    monkeypatch.setattr(tuner, "cache", {("seen",): old})
    timing = timer(lambda: tuner.cache.setdefault(("new",), new))
    assert timing["autotuned"] == [{**new.kwargs, "num_warps": new.num_warps, "num_stages": new.num_stages,
                                    "num_ctas": 1}]
    assert gpu_w4a4.rates(1e9, timing, None)["autotuned"] == timing["autotuned"]
    assert "autotuned" not in timer(lambda: tuner.cache.setdefault(("new",), old))


def test_launches_read_the_kernels_compiled_ahead(tmp_path):
    # conv_tiles.py compiles its sweep ahead in parallel processes and relies on the launches finding those kernels
    # in Triton's cache (compile_ahead rebuilds the JIT's cache key from Triton internals); launches made again skip
    # Triton's dispatch (_Launch._launch). The launches go through a stand-in sm_90 driver in a separate process, with
    # the kernels JIT-compiled rather than interpreted.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "launch_from_cache.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    precompiled = result["precompiled"]
    # 5 launches, the autotuned convolution with one kernel per candidate
    candidates = len(tk._TILES)
    assert precompiled["distinct"] == 5 and precompiled["kernels"] == 4 + candidates and precompiled["errors"] == []
    assert result["control"] == 1  # a launch unlike any compiled ahead compiles, and the check sees it
    assert result["added"] == {name: 0 for name in result["added"]} and len(result["added"]) == 5
    # Each candidate timed, then the winner; made again, the launch skips the autotuner and runs that same kernel
    assert result["autotuned"] == dict(first_launches=candidates + 1, winner_is_last_candidate=True, again_launches=1,
                                       again_same_kernel=True, again_autotuner_calls=0)
    # Made again, each launch goes straight to its compiled kernel (past Triton's dispatch), and its launcher gets what
    # Triton's dispatch of the same launch gives it; a launch unlike an earlier one only in its input's alignment
    # gets a kernel of its own.
    assert result["direct"] == dict.fromkeys([*result["added"], "misaligned", "misaligned_own_kernel"], True)


def test_autotuned_candidates_mask_channels_only_where_blocks_are_ragged():
    # Each pointer-load candidate masks channels exactly where its BLOCK_K does not divide C (the kernel skips the
    # mask otherwise, which test_channel_blocks_full_or_ragged_match_float64 checks), and a candidate compiles to one
    # kernel whatever C: 64-deep blocks need no mask at 640 or 320 channels, 128-deep ones at 640 only.
    channels = (640, 320, 48)

    def conv_args(C):
        return fp8_zeros(2, 4, 4, C), fp8_zeros(16, 3, 3, C), torch.ones(2), torch.ones(16)

    for C in channels:
        configs = tk._prepare("conv2d_fp8", *conv_args(C), padding=1).configs
        assert {config["BLOCK_K"] for config in configs} == {64, 128}
        assert [config["CHANNEL_MASK"] for config in configs] == [C % config["BLOCK_K"] != 0 for config in configs]
    counted = tk.precompile(lambda: [tk.conv2d_fp8(*conv_args(C), padding=1) for C in channels], arch=90,
                            count_only=True)
    depths = [tile[2] for tile in tk._TILES]
    # 640: every candidate unmasked; 320: the 128-deep ones masked; 48: the 64-deep ones masked too
    assert counted["kernels"] == len(depths) + depths.count(128) + depths.count(64)


def test_precompile_records_launches_instead_of_running_them(monkeypatch):
    monkeypatch.setattr(tk._Launch, "run", lambda *args: pytest.fail("a recorded launch ran"))
    x, w, outputs = torch.randn(2, 32, 4, 4), fp8_zeros(16, 3, 3, 32), []

    def forward():
        codes = tk.act_codes(x, "ufp4_e2m2", torch.ones(2), torch.zeros(2))
        for block_k in (32, 32, 16):  # the same launch twice is compiled once; BLOCK_K 16 fails to, and is reported
            outputs.append(tk.conv2d_fp8(codes, w, torch.ones(2), torch.ones(16), padding=1, block_m=64, block_n=32,
                                         block_k=block_k))
        with pytest.raises(ValueError, match="w_codes must have"):  # recording still checks the arguments
            tk.conv2d_fp8(codes, w[:, :, :, :16], torch.ones(2), torch.ones(16))

    counted = tk.precompile(forward, arch=90, count_only=True)  # how many it would compile, none compiled
    assert (counted["launches"], counted["distinct"], counted["kernels"]) == (4, 3, 2)
    report = tk.precompile(forward, arch=90, workers=0)
    assert (report["launches"], report["distinct"], report["kernels"]) == (4, 3, 2)
    assert report["errors"] == ["conv2d_fp8: ValueError: block_k must be ≥ 32 on GPUs (FP8 MMA depth), got 16"]
    assert counted["errors"] == report["errors"]  # met before compiling
    assert all(y.shape == (2, 4, 4, 16) and y.dtype == torch.float32 and not y.any() for y in outputs)
    with pytest.raises(ValueError, match="workers must be an int ≥ 0"):
        tk.precompile(forward, arch=90, workers=-1)
    if not CUDA:
        with pytest.raises(ValueError, match="precompile needs arch="):
            tk.precompile(forward, workers=0)
