import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import msfp
from msfp.config import SIGNED_FP4, UNSIGNED_FP4
from msfp.formats import fake_quant, get_format
from msfp.fp8 import E4M3, Fp8Layer, act_codes, backend_summary, convert_to_fp8, e4m3_shift, fp8_kernels_available
from msfp.surgery import quant_layers
from tiny_models import scheduler, tiny_dit, tiny_plain, tiny_unet

FOUR_BIT = SIGNED_FP4 + UNSIGNED_FP4 + ["int4", "uint4"]


@pytest.mark.parametrize("name", FOUR_BIT + ["fp6_e2m3", "fp6_e3m2"])
def test_every_grid_value_is_an_e4m3_value(name):
    fmt = get_format(name)
    shift = e4m3_shift(fmt)
    assert shift == 0
    values = fmt.values()
    assert torch.equal(values.to(E4M3).float(), values)


@pytest.mark.parametrize("name", ["int8", "uint8", "fp8_e4m3", "fp8_e5m2"])
def test_grids_finer_than_e4m3_have_no_shift(name):
    assert e4m3_shift(get_format(name)) is None


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(FOUR_BIT), seed=st.integers(0, 2**16), log_scale=st.floats(-8, 4),
       zero=st.floats(-2, 2))
def test_codes_decode_to_the_fake_quant_values(name, seed, log_scale, zero):
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, generator=gen) * 4
    scale = torch.tensor(2.0**log_scale)
    zp = torch.tensor(zero) if fmt.needs_zero_point else None
    codes = act_codes(x, fmt, scale, zp, e4m3_shift(fmt))
    assert codes.dtype == E4M3
    decoded = codes.float() * scale + (zp if zp is not None else 0.0)
    assert torch.equal(decoded, fake_quant(x, fmt, scale, zp))


def calibrated(build, config="w4a4-msfp", sample_shape=None):
    fp = build()
    q = msfp.quantize(copy.deepcopy(fp), config)
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=3, sample_shape=sample_shape, disable=True)
    return q


def layer_inputs(model, x, t, **cond):
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a: inputs.setdefault(m.name, a[0].detach()))
             for layer in quant_layers(model).values()]
    with torch.no_grad():
        model(x, t, **cond)
    for h in hooks:
        h.remove()
    return inputs


MODELS = {
    "unet": (tiny_unet, {}, (1, 8, 8), None),
    "unet_timestep_groups": (tiny_unet, dict(act_timestep_groups=4), (1, 8, 8), None),
    "dit": (tiny_dit, {}, (4, 8, 8), {"class_labels": torch.tensor([0, 1, 2])}),
    "plain": (tiny_plain, {}, (1, 8, 8), None),
}


@pytest.mark.parametrize("case", MODELS)
def test_each_fp8_layer_equals_its_fake_quant_layer_up_to_fp32_summation(case):
    build, overrides, shape, cond = MODELS[case]
    config = msfp.QuantConfig.preset("w4a4-msfp")
    for k, v in overrides.items():
        setattr(config, k, v)
    q = calibrated(build, config, sample_shape=shape if case == "plain" else None)
    torch.manual_seed(0)
    x, t = torch.randn(3, *shape), torch.tensor([5, 400, 999])
    inputs = layer_inputs(q, x, t, **(cond or {}))
    q.msfp_context.set_timesteps(t, 3, x.device)
    converted = 0
    for name, layer in quant_layers(q).items():
        try:
            fp8 = Fp8Layer(layer, use_kernels=False)
        except ValueError:
            assert layer.precision == "8bit", name  # only the 8-bit INT/E4M3-480 edge layers may stay fake-quant
            continue
        converted += 1
        x_in = inputs[name]
        with torch.no_grad():
            ref, got = layer(x_in), fp8(x_in)
            # Each product of two codes is exact in fp32; only the order of the fp32 sums differs, so the error is
            # bounded by (terms summed)·2^-23 times the sum of |terms| (plus the bias and zero-point terms).
            groups = q.msfp_context.groups(layer.act_quantizer.num_groups, len(x_in), name)
            qa = layer.act_quantizer(x_in, groups).abs()
            qw = layer.quantized_weight().abs()
            bound = F.linear(qa, qw) if layer.kind == "linear" else F.conv2d(qa, qw, None, **layer.conv_args)
            terms = qw[0].numel() + 2
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert ((got - ref).abs() <= terms * 2.0**-23 * (bound + ref.abs()) + 1e-30).all(), name
    assert converted >= len(quant_layers(q)) - 4


def test_fp8_layers_take_what_nn_layers_take_and_keep_their_dtypes_through_a_cast():
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 400, 999])
    for groups in (1, 4):
        q = calibrated(tiny_unet, msfp.QuantConfig(act_timestep_groups=groups))
        inputs = layer_inputs(q, x, t)
        for name in ("down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.to_q"):
            layer, fp8 = quant_layers(q)[name], Fp8Layer(quant_layers(q)[name], use_kernels=False)
            if groups > 1:
                q.msfp_context.set_timesteps(t[:1], 1, x.device)
                with pytest.raises(ValueError, match=f"{name}: an input of 3 rows for a batch of 1 samples"):
                    fp8(inputs[name])  # the opaque shape error of a broadcast, before
                continue
            one = inputs[name][0]  # unbatched: (C, H, W) or (tokens, C); a conv's came back 4-D, a token failed
            with torch.no_grad():
                assert fp8(one).shape == layer(one).shape and torch.equal(fp8(one), fp8(one[None])[0])
                if one.dim() == 2:
                    assert torch.equal(fp8(one[0]), fp8(one[:1])[0])
                dtypes = {k: v.dtype for k, v in fp8.state_dict().items()}
                before = fp8(inputs[name])
                # model.to(bfloat16) used to make the E4M3 codes bfloat16 and round the fp32 scales and zero points.
                assert fp8.to(torch.bfloat16) is fp8 and {k: v.dtype for k, v in fp8.state_dict().items()} == dtypes
                assert torch.equal(fp8(inputs[name]), before)


def _conv_layer(seed, padding=1, **kwargs):
    from msfp.layers import QuantContext, QuantLayer

    torch.manual_seed(seed)
    layer = QuantLayer(torch.nn.Conv2d(4, 6, 3, padding=padding), "c", "fp4_e2m1", "ufp4_e2m2", QuantContext(),
                       **kwargs)
    with torch.no_grad():
        layer.weight_quantizer.scale.copy_(layer.weight.abs().amax((1, 2, 3)) / 6)
        layer.act_quantizer.scale.fill_(0.3)
        layer.act_quantizer.zero_point.fill_(-0.5)
    return layer



def _linear_layer():
    from msfp.layers import QuantContext, QuantLayer

    layer = QuantLayer(torch.nn.Linear(8, 6), "l", "fp4_e2m1", "fp4_e2m1", QuantContext())
    with torch.no_grad():
        layer.act_quantizer.scale.fill_(0.5)
    return layer


@pytest.mark.parametrize("use_kernels", [False, True])
def test_fp8_layers_refuse_integer_inputs(use_kernels):
    # The emulation computed in int64: scales truncated to 0 and an output of INT64_MIN.
    for layer, x in ((_conv_layer(0), torch.randint(-3, 4, (1, 4, 3, 3))),
                     (_linear_layer(), torch.randint(-3, 4, (2, 8)))):
        with pytest.raises(TypeError, match=f"{layer.name}: expected a floating-point input, got torch.int64"):
            Fp8Layer(layer, use_kernels=use_kernels)(x)



@pytest.mark.parametrize("use_kernels", [False, True])
def test_fp8_layers_name_the_input_shape_they_expect(use_kernels):
    # Each failed deep inside: a broadcast in the emulation, the kernel's w_codes check (which blamed grouping).
    conv, linear = Fp8Layer(_conv_layer(0), use_kernels=use_kernels), Fp8Layer(_linear_layer(), use_kernels=use_kernels)
    for x in (torch.randn(2, 5, 6, 6), torch.randn(2, 4, 1, 1, 1), torch.randn(4, 6)):
        with pytest.raises(ValueError, match=rf"c: expected a \(N, 4, H, W\) or \(4, H, W\) input, got shape "
                                             rf"{re.escape(str(tuple(x.shape)))}"):
            conv(x)
    for x in (torch.randn(2, 3, 9), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=rf"l: expected an input of 8 features in its last dimension, got shape "
                                             rf"{re.escape(str(tuple(x.shape)))}"):
            linear(x)
    # Smaller than the kernel: torch's error (or the kernels' "output would be empty") named no layer.
    small = Fp8Layer(_conv_layer(0, padding=0), use_kernels=use_kernels)
    for x in (torch.randn(1, 4, 2, 5), torch.randn(4, 2, 5)):
        with pytest.raises(ValueError, match=r"c: expected an input of at least 3×3 pixels for its 3×3 kernel "
                                             r"\(padding \(0, 0\), dilation \(1, 1\)\), got 2×5"):
            small(x)


def test_nan_inputs_give_nan_outputs_where_the_fake_quant_layer_does():
    # The emulated path keeps the NaN code 0x7F a NaN, as FP8 tensor cores do (Triton's interpreter reads it as 480:
    # see msfp.triton_kernels).
    x, tokens = torch.randn(2, 4, 5, 5), torch.randn(3, 8)
    x[0, 1, 2, 3] = tokens[1, 4] = float("nan")
    for layer, inputs in ((_conv_layer(0), x), (_linear_layer(), tokens)):
        with torch.no_grad():
            ref, got = layer(inputs), Fp8Layer(layer, use_kernels=False)(inputs)
        assert ref.isnan().any() and not ref.isnan().all()
        assert torch.equal(got.isnan(), ref.isnan()), layer.name


def test_loading_other_weights_into_an_fp8_layer_refreshes_its_zero_point_correction():
    a, b = _conv_layer(0), _conv_layer(1)
    fa, fb = Fp8Layer(a, use_kernels=False), Fp8Layer(b, use_kernels=False)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        fa(x)  # caches the correction for 5x5 inputs
        fa.load_state_dict(fb.state_dict())
        assert torch.equal(fa(x), fb(x))  # it used to keep a's correction: off by up to 0.8


def test_converting_under_inference_mode_gives_the_same_model_and_never_a_stale_correction():
    # Converted inside inference_mode, the first call failed: "Inference tensors do not track version counter".
    q = calibrated(tiny_unet)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 999])
    outside = copy.deepcopy(q)
    convert_to_fp8(outside, use_kernels=False)
    with torch.no_grad():
        reference = outside(x, t).sample
    with torch.inference_mode():
        inside = copy.deepcopy(q)  # inference tensors throughout
        convert_to_fp8(inside, use_kernels=False)
        assert torch.equal(inside(x, t).sample, reference)
    # Its FP8 layers' buffers are normal tensors: their border corrections stay cached.
    layers = [m for m in inside.modules() if isinstance(m, Fp8Layer)]
    assert layers and not any(b.is_inference() for layer in layers for b in layer.buffers())
    # Inference tensors count no in-place versions, yet inference mode writes them in place (load_state_dict).
    a, b = _conv_layer(0), _conv_layer(1)
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        fa, fb = Fp8Layer(a, use_kernels=False), Fp8Layer(b, use_kernels=False)
        fa(x)
        fa.load_state_dict(fb.state_dict())
        assert torch.equal(fa(x), fb(x))


def test_fp8_layers_take_empty_inputs_channels_last_and_float64_as_fake_quant_does():
    from msfp.layers import QuantContext, QuantLayer

    context = QuantContext()
    linear = QuantLayer(torch.nn.Linear(6, 4), "m", "fp4_e2m1", "ufp4_e2m2", context, act_groups=4)
    with torch.no_grad():
        linear.weight_quantizer.scale.fill_(0.05)
        linear.act_quantizer.scale.fill_(0.3)
        linear.act_quantizer.zero_point.fill_(-0.4)
    context.set_timesteps(torch.tensor([0, 300]), 2, "cpu")
    empty = torch.randn(2, 0, 6)  # no tokens: the per-timestep scales were not spread over zero rows
    with torch.no_grad():
        assert Fp8Layer(linear, use_kernels=False)(empty).shape == linear(empty).shape == (2, 0, 4)

    conv = _conv_layer(0)
    model = torch.nn.Sequential(Fp8Layer(conv, use_kernels=False))
    model.to(memory_format=torch.channels_last)  # refused: "required rank 4 tensor" for the 5-D conv codes
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(model(x), Fp8Layer(conv, use_kernels=False)(x))

    conv64 = _conv_layer(0).double()
    with torch.no_grad():
        conv64.act_quantizer.scale.fill_(0.25)
    # Just past the tie 1.125 of the unsigned E2M2 grid (1, 1.25) in float64, which fp32 rounds onto the tie.
    tie = torch.full((1, 4, 5, 5), -0.5 + 0.25 * (1.125 + 1e-12), dtype=torch.float64)
    with torch.no_grad():
        ref, got = conv64(tie), Fp8Layer(conv64, use_kernels=False)(tie)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # A float64 layer's scale that float32 cannot hold (0.3): rounded to float32, the grid moved and an input just past
    # the tie 1.25 (between codes 1 and 1.5) got code 1, a whole step off.
    linear64 = QuantLayer(torch.nn.Linear(1, 1, bias=False), "m", "fp4_e2m1", "fp4_e2m1", QuantContext()).double()
    with torch.no_grad():
        linear64.weight.fill_(1.0)
        linear64.weight_quantizer.scale.fill_(1 / 6)
        linear64.act_quantizer.scale.fill_(0.3)
        x = torch.tensor([[0.3 * (1.25 + 1e-8)]], dtype=torch.float64)
        assert linear64(x).item() == pytest.approx(0.45, rel=1e-7)
        assert Fp8Layer(linear64, use_kernels=False)(x).item() == pytest.approx(0.45, rel=1e-7)
        # The kernels read at most float32, which could cross the tie: float64 is emulated, or an error if insisted on.
        assert Fp8Layer(linear64)(x).item() == pytest.approx(0.45, rel=1e-7)
        with pytest.raises(ValueError, match="m: the FP8 kernels read float32, bfloat16 or float16 inputs, not float64"):
            Fp8Layer(linear64, use_kernels=True)(x)
    with pytest.raises(ValueError, match="m: use_kernels must be True, False or None, got 'false'"):
        Fp8Layer(linear64, use_kernels="false")  # was taken for True
    with pytest.raises(ValueError, match="use_kernels must be True, False or None, got 'false'"):
        convert_to_fp8(calibrated(tiny_unet), use_kernels="false")


def test_convert_sets_every_layers_accumulation():
    q = calibrated(tiny_unet)
    convert_to_fp8(q, use_kernels=False, precise_acc=False)
    layers = [m for m in q.modules() if isinstance(m, Fp8Layer)]
    assert layers and not any(m.precise_acc for m in layers) and q.msfp_backend["precise_acc"] is False


def test_a_layer_kept_for_a_disabled_quantizer_is_told_which():
    # A W4A16 layer (weights still 4-bit, activations full precision) was reported as "a full-precision layer".
    q = calibrated(tiny_unet)
    layers = quant_layers(q)
    w4a16, a4w16, full = (f"mid_block.attentions.0.{n}" for n in ("to_q", "to_k", "to_v"))
    layers[w4a16].act_quantizer.enabled = layers[a4w16].weight_quantizer.enabled = False
    layers[full].act_quantizer.enabled = layers[full].weight_quantizer.enabled = False
    kept = convert_to_fp8(q, use_kernels=False)
    weights, acts = layers[w4a16].weight_quantizer.fmt.name, layers[a4w16].act_quantizer.fmt.name
    assert kept[w4a16] == (f"its activation quantizer is disabled (weights {weights}, activations full precision); "
                           "the FP8 path needs both quantized")
    assert kept[a4w16] == (f"its weight quantizer is disabled (activations {acts}, weights full precision); the FP8 "
                           "path needs both quantized")
    assert kept[full] == "quantizers are disabled (a full-precision layer)"


def test_backend_summary_says_what_runs_where():
    q = calibrated(tiny_unet)
    kept = convert_to_fp8(q)
    total = len([m for m in q.modules() if isinstance(m, Fp8Layer)]) + len(kept)
    summary = backend_summary(q, "cpu")
    assert summary.startswith(f"backend fp8: {total - len(kept)} of {total} quantized layers on E4M3 codes, emulated "
                              "(cpu device (FP8 tensor cores need a CUDA GPU))")
    assert f"; {len(kept)} stay fake-quant (" in summary and all(name in summary for name in kept)
    q.msfp_backend["kernels"] = False
    assert "emulated (use_kernels=False)" in backend_summary(q, "cuda")
    q.msfp_backend["kernels"] = None
    if not torch.cuda.is_available():
        assert "emulated (no CUDA GPU is visible)" in backend_summary(q, "cuda")


def test_converting_an_fp8_model_again_is_refused_rather_than_relabelled():
    # Its FP8 layers keep the options they were made with; a second conversion used to change only msfp_backend.
    q = calibrated(tiny_unet)
    convert_to_fp8(q, use_kernels=False)
    backend = dict(q.msfp_backend)
    with pytest.raises(ValueError, match=r"convert_to_fp8 needs the fake-quant model, but \d+ layer\(s\) run on the "
                                         r"FP8 backend .* converted with \{'kernels': False, 'linear_gemm': 'triton'"):
        convert_to_fp8(q, use_kernels=False, linear_gemm="scaled_mm")
    assert q.msfp_backend == backend and all(m.linear_gemm == "triton" for m in q.modules() if isinstance(m, Fp8Layer))


def test_convert_keeps_each_layer_on_its_own_device():
    # A model split across devices stays split ("meta" stands in for a second GPU).
    q = calibrated(tiny_unet)
    name = "down_blocks.0.resnets.0.conv1"
    msfp.surgery.quant_layers(q)[name].to("meta")
    convert_to_fp8(q)
    for layer_name, layer in q.named_modules():
        if isinstance(layer, Fp8Layer):
            assert {b.device.type for b in layer.buffers()} == {"meta" if layer_name == name else "cpu"}, layer_name


def test_convert_keeps_unsupported_layers_and_says_why():
    q = calibrated(tiny_unet)
    fake = copy.deepcopy(q)
    kept = convert_to_fp8(q, use_kernels=False)
    assert set(kept) == {n for n, layer in quant_layers(fake).items() if e4m3_shift(layer.act_quantizer.fmt) is None
                         or e4m3_shift(layer.weight_quantizer.fmt) is None}
    assert kept and all("not exactly representable in FP8 E4M3" in why for why in kept.values())
    assert q.msfp_backend == dict(kind="fp8", kernels=False, linear_gemm="triton", tma=None, split_k=1,
                                 precise_acc=True, fake_quant_layers=kept)
    fp8_layers = [m for m in q.modules() if isinstance(m, Fp8Layer)]
    assert len(fp8_layers) == len(quant_layers(fake)) - len(kept)
    # zero-padded convolutions with an unsigned (zero-point) format: the border correction is exercised
    assert any(m.kind == "conv2d" and m.act_zero_point is not None and m.conv_args["padding"] != (0, 0)
               for m in fp8_layers)
    torch.manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 400, 999])
    with torch.no_grad():
        got, ref = q(x, t).sample, fake(x, t).sample
    # End to end the next quantizer may round a value that moved by an ulp to the neighbouring grid point, so only
    # closeness is expected, not the per-layer bound.
    assert (got - ref).abs().mean() < 1e-3 * ref.abs().mean()


def test_an_fp8_model_is_for_inference_and_says_so():
    from msfp.surgery import quantizers_disabled
    from msfp.talora import add_talora

    q = calibrated(tiny_unet)
    convert_to_fp8(q, use_kernels=False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 999])
    assert not q(x, t).sample.requires_grad  # outside torch.no_grad() too: its parameters want no gradient
    # Asking for dL/dx (guidance, a custom training loop) used to give zeros silently.
    with pytest.raises(RuntimeError, match="the FP8 backend is for inference and passes no gradient; use the "
                                           "fake-quant model"):
        q(x.requires_grad_(), t)
    # Helpers that switch quantizers or add LoRAs used to act on the fake-quant layers only.
    with pytest.raises(ValueError, match="switching quantizers needs the fake-quant model"):
        with quantizers_disabled(q):
            pass
    with pytest.raises(ValueError, match="add_talora needs the fake-quant model"):
        add_talora(q)


def test_casting_a_converted_model_keeps_the_grids_of_its_fake_quant_layers():
    from msfp.quantizers import WeightQuantizer

    q = calibrated(tiny_unet)
    kept = convert_to_fp8(q, use_kernels=False)
    grids = {n: p.detach().clone() for n, p in q.named_parameters() if "_quantizer." in n}
    assert kept and any(n.split(".weight_quantizer")[0].split(".act_quantizer")[0] in kept for n in grids)
    q.to(torch.bfloat16)
    # The 8-bit edge layers' scales and zero points used to be rounded to bfloat16: a 2^-9 move of the grid.
    assert all(torch.equal(p, grids[n]) and p.dtype == torch.float32
               for n, p in q.named_parameters() if "_quantizer." in n)
    q.to(torch.float64)  # widening casts still apply
    assert all(p.dtype == torch.float64 for m in q.modules() if isinstance(m, WeightQuantizer) for p in m.parameters())


def test_the_backend_report_lists_quantized_attention_as_fake_quant():
    q = calibrated(tiny_unet, msfp.QuantConfig(quantize_attention=True))
    kept = convert_to_fp8(q, use_kernels=False)
    attention = {n: why for n, why in kept.items() if n.endswith(("attn_q", "attn_k", "attn_v", "attn_probs"))}
    assert attention and set(attention.values()) == {"attention matmul input (fake-quant on every backend)"}
    assert "attention matmul input" in backend_summary(q, "cpu")


def test_routed_talora_model_runs_each_sample_with_its_weight_set():
    from msfp.finetune import FinetuneConfig, finetune

    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=4, disable=True)
    finetune(q, fp, scheduler(), FinetuneConfig(iters=6, batch_size=4, traj_samples=4, traj_steps=4, rank=2,
                                                lora_lr=1e-2), disable=True)
    fake = copy.deepcopy(q)
    convert_to_fp8(q, use_kernels=False)
    assert any(m.num_weight_sets == 4 for m in q.modules() if isinstance(m, Fp8Layer))
    torch.manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 300, 600, 999])  # four different LoRAs
    with torch.no_grad():
        got, ref = q(x, t).sample, fake(x, t).sample
        single = fake(x[2:3], t[2:3]).sample
    assert (got - ref).abs().mean() < 1e-3 * ref.abs().mean()
    assert (got[2:3] - single).abs().mean() < 1e-3 * single.abs().mean()


def test_a_routed_fp8_layer_takes_an_empty_token_sequence():
    # Each sample routed to its own weight set, no tokens: the rows were split by sample counts, not row counts
    # ("split_with_sizes expects split_sizes to sum exactly to 2"), where the fake-quant layer gave (2, 0, 6).
    from msfp.layers import QuantContext, QuantLayer
    from msfp.talora import LoRABank

    context = QuantContext()
    layer = QuantLayer(torch.nn.Linear(8, 6), "to_q", "fp4_e2m1", "fp4_e2m1", context)
    layer.lora = LoRABank(layer.weight.shape, num_loras=2, rank=2, seed=0)
    fp8 = Fp8Layer(layer, use_kernels=False)
    context.set_route(torch.eye(2))  # sample 0 takes weight set 0, sample 1 weight set 1
    empty = torch.randn(2, 0, 8)
    with torch.no_grad():
        got, ref = fp8(empty), layer(empty)
    assert got.shape == ref.shape == (2, 0, 6) and got.dtype == ref.dtype


def test_kernels_requested_where_they_cannot_run_fail_clearly(monkeypatch):
    q = calibrated(tiny_unet)
    available, why = fp8_kernels_available("cpu")
    assert not available and "CUDA" in why
    with pytest.raises(RuntimeError, match="cannot run here: cpu device"):
        convert_to_fp8(q, use_kernels=True)
    # Converted with use_kernels=True on a GPU, then moved to the CPU: the summary and the layer say so.
    convert_to_fp8(q, use_kernels=False)
    for layer in q.modules():
        if isinstance(layer, Fp8Layer):
            layer.use_kernels = True
    q.msfp_backend["kernels"] = True
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/test_triton_kernels.py sets it when collected
    assert "not runnable here: converted with use_kernels=True, but cpu device" in backend_summary(q, "cpu")
    with pytest.raises(RuntimeError, match=r"down_blocks\..*: converted with use_kernels=True, but Triton kernels "
                                           r"need CUDA tensors \(got a tensor on cpu\)|down_blocks\..*: converted with use_kernels=True, but "
                                           r"msfp.triton_kernels needs the `triton` package"):
        with torch.no_grad():
            q(torch.randn(1, 1, 8, 8), torch.tensor([5]))
    # Under Triton's interpreter, CPU tensors run the kernels themselves.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "with the Triton FP8 kernels, interpreted" in backend_summary(q, "cpu")



@pytest.fixture
def rocm(monkeypatch):
    """What a ROCm torch reports for an AMD Instinct MI300X: device type "cuda", compute capability 9.4."""
    from msfp.fp8 import _kernels_available

    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    _kernels_available.cache_clear()
    yield
    _kernels_available.cache_clear()


class _RocmTensor(torch.Tensor):
    is_cuda = True  # as a ROCm torch says of an AMD GPU's tensors (this one stays on the CPU)


def test_rocm_gpus_get_the_emulated_path_not_the_nvidia_kernels(rocm, monkeypatch):
    from msfp import triton_kernels

    # 9.4 passed the ≥ 8.9 check: the kernels (NVIDIA's E4M3 type, TMA, wgmma tiles) were chosen for AMD GPUs.
    reason = "ROCm/HIP device: the FP8 kernels target NVIDIA sm_89+"
    assert fp8_kernels_available("cuda:0") == (False, reason)
    q = calibrated(tiny_unet)
    convert_to_fp8(q)
    assert f"emulated ({reason})" in backend_summary(q, "cuda")
    q.msfp_backend["kernels"] = True
    assert f"not runnable here: converted with use_kernels=True, but {reason}" in backend_summary(q, "cuda")
    # Where the kernels are insisted on (use_kernels=True), their launches and TMA refuse the device too.
    x = torch.zeros(1, 4, 4, 32, dtype=E4M3).as_subclass(_RocmTensor)
    assert triton_kernels.tma_unsupported(x, torch.zeros(16, 3, 3, 32, dtype=E4M3)) == reason
    with pytest.raises(triton_kernels.KernelsUnavailable, match=re.escape(reason)):
        triton_kernels._require_triton(x)
    monkeypatch.setattr(triton_kernels, "HAS_TRITON", False)  # (the reason, not "install triton", where it is absent)
    with pytest.raises(triton_kernels.KernelsUnavailable, match=re.escape(reason)):
        triton_kernels._require_triton(x)


def test_triton_older_than_the_tested_versions_gets_the_emulated_path():
    from msfp.fp8 import _triton_too_old

    assert "Triton 3.4.0 is older than 3.6" in _triton_too_old("3.4.0")
    assert _triton_too_old("2.3.1") is not None
    for version in ("3.6.0", "3.9.0", "3.10.0+git1a2b3c", "4.0.0"):
        assert _triton_too_old(version) is None


def test_kernel_launchers_without_triton_say_so(monkeypatch):
    from msfp import triton_kernels

    # What the module holds when `import triton` failed.
    monkeypatch.setattr(triton_kernels, "HAS_TRITON", False)
    monkeypatch.setattr(triton_kernels, "triton", None)
    for kernel in ("_act_codes_kernel", "_conv_fp8_kernel", "_conv_fp8_tuned"):
        monkeypatch.delattr(triton_kernels, kernel, raising=False)
    x, w = torch.zeros(1, 4, 4, 8, dtype=torch.float8_e4m3fn), torch.zeros(6, 3, 3, 8, dtype=torch.float8_e4m3fn)
    calls = [lambda: triton_kernels.conv2d_fp8(x, w, torch.ones(1), torch.ones(6)),
             lambda: triton_kernels.linear_fp8(x[0, 0], w[:, 0, 0], torch.ones(4), torch.ones(6)),
             lambda: triton_kernels.act_codes(torch.zeros(2, 8), "fp4_e2m1", torch.ones(2), None),
             lambda: triton_kernels.compile_ahead(triton_kernels.conv2d_fp8, x, w, torch.ones(1), torch.ones(6))]
    for call in calls:
        with pytest.raises(RuntimeError, match="needs the `triton` package, which is not installed"):
            call()


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_kernels_available("cuda")[0]),
                    reason="needs a GPU with FP8 tensor cores and triton")
def test_triton_path_matches_the_emulated_path_on_gpu():
    q = calibrated(tiny_unet).cuda()
    torch.manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8, device="cuda"), torch.tensor([5, 400, 999], device="cuda")
    inputs = layer_inputs(q, x, t)
    q.msfp_context.set_timesteps(t, 3, x.device)
    for name, layer in quant_layers(q).items():
        try:
            emulated, kernel = Fp8Layer(layer, use_kernels=False), Fp8Layer(layer, use_kernels=True)
        except ValueError:
            continue
        with torch.no_grad():
            ref, got = emulated(inputs[name]), kernel(inputs[name])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN's TF32 default)")
def test_emulated_zero_point_correction_is_not_rounded_to_tf32_on_gpu():
    # cuDNN runs float32 convolutions in TF32 unless told otherwise: the per-tap weight sums lost all but 11 bits.
    q = calibrated(tiny_unet)
    checked = 0
    for layer in quant_layers(q).values():
        try:
            fp8 = Fp8Layer(layer, use_kernels=False)
        except ValueError:
            continue
        if fp8.kind != "conv2d" or fp8.weight_tap_sums is None:
            continue
        on_cpu = fp8._zero_point_correction(0, (8, 8), kernels=False)
        on_gpu = fp8.cuda()._zero_point_correction(0, (8, 8), kernels=False)
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-6, atol=0, msg=layer.name)
        checked += 1
    assert checked


def test_loading_with_the_fp8_backend(tmp_path):
    q = calibrated(tiny_unet)
    out = msfp.save_quantized(q, tmp_path / "q")
    fake, fp8 = msfp.load_quantized(out), msfp.load_quantized(out, backend="fp8")
    assert fp8.msfp_backend["kind"] == "fp8" and fp8.msfp_backend["fake_quant_layers"]
    layers = [m for m in fp8.modules() if isinstance(m, Fp8Layer)]
    assert layers and all(m.use_kernels is None and m.weight_codes.dtype == E4M3 for m in layers)
    torch.manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 400, 999])
    with torch.no_grad():
        got, ref = fp8(x, t).sample, fake(x, t).sample
    assert (got - ref).abs().mean() < 1e-3 * ref.abs().mean()
    with pytest.raises(ValueError, match="unknown backend 'int4'"):
        msfp.load_quantized(out, backend="int4")
