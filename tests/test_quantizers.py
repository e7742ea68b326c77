import math

import pytest
import torch

from msfp.formats import fake_quant, get_format
from msfp.quantizers import (
    MIN_SCALE,
    ActivationQuantizer,
    WeightQuantizer,
    _candidate_params,
    search_quant_params,
)

SIGNED_4BIT = ["fp4_e1m2", "fp4_e2m1", "fp4_e3m0"]
UNSIGNED_4BIT = ["ufp4_e1m3", "ufp4_e2m2", "ufp4_e3m1", "ufp4_e4m0"]


def exhaustive(rows, candidates, num_clip, num_zero, dtype=torch.float32):
    """Fake-quantize with every candidate of the search grid and keep the best: the slow reference. The candidates
    come from ``rows`` as the search sees them; ``dtype`` is the precision of the rounding and the errors."""
    best = {}
    for name in candidates:
        fmt = get_format(name)
        scale, zero = (t if t is None else t.to(dtype) for t in _candidate_params(rows, fmt, num_clip, num_zero))
        rows_in = rows.to(dtype)
        for j in range(scale.shape[1]):
            z = None if zero is None else zero[:, j:j + 1]
            err = (fake_quant(rows_in, fmt, scale[:, j:j + 1], z) - rows_in).pow(2).mean(1)
            for c in range(rows.shape[0]):
                if c not in best or err[c] < best[c][0]:
                    best[c] = (err[c].item(), name, scale[c, j].item(), None if z is None else z[c, 0].item())
    return best


def test_candidate_grids_are_those_of_the_spec():
    # exhaustive() takes its candidates from _candidate_params too, so a wrong grid (one abs-max for all channels,
    # zero points above 0) passed every search test. SPEC §2.1: clipping values on a grid up to each channel's
    # abs-max; zero points on a grid over [min(x), 0], the grid's range then reaching from z to the channel's max.
    rows = torch.tensor([[-0.5, 0.1, 2.0], [-30.0, 1.0, 10.0]])
    ratios = torch.tensor([0.25, 0.5, 0.75, 1.0])
    signed = get_format("fp4_e2m1")
    scale, zero = _candidate_params(rows, signed, num_clip=4, num_zero=3)
    assert zero is None
    torch.testing.assert_close(scale, torch.tensor([[2.0], [30.0]]) * ratios / signed.max_value)
    unsigned = get_format("ufp4_e2m2")
    scale, zero = _candidate_params(rows, unsigned, num_clip=4, num_zero=3)
    for c, (lo, hi) in enumerate(((-0.5, 2.0), (-30.0, 10.0))):
        zeros = torch.tensor([0.0, lo / 2, lo])
        torch.testing.assert_close(zero[c].view(3, 4), zeros[:, None].expand(3, 4))
        torch.testing.assert_close(scale[c].view(3, 4), (hi - zeros)[:, None] * ratios / unsigned.max_value)


@pytest.mark.parametrize("candidates", [SIGNED_4BIT, UNSIGNED_4BIT, ["int4"], ["uint4"], ["fp6_e3m2"]])
def test_search_matches_exhaustive_per_tensor(candidates):
    torch.manual_seed(0)
    x = torch.cat([torch.nn.functional.silu(torch.randn(300) * 2), torch.randn(20) * 4])
    result = search_quant_params(x, candidates, num_clip=12, num_zero=5)
    ref = exhaustive(x.view(1, -1), candidates, 12, 5)[0]
    assert result.mse == pytest.approx(ref[0], rel=1e-4, abs=1e-9)
    assert result.fmt.name == ref[1]
    assert result.scale.item() == pytest.approx(ref[2], rel=1e-6)
    # The reported MSE is what fake_quant with the returned parameters actually gives.
    achieved = (fake_quant(x, result.fmt, result.scale, result.zero_point) - x).pow(2).mean().item()
    assert achieved == pytest.approx(result.mse, rel=1e-4, abs=1e-9)


def test_search_matches_exhaustive_per_channel():
    torch.manual_seed(1)
    w = torch.randn(6, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 3.0, 0.5, 0.2]).view(6, 1, 1, 1)
    result = search_quant_params(w, SIGNED_4BIT, channel_axis=0, num_clip=10)
    best_total = None
    for name in SIGNED_4BIT:
        per_channel = exhaustive(w.reshape(6, -1), [name], 10, 1)
        total = sum(v[0] for v in per_channel.values()) / 6
        if best_total is None or total < best_total[0]:
            best_total = (total, name, torch.tensor([per_channel[c][2] for c in range(6)]))
    assert result.fmt.name == best_total[1]
    assert result.mse == pytest.approx(best_total[0], rel=1e-4)
    assert torch.allclose(result.scale, best_total[2])
    assert result.scale.shape == (6,) and result.zero_point is None


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "ufp4_e2m2", "int8"])
def test_reported_mse_is_exact_for_data_far_from_zero(fmt):
    # Prefix sums of x² cancel for a large offset with a small spread (the sums were 30 % off at 1000 ± 1e-3).
    torch.manual_seed(0)
    x = 1000 + 1e-3 * torch.randn(4096)
    result = search_quant_params(x, [fmt], num_clip=12, num_zero=5)
    ref = exhaustive(x.view(1, -1), [fmt], 12, 5, dtype=torch.float64)[0]
    assert result.mse == pytest.approx(ref[0], rel=1e-6)
    zero = None if result.zero_point is None else result.zero_point.double()
    achieved = (fake_quant(x.double(), result.fmt, result.scale.double(), zero) - x.double()).pow(2).mean().item()
    assert achieved == pytest.approx(result.mse, rel=1e-6)


@pytest.mark.parametrize("fmt", ["uint4", "ufp4_e2m2"])
def test_a_single_zero_point_candidate_is_the_minimum(fmt):
    # One candidate used to be 0, so an unsigned grid clipped every negative input (SiLU's dip) to 0.
    x = torch.nn.functional.silu(torch.linspace(-6, 6, 1001))
    result = search_quant_params(x, [fmt], num_clip=1, num_zero=1)
    assert result.zero_point.item() == pytest.approx(x.min().item())
    assert fake_quant(x, result.fmt, result.scale, result.zero_point).min().item() == pytest.approx(x.min().item())


def test_search_picks_unsigned_for_silu_and_signed_for_symmetric():
    torch.manual_seed(0)
    post_silu = torch.nn.functional.silu(torch.randn(20000) * 3)
    assert not search_quant_params(post_silu, SIGNED_4BIT + UNSIGNED_4BIT).fmt.signed
    symmetric = torch.randn(20000)
    assert search_quant_params(symmetric, SIGNED_4BIT).fmt.signed


def test_zero_range_channels_and_constants_do_not_produce_nan():
    w = torch.randn(4, 8)
    w[1] = 0.0
    w[2] = 3.0
    result = search_quant_params(w, SIGNED_4BIT + ["int4"], channel_axis=0)
    assert torch.isfinite(result.scale).all() and (result.scale > 0).all()
    q = fake_quant(w, result.fmt, result.scale[:, None])
    assert torch.equal(q[1], w[1]) and torch.allclose(q[2], w[2])
    const = torch.full((100,), 2.5)
    for name in UNSIGNED_4BIT + ["uint4"]:
        r = search_quant_params(const, [name])
        assert torch.isfinite(r.scale) and r.mse == pytest.approx(0.0, abs=1e-12)
        assert torch.allclose(fake_quant(const, r.fmt, r.scale, r.zero_point), const)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_quantizers_compute_like_fake_quant(dtype):
    # They computed in half precision: in float16 MIN_SCALE is 0, so a zero-range channel gave 0/0 = NaN, and x/s
    # rounded before the grid rounding (elements landed on other grid values than fake_quant's).
    w = torch.randn(6, 4, 3, 3)
    w[2] = 0.0
    wq = WeightQuantizer("fp4_e2m1", 6)
    wq.initialize(w)
    aq = ActivationQuantizer("ufp4_e2m2")
    x = torch.nn.functional.silu(torch.randn(10000) * 2)
    aq.initialize(x)
    wq, aq, w, x = wq.to(dtype), aq.to(dtype), w.to(dtype), x.to(dtype)
    out_w = wq(w)
    assert out_w.dtype == dtype and torch.isfinite(out_w).all() and not out_w[2].any()
    s, z = aq.scale[0].detach().float(), aq.zero_point[0].detach().float()
    assert torch.equal(aq(x), fake_quant(x, aq.fmt, s, z))
    assert torch.equal(out_w, fake_quant(w, wq.fmt, wq.scale.detach().float().clamp_min(MIN_SCALE).view(-1, 1, 1, 1)))


def test_quantizer_dtypes_follow_casts_down_to_float32_and_no_further():
    wq = WeightQuantizer("fp4_e2m1", 6)
    wq.initialize(torch.randn(6, 4))
    scale = wq.scale.detach().clone()
    assert wq.double().scale.dtype == torch.float64
    # .double().float() used to leave them float64 for good: the checkpoint and the weights digest changed.
    assert wq.float().scale.dtype == torch.float32 and torch.equal(wq.scale, scale)
    assert wq.double().to(torch.bfloat16).scale.dtype == torch.float32 and torch.equal(wq.scale, scale)
    assert wq.half().scale.dtype == torch.float32 and torch.equal(wq.scale, scale)


def test_search_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        search_quant_params(torch.empty(0), SIGNED_4BIT)
    with pytest.raises(ValueError, match="non-finite"):
        search_quant_params(torch.tensor([1.0, float("nan")]), SIGNED_4BIT)
    with pytest.raises(ValueError, match="1 float64 values beyond float32's range"):  # said "non-finite"
        search_quant_params(torch.tensor([1.0, 1e300], dtype=torch.float64), SIGNED_4BIT)
    with pytest.raises(ValueError, match="at least one candidate"):
        search_quant_params(torch.randn(10), [])
    with pytest.raises(TypeError, match="floating-point"):
        search_quant_params(torch.arange(10), SIGNED_4BIT)
    with pytest.raises(ValueError, match="num_clip, num_zero and max_samples must be >= 1, got 0"):
        search_quant_params(torch.randn(10), SIGNED_4BIT, num_clip=0)  # was a ZeroDivisionError
    wq = WeightQuantizer("fp4_e2m1", 4)  # max_samples used to be passed twice: a TypeError
    assert wq.initialize_per_tensor(torch.randn(4, 8), max_samples=16).scale.shape == ()


@pytest.mark.parametrize("name", ["ufp4_e2m2", "uint4"])
def test_search_never_picks_a_grid_beyond_float32(name):
    # max - min of data near ±3e38 overflows float32: those candidates' scale is inf and their MSE NaN, which argmin
    # picked (scale inf, MSE nan) instead of the finite candidates.
    x = torch.tensor([-3e38, 3e38, 1.0, -2.0, 5e37])
    result = search_quant_params(x, name)
    assert math.isfinite(result.mse) and torch.isfinite(result.scale) and torch.isfinite(result.zero_point)
    assert torch.isfinite(fake_quant(x, result.fmt, result.scale, result.zero_point)).all()


def test_search_is_bounded_and_deterministic(monkeypatch):
    import msfp.quantizers as quantizers

    searched, real = [], quantizers._sorted_prefix_sums
    monkeypatch.setattr(quantizers, "_sorted_prefix_sums", lambda rows: searched.append(rows.shape) or real(rows))
    x = torch.randn(200000)
    a = search_quant_params(x, UNSIGNED_4BIT, max_samples=4096, seed=3)
    b = search_quant_params(x, UNSIGNED_4BIT, max_samples=4096, seed=3)
    assert searched == [(1, 4096)] * 2  # of the 200000 values
    assert a.fmt == b.fmt and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert search_quant_params(x, UNSIGNED_4BIT, max_samples=4096, seed=4).mse != a.mse  # another draw


def test_weight_quantizer_initialize_and_forward():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    wq = WeightQuantizer("fp4_e2m1", 8)
    result = wq.initialize(w, SIGNED_4BIT)
    assert wq.fmt == result.fmt
    expected = fake_quant(w, result.fmt, result.scale.view(8, 1, 1, 1))
    assert torch.equal(wq(w), expected)
    assert ((wq(w) - w).pow(2).mean().item()) == pytest.approx(result.mse, rel=1e-4)
    wq.enabled = False
    assert wq(w) is w
    with pytest.raises(ValueError, match="output channels"):
        WeightQuantizer("fp4_e2m1", 3)(w)


@pytest.mark.parametrize("fmt,shape", [("fp4_e2m1", (8, 4, 3, 3)), ("ufp4_e2m2", (8, 5))])
def test_weight_quantizer_on_stacked_weight_sets_equals_one_call_per_set(fmt, shape):
    torch.manual_seed(1)
    wq = WeightQuantizer(fmt, 8)
    with torch.no_grad():
        wq.scale.copy_(torch.rand(8) * 0.2 + 0.05)
        wq.zero_point.copy_(-torch.rand(8) * 0.3)
    sets = [torch.randn(shape, requires_grad=True) for _ in range(3)]
    stacked = wq(torch.stack(sets), stacked=True)
    assert all(torch.equal(stacked[i], wq(w)) for i, w in enumerate(sets))
    stacked.pow(2).sum().backward()
    grads = [w.grad.clone() for w in sets]
    for w in sets:
        w.grad = None
        wq(w).pow(2).sum().backward()
        assert torch.equal(w.grad, grads.pop(0))
    with pytest.raises(ValueError, match=r"weight of shape \(8, 3, 5\) has not the 8 output channels"):
        wq(torch.randn(8, 3, 5), stacked=True)
    for init in (wq.initialize, wq.initialize_per_tensor):  # were torch's "expanded size" RuntimeError
        with pytest.raises(ValueError, match=r"weight of shape \(5, 3\) has not the 8 output channels"):
            init(torch.randn(5, 3))


def test_float8_inputs_are_quantized_in_float32():
    # isfinite and clamp have no float8 kernels: every entry point failed with NotImplementedError.
    x = torch.randn(256)
    x8 = x.to(torch.float8_e4m3fn)
    result = search_quant_params(x8, ["fp4_e2m1"])
    assert torch.equal(result.scale, search_quant_params(x8.float(), ["fp4_e2m1"]).scale)
    aq = ActivationQuantizer("fp4_e2m1")
    aq.initialize(x8, ["fp4_e2m1"])
    out = aq(x8)
    assert out.dtype == torch.float8_e4m3fn and torch.equal(out.float(), aq(x8.float()).to(x8.dtype).float())


def test_quantizer_state_dict_restores_format():
    aq = ActivationQuantizer("fp4_e2m1", num_groups=2)
    aq.initialize(torch.nn.functional.silu(torch.randn(5000) * 2), SIGNED_4BIT + UNSIGNED_4BIT)
    restored = ActivationQuantizer("int4", num_groups=2)
    restored.load_state_dict(aq.state_dict())
    assert restored.fmt == aq.fmt and not restored.fmt.signed
    x = torch.randn(3, 7)
    assert torch.equal(restored(x), aq(x))


def test_activation_groups_and_gradients():
    torch.manual_seed(0)
    aq = ActivationQuantizer("ufp4_e2m2", num_groups=3)
    early, late = torch.randn(4000) * 4, torch.randn(4000) * 0.1
    aq.initialize(torch.cat([early, late]))
    aq.initialize(early, group=0)
    aq.initialize(late, group=2)
    assert aq.scale[0] > 10 * aq.scale[2]
    x = torch.randn(3, 5, requires_grad=True)
    groups = torch.tensor([0, 2, 1])
    out = aq(x, groups)
    for i, g in enumerate(groups.tolist()):
        assert torch.equal(out[i], fake_quant(x[i].detach(), aq.fmt, aq.scale[g].detach(), aq.zero_point[g].detach()))
    out.sum().backward()
    assert aq.scale.grad is not None and aq.scale.grad.abs().sum() > 0
    assert aq.zero_point.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match="do not match a batch"):
        aq(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        aq.initialize(early, group=3)


def test_quantizers_store_what_the_search_found():
    # The comparisons used each quantizer's own zero point against itself: dropping it on store passed them.
    torch.manual_seed(0)
    silu = torch.nn.functional.silu(torch.randn(4096) * 3)
    act = ActivationQuantizer("fp4_e2m1")
    result = act.initialize(silu, UNSIGNED_4BIT)
    assert result.zero_point is not None and result.zero_point.item() < 0
    assert act.fmt == result.fmt and act.scale[0] == result.scale and act.zero_point[0] == result.zero_point
    w = torch.randn(6, 5) - 0.5
    weights = WeightQuantizer("fp4_e2m1", 6)
    result = weights.initialize(w, ["ufp4_e2m2"])
    assert torch.equal(weights.scale, result.scale) and torch.equal(weights.zero_point, result.zero_point)


def test_per_channel_search_along_another_axis_is_the_search_of_the_transpose():
    torch.manual_seed(0)
    x = torch.randn(7, 3) * torch.tensor([0.1, 1.0, 10.0])
    along_columns = search_quant_params(x, SIGNED_4BIT, channel_axis=1)
    rows = search_quant_params(x.t(), SIGNED_4BIT, channel_axis=0)
    assert along_columns.fmt == rows.fmt and torch.equal(along_columns.scale, rows.scale)


def test_a_per_tensor_weight_search_sees_every_element():
    # Past max_samples (2^15) elements the search drew a random subsample, which can miss the one outlier.
    w = torch.randn(64, 4096) * 0.01  # 8 times max_samples
    w[17, 311] = 5.0
    result = WeightQuantizer("fp4_e2m1", 64).initialize_per_tensor(w)
    assert result.scale == search_quant_params(w, ["fp4_e2m1"], max_samples=w.numel()).scale
    assert result.scale != search_quant_params(w, ["fp4_e2m1"]).scale  # the subsample's differs


def test_a_zero_scale_gives_finite_values_not_nan():
    q = WeightQuantizer("fp4_e2m1", 2)
    with torch.no_grad():
        q.scale.zero_()  # a zero-range channel's scale before the MIN_SCALE floor: 0/0
    assert torch.isfinite(q(torch.zeros(2, 3))).all()


def test_searches_refuse_empty_candidates_and_ignored_ones():
    act = ActivationQuantizer("fp4_e2m1", num_groups=2)
    with pytest.raises(ValueError, match="needs at least one candidate"):  # used the current format, silently
        act.initialize(torch.randn(100), [])
    with pytest.raises(ValueError, match="needs at least one candidate"):
        WeightQuantizer("fp4_e2m1", 2).initialize(torch.randn(2, 3), [])
    with pytest.raises(ValueError, match=r"group 1 keeps the format all groups share \(fp4_e2m1\)"):
        act.initialize(torch.randn(100), ["ufp4_e2m2"], group=1)


@pytest.mark.parametrize("magnitude", [1e30, 1e35])
def test_the_search_works_for_any_finite_float32_data(magnitude):
    # The errors went through float32: past ~1e19 every candidate's was inf, argmin took the first (the smallest
    # clip, 1/num_clip of the range), and the format search kept its first candidate.
    torch.manual_seed(0)
    x = torch.randn(4096) * magnitude
    result = search_quant_params(x, ["fp4_e2m1", "fp4_e1m2"])
    small = search_quant_params(x / magnitude, ["fp4_e2m1", "fp4_e1m2"])
    assert result.fmt == small.fmt and math.isfinite(result.mse)
    assert result.scale / magnitude == pytest.approx(small.scale.item(), rel=1e-5)
