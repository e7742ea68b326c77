import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import msfp
from msfp.formats import fake_quant, get_format, round_to_grid

PROPERTY_FORMATS = [
    "fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "ufp4_e2m2", "ufp4_e3m1", "ufp4_e1m3", "ufp4_e4m0",
    "fp6_e3m2", "fp8_e4m3", "int4", "uint4",
]


def brute_force(x, fmt, scale, zero_point=None):
    """Nearest grid value by exhaustive comparison, ties to the even code, computed with fake_quant's arithmetic."""
    fmt = get_format(fmt)
    grid = fmt.values().double()
    v = (x - zero_point) / scale if zero_point is not None else x / scale
    v = torch.clamp(v, float(grid[0]), float(grid[-1]))
    dist = (v.double().unsqueeze(-1) - grid).abs()
    nearest = dist.min(dim=-1, keepdim=True).values
    candidates = dist == nearest  # one or two (a tie) neighbouring grid values
    # Code index of each value: its position among the magnitudes (sign bit aside), whose parity is the LSB.
    zero_index = int(torch.nonzero(grid == 0))
    code = (torch.arange(len(grid)) - zero_index).abs()
    prefer = candidates & (code % 2 == 0)
    pick = torch.where(prefer.any(-1, keepdim=True), prefer, candidates).double().argmax(-1)
    q = grid[pick].to(x.dtype)
    q = torch.where(torch.isnan(v), v, q)
    out = q * scale
    return out + zero_point if zero_point is not None else out


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    both_nan = torch.isnan(a) & torch.isnan(b)
    mismatch = ~(both_nan | (a == b))
    assert not mismatch.any(), f"{int(mismatch.sum())} mismatches, e.g. {a[mismatch][:5]} vs {b[mismatch][:5]}"


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(PROPERTY_FORMATS),
    x=arrays(np.float32, st.integers(1, 64), elements=finite_f32),
    scale=st.floats(2.0**-14, 2.0**14, width=32),
    zero_point=st.floats(-128, 128, width=32),
)
@example(name="fp4_e2m1", x=np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25], np.float32), scale=1.0,
         zero_point=0.0)
@example(name="ufp4_e2m2", x=np.array([0.125, 0.375, 4.5, 6.5, 7.0, 7.5, -1.0], np.float32), scale=1.0,
         zero_point=0.0)
@example(name="int4", x=np.array([0.5, 1.5, 2.5, -0.5, -2.5, 6.5, 7.5], np.float32), scale=1.0, zero_point=0.0)
def test_fake_quant_equals_brute_force(name, x, scale, zero_point):
    fmt = get_format(name)
    x = torch.from_numpy(x)
    zp = torch.tensor(zero_point) if fmt.needs_zero_point else None
    assert_same(fake_quant(x, fmt, scale, zp), brute_force(x, fmt, torch.tensor(scale), zp))


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(PROPERTY_FORMATS), exponent=st.integers(-20, 20), data=st.data())
def test_exact_ties_subnormals_and_boundaries(name, exponent, data):
    """Midpoints between neighbours (exact ties with a power-of-two scale), the grid itself, ± clip bounds."""
    fmt = get_format(name)
    grid = fmt.values()
    mids = (grid[1:] + grid[:-1]) / 2
    special = torch.cat([grid, mids, grid.nextafter(grid + 1), grid.nextafter(grid - 1),
                         torch.tensor([0.0, -0.0, fmt.max_value * 1.5, -fmt.max_value * 1.5, 1e-30, -1e-30])])
    scale = torch.tensor(2.0**exponent)
    zp = torch.tensor(data.draw(st.sampled_from([0.0, -0.25, -3.0]))) * scale if fmt.needs_zero_point else None
    x = special * scale + (zp if zp is not None else 0)
    assert_same(fake_quant(x, fmt, scale, zp), brute_force(x, fmt, scale, zp))


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(PROPERTY_FORMATS),
       x=arrays(np.float64, st.integers(1, 64), elements=st.floats(-1e3, 1e3, allow_subnormal=True)))
def test_round_to_grid_equals_brute_force_in_every_float_dtype(name, x):
    """round_to_grid reads each value's binade from the bits of float32 and float64 and computes half precision in
    float32: every dtype must give the nearest grid value, ties (the midpoints) to the even code."""
    fmt = get_format(name)
    grid = fmt.values().double()
    special = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, grid.nextafter(grid + 1), grid.nextafter(grid - 1),
                         torch.tensor([0.0, -0.0, 1e-300, -1e-300], dtype=torch.float64)])
    values = torch.cat([torch.from_numpy(x), special]).clamp(float(grid[0]), float(grid[-1]))
    zero = torch.tensor(0.0, dtype=torch.float64) if fmt.needs_zero_point else None
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        v = values.to(dtype)
        expected = brute_force(v.double(), fmt, torch.tensor(1.0, dtype=torch.float64), zero).to(dtype)
        assert_same(round_to_grid(v, fmt), expected)


def test_ties_go_to_even_code():
    q = fake_quant(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0]), "fp4_e2m1", 1.0)
    assert q.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0]
    assert fake_quant(torch.tensor([0.5, 1.5, 2.5, -2.5]), "int4", 1.0).tolist() == [0.0, 2.0, 2.0, -2.0]


@pytest.mark.parametrize(
    "name, count, max_value, samples",
    [
        ("fp4_e2m1", 15, 6.0, [0.5, 1.5, 3.0, -6.0]),
        ("fp4_e1m2", 15, 3.5, [0.5, 2.5, -3.5]),
        ("fp4_e3m0", 15, 16.0, [0.25, 0.5, 8.0, -16.0]),
        ("ufp4_e2m2", 16, 7.0, [0.25, 0.75, 1.25, 3.5, 5.0]),
        ("ufp4_e3m1", 16, 24.0, [0.125, 0.375, 12.0]),
        ("ufp4_e1m3", 16, 3.75, [0.25, 1.75, 3.75]),
        ("ufp4_e4m0", 16, 256.0, [2.0**-6, 1.0, 128.0]),
        ("fp6_e3m2", 63, 28.0, [0.0625, 0.1875, 0.25, 14.0, 20.0]),
        ("fp8_e4m3", 255, 480.0, [2.0**-9, 2.0**-6, 448.0, -480.0]),
        ("int4", 15, 7.0, [-7.0, 0.0, 7.0]),
        ("uint4", 16, 15.0, [0.0, 15.0]),
        ("int8", 255, 127.0, [-127.0, 127.0]),
    ],
)
def test_grid_tables(name, count, max_value, samples):
    fmt = msfp.get_format(name)
    values = fmt.values()
    assert len(values) == count == fmt.num_values == len(torch.unique(values))
    assert fmt.max_value == values.max().item() == max_value
    assert torch.all(values[1:] > values[:-1])
    for s in samples:
        assert s in values.tolist()
    assert (values.min() >= 0) == (not fmt.signed)
    if fmt.signed:
        assert torch.equal(values, -values.flip(0))


def test_e2m1_grid_is_the_ocp_grid():
    expected = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert get_format("fp4_e2m1").values().tolist() == sorted({s * v for v in expected for s in (1, -1)})


def test_format_fields():
    f = get_format("FP4_E2M1")
    assert (f.name, f.kind, f.bits, f.signed, f.ebits, f.mbits) == ("fp4_e2m1", "fp", 4, True, 2, 1)
    u = get_format("ufp4_e3m1")
    assert (u.bits, u.signed, u.needs_zero_point) == (4, False, True)
    assert get_format(f) is f
    assert get_format("fp04_e2m1") == f and get_format("uINT004").name == "uint4"  # one format, one name


def test_fp8_e4m3_shares_values_with_torch_float8():
    ours = get_format("fp8_e4m3").values()
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    theirs = torch.unique(codes[torch.isfinite(codes)])
    # torch's e4m3fn spends the all-ones code on NaN: every torch value is ours, and ours adds only ±480.
    assert set(theirs.tolist()) <= set(ours.tolist())
    assert set(ours.tolist()) - set(theirs.tolist()) == {480.0, -480.0}
    x = torch.randn(10000) * 100
    inside = x.abs() <= 448
    assert torch.equal(fake_quant(x, "fp8_e4m3", 1.0)[inside], x[inside].to(torch.float8_e4m3fn).float())


def test_broadcasting_per_channel_and_per_timestep():
    x = torch.randn(4, 3, 5)
    scale = torch.tensor([0.1, 0.5, 2.0]).view(1, 3, 1)
    out = fake_quant(x, "fp4_e2m1", scale)
    for c in range(3):
        assert torch.equal(out[:, c], fake_quant(x[:, c], "fp4_e2m1", scale[0, c, 0]))
    zp = torch.tensor([-0.2, 0.0, -1.0, -0.5]).view(4, 1, 1)
    out = fake_quant(x, "ufp4_e2m2", torch.full((4, 1, 1), 0.3), zp)
    assert torch.equal(out[2], fake_quant(x[2], "ufp4_e2m2", 0.3, -1.0))


def test_dtype_preserved_and_half_inputs():
    x = torch.randn(100)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        out = fake_quant(x.to(dtype), "fp4_e2m1", 0.5)
        assert out.dtype == dtype
        assert torch.equal(out.float(), fake_quant(x.to(dtype).float(), "fp4_e2m1", 0.5))


@pytest.mark.parametrize("name, zero_point", [("fp4_e2m1", None), ("ufp4_e2m2", -0.1)])
def test_python_number_parameters_are_exact_for_float64_inputs(name, zero_point):
    # 0.1 as a float32 tensor is 0.10000000149…: the float64 result was off by ~1e-9 relative.
    x = torch.tensor([0.6, 0.3, -0.45, 0.05], dtype=torch.float64)
    z64 = None if zero_point is None else torch.tensor(zero_point, dtype=torch.float64)
    expected = brute_force(x, name, torch.tensor(0.1, dtype=torch.float64), z64)
    assert torch.equal(fake_quant(x, name, 0.1, zero_point), expected)
    if zero_point is not None:  # a float64 zero-point tensor is not narrowed to the Python scale's dtype either
        assert torch.equal(fake_quant(x, name, 0.1, z64), expected)


def test_inf_saturates_and_nan_propagates():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0])
    out = fake_quant(x, "fp4_e2m1", 0.5)
    assert out[:2].tolist() == [3.0, -3.0]
    assert math.isnan(out[2].item()) and out[3].item() == 1.0
    out = fake_quant(x, "ufp4_e2m2", 0.5, -1.0)
    assert out[:2].tolist() == [2.5, -1.0] and math.isnan(out[2].item())


def test_straight_through_gradient_for_x():
    x = torch.tensor([-10.0, -3.0, -1.3, 0.2, 2.9, 3.0, 10.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    fake_quant(x, "fp4_e2m1", s).sum().backward()
    # The clip range is ±3, its ends inside as torch.clamp's gradient has them; there R(v) = v: no scale gradient.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert s.grad.item() == pytest.approx(-6.0 + (-3.0 + 2.6) + (0.5 - 0.4) + (6.0 - 5.8) + 6.0, abs=1e-5)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(PROPERTY_FORMATS), x=arrays(np.float32, 16, elements=finite_f32),
       scale=st.floats(2.0**-20, 2.0**10, width=32))
def test_values_do_not_depend_on_whether_gradients_are_needed(name, x, scale):
    fmt = get_format(name)
    x, z = torch.from_numpy(x), (torch.tensor(-0.3 * scale) if fmt.needs_zero_point else None)
    with torch.no_grad():
        expected = fake_quant(x, fmt, scale, z)
    s = torch.tensor(scale, requires_grad=True)
    assert_same(fake_quant(x.requires_grad_(), fmt, s, z), expected)


def test_inputs_far_beyond_the_clip_range_give_finite_lsq_gradients():
    # x/s overflowing float32 used to make the scale's gradient 0·inf = NaN, which one step turned into a NaN model.
    # x = 1 at s = 0.5 is the grid value 2 (gradient R(v) - v = 0); each clipped element contributes the bound 6.
    for x, s0, ds, dx in (([1.0, float("inf")], 0.5, 6.0, [1.0, 0.0]), ([1.0, 3e38], 0.5, 6.0, [1.0, 0.0]),
                          ([1.0, 1e15], 1e-12, 12.0, [0.0, 0.0])):
        x, s = torch.tensor(x, requires_grad=True), torch.tensor(s0, requires_grad=True)
        fake_quant(x, "fp4_e2m1", s).sum().backward()
        assert s.grad.item() == pytest.approx(ds) and x.grad.tolist() == dx
    s, z = torch.tensor(0.5, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    fake_quant(torch.tensor([float("-inf"), float("inf")]), "ufp4_e2m2", s, z).sum().backward()
    assert s.grad.item() == 7.0 and z.grad.item() == 2.0  # lower bound: 0; upper: 7; z: 1 per clipped element


def test_lsq_gradients_for_scale_and_zero_point():
    x = torch.tensor([-0.7, 0.3, 1.1, 2.0, 9.0])
    s = torch.tensor(0.5, requires_grad=True)
    z = torch.tensor(-0.5, requires_grad=True)
    fake_quant(x, "ufp4_e2m2", s, z).sum().backward()
    v = torch.clamp((x - z.detach()) / s.detach(), 0, 7)
    inside = ((x - z.detach()) / s.detach() >= 0) & ((x - z.detach()) / s.detach() <= 7)
    r = fake_quant(x, "ufp4_e2m2", s.detach(), z.detach()).sub(z.detach()).div(s.detach())
    expected_ds = torch.where(inside, r - v, v).sum()
    assert s.grad.item() == pytest.approx(expected_ds.item(), abs=1e-5)
    assert z.grad.item() == pytest.approx(float((~inside).sum()), abs=1e-6)  # 0 inside, 1 per clipped element

    w = torch.tensor([0.26, -0.8, 5.0], requires_grad=True)
    s = torch.tensor(0.25, requires_grad=True)
    fake_quant(w, "fp4_e2m1", s).sum().backward()
    # inside: R(v) - v; clipped at +6: the bound 6.
    assert s.grad.item() == pytest.approx((1.0 - 1.04) + (-3.0 + 3.2) + 6.0, abs=1e-5)


@pytest.mark.parametrize(
    "name, match",
    [
        ("fp4_e5m1", "bits"),
        ("fp9_e4m4", "at most 8"),
        ("int9", "at most 8"),
        ("float4", "valid patterns"),
        ("fp4_e0m3", "int4"),
        ("ufp8_e8m0", "float32 range"),
    ],
)
def test_bad_format_names(name, match):
    with pytest.raises(ValueError, match=match):
        get_format(name)


def test_unknown_name_lists_patterns():
    with pytest.raises(ValueError, match=r"fpN_eXmY.*ufpN_eXmY.*intN.*uintN"):
        get_format("nf4")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 0.0])])
def test_bad_scales(scale):
    with pytest.raises(ValueError, match="scale must be positive"):
        fake_quant(torch.randn(3, 2), "fp4_e2m1", scale)


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        fake_quant(torch.arange(4), "fp4_e2m1", 1.0)
    with pytest.raises(ValueError, match="needs a zero_point"):
        fake_quant(torch.randn(4), "ufp4_e2m2", 1.0)
    with pytest.raises(ValueError, match="takes no zero_point"):
        fake_quant(torch.randn(4), "fp4_e2m1", 1.0, 0.0)
    with pytest.raises(ValueError, match="enlarge"):
        fake_quant(torch.randn(4), "fp4_e2m1", torch.ones(2, 4))
    with pytest.raises(ValueError, match="do not broadcast"):
        fake_quant(torch.randn(4), "fp4_e2m1", torch.ones(3))
    with pytest.raises(ValueError, match="zero_point must be finite"):
        fake_quant(torch.randn(4), "uint4", 1.0, float("nan"))


def test_format_and_scale_errors_say_what_works():
    with pytest.raises(ValueError, match="'fp3_e0m2' has no exponent bits; use int3 instead"):
        get_format("fp3_e0m2")
    with pytest.raises(ValueError, match=r"'fp1_e0m0' has no exponent bits$"):  # "use int1": no such format
        get_format("fp1_e0m0")
    x = torch.ones(3)
    for scale in (torch.tensor(1e-50, dtype=torch.float64), 1e300):  # "got min 0.0": the value after the cast
        with pytest.raises(ValueError, match=r"scale must lie in the range of torch.float32, which the rounding "
                                             r"computes in; got min 1e[-+]\d+"):
            fake_quant(x, "fp4_e2m1", scale)
    with pytest.raises(ValueError, match="scale must be positive and finite; got min -1.0"):
        fake_quant(x, "fp4_e2m1", -1.0)
