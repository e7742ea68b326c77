import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

import msfp
from msfp import QuantConfig
from msfp.attention import QuantAttnProcessor, attention_modules, attention_quantizers
from msfp.checkpoint import read_quant_meta
from msfp.info import describe, low_bit_fractions
from msfp.surgery import set_quantizers_enabled
from tiny_models import scheduler, tiny_cond_unet, tiny_dit, tiny_plain, tiny_unet

FAMILIES = {
    "unet": (tiny_unet, {}),
    "cond-unet": (tiny_cond_unet, {"encoder_hidden_states": torch.randn(4, 3, 8)}),
    "dit": (tiny_dit, {"class_labels": torch.tensor([0, 1, 2, 1])}),
}
ATTENTION = QuantConfig(quantize_attention=True)


def inputs(model, cond):
    torch.manual_seed(1)
    c = model.config
    return torch.randn(4, c.in_channels, c.sample_size, c.sample_size), torch.tensor([3, 250, 700, 999]), cond


def run(model, x, t, cond):
    with torch.no_grad():
        return model(x, t, **cond).sample


def calibrated(build, config=ATTENTION, cond=None):
    fp = build()
    q = msfp.quantize(copy.deepcopy(fp), copy.deepcopy(config))
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=3, disable=True,
                   cond={"encoder_hidden_states": cond} if cond is not None else None)
    return fp, q


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_quantizers_compute_diffusers_attention(family):
    build, cond = FAMILIES[family]
    fp = build()
    q = msfp.quantize(copy.deepcopy(fp), ATTENTION)
    assert attention_modules(q) and all(isinstance(a.processor, QuantAttnProcessor)
                                        for a in attention_modules(q).values())
    assert len(attention_quantizers(q)) == 4 * len(attention_modules(q))
    set_quantizers_enabled(q, False)
    x, t, cond = inputs(fp, cond)
    torch.testing.assert_close(run(q, x, t, cond), run(fp, x, t, cond), rtol=0, atol=1e-5)  # fp: fused SDPA
    for attn in attention_modules(fp).values():
        attn.set_processor(AttnProcessor())
    assert torch.equal(run(q, x, t, cond), run(fp, x, t, cond))  # the same explicit computation


@pytest.mark.parametrize("kwargs", [
    dict(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="layer_norm",
         upcast_attention=True, upcast_softmax=True),
    dict(query_dim=32, heads=2, dim_head=4, norm_num_groups=2, spatial_norm_dim=3, residual_connection=True,
         rescale_output_factor=2.0),  # SpatialNorm has 32 groups
])
def test_processor_matches_attn_processor_on_every_path(kwargs):
    torch.manual_seed(0)
    attn = Attention(**kwargs).eval()
    if "cross_attention_dim" in kwargs:  # cross-attention with norm_cross and a padding mask
        args = (torch.randn(2, 5, 8),)
        call = dict(encoder_hidden_states=torch.randn(2, 3, 6), attention_mask=torch.tensor([[[0.0, 0, -1e4]]] * 2))
    else:  # image tokens (B, C, H, W) with spatial norm, group norm, residual connection and output rescaling
        args = (torch.randn(2, 32, 4, 4),)
        call = dict(temb=torch.randn(2, 3, 2, 2))
    with torch.no_grad():
        expected = AttnProcessor()(attn, *args, **call)
        assert torch.equal(QuantAttnProcessor()(attn, *args, **call), expected)
        attn.set_processor(QuantAttnProcessor())
        assert torch.equal(attn(*args, **call), expected)


class AttentionDenoiser(nn.Module):
    def __init__(self, **attention):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 8), Attention(query_dim=8, heads=2, dim_head=4, **attention),\
            nn.Linear(8, 8)

    def forward(self, x, t):
        return self.out(self.attn(self.inp(x)))


@pytest.mark.parametrize("scale_qk", [True, False])
def test_processor_computes_what_the_default_processor_computes_with_qk_norms(scale_qk):
    # AttnProcessor2_0 (the default) applies norm_q/norm_k; AttnProcessor (scale_qk=False's default) ignores them.
    torch.manual_seed(0)
    fp = AttentionDenoiser(qk_norm="layer_norm", scale_qk=scale_qk).eval()
    for norm in (fp.attn.norm_q, fp.attn.norm_k):  # not the identity LayerNorm starts as
        nn.init.normal_(norm.weight)
    assert type(fp.attn.processor) is (AttnProcessor2_0 if scale_qk else AttnProcessor)
    q = msfp.quantize(copy.deepcopy(fp), ATTENTION)
    set_quantizers_enabled(q, False)
    x, t = torch.randn(2, 6, 8), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(q(x, t), fp(x, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale_qk, processor, ignored", [
    (True, AttnProcessor, "its norm_q/norm_k"), (False, AttnProcessor2_0, "scale_qk=False")])
def test_a_non_default_processor_that_computes_otherwise_is_refused(scale_qk, processor, ignored):
    fp = AttentionDenoiser(qk_norm="layer_norm", scale_qk=scale_qk)
    fp.attn.set_processor(processor())
    with pytest.raises(ValueError, match=f"attention 'attn' runs {processor.__name__}, which ignores {ignored}"):
        msfp.quantize(fp, ATTENTION)


def test_attention_msfp_cannot_reproduce_can_stay_full_precision():
    from diffusers import UNet2DConditionModel

    from msfp.layers import QuantLayer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # added-KV attention (AttnAddedKVProcessor2_0) in the mid block only
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=8, norm_num_groups=4,
        attention_head_dim=2).eval()
    with pytest.raises(ValueError, match="attention 'mid_block.attentions.0' uses AttnAddedKVProcessor2_0, which "
                                         "msfp cannot replace") as refused:
        msfp.quantize(unet, ATTENTION)
    selector = r"mid_block\.attentions\.0\.attn_.*"
    assert f'full_precision_layers=[r"{selector}"]' in str(refused.value)  # what to paste
    assert not any(isinstance(m, QuantLayer) for m in unet.modules())  # refused before any layer was replaced
    # Keeping it full precision used to be refused all the same, and its processor would have been replaced too.
    q = msfp.quantize(unet, QuantConfig(quantize_attention=True, full_precision_layers=[selector]))
    processors = {n: type(a.processor).__name__ for n, a in attention_modules(q).items()}
    assert processors.pop("mid_block.attentions.0") == "AttnAddedKVProcessor2_0"
    assert set(processors.values()) == {"QuantAttnProcessor"} and q.msfp_quantized_attention == sorted(processors)
    # Its matmuls count in the FLOPs too: FlopCounterMode does not see SDPA's CPU kernel, which it runs.
    from torch.utils.flop_counter import FlopCounterMode

    from msfp.attention import explicit_attention

    x, t, text = torch.randn(1, 1, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as fused:
        q(x, t, encoder_hidden_states=text)
    with torch.no_grad(), FlopCounterMode(display=False) as explicit, explicit_attention(q):
        q(x, t, encoder_hidden_states=text)
    # The mid block: 16 channels (heads × head dim), 4x4 = 16 queries, 16 + 3 keys (its own and the text's); QKᵀ
    # and P·V, 2 FLOPs per multiply-accumulate.
    assert explicit.get_total_flops() - fused.get_total_flops() == 2 * (2 * 16 * 19 * 16)
    assert type(q.mid_block.attentions[0].processor).__name__ == "AttnAddedKVProcessor2_0"  # restored afterwards


def test_flops_of_fused_attention_kernels_count_on_cpu():
    class Fused(nn.Module):  # e.g. a joint-attention processor, which msfp cannot run as explicit matmuls
        def forward(self, q, k):
            return nn.functional.scaled_dot_product_attention(q, k, k)

    from torch.utils.flop_counter import FlopCounterMode

    from msfp.attention import counting_flops

    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 5, 8)
    with FlopCounterMode(display=False) as plain:
        Fused()(q, k)
    with counting_flops(Fused()) as counted:
        Fused()(q, k)
    assert plain.get_total_flops() == 0  # torch registers SDPA's formula for its GPU kernels only
    # QKᵀ and P·V over 2 × 4 heads of 16 queries, 5 keys, head dim 8; 2 FLOPs per multiply-accumulate.
    assert counted.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 5 * 8)


@pytest.mark.parametrize("per_key", [False, True])
def test_boolean_and_per_key_masks_mean_what_they_mean_to_sdpa(per_key):
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    x, text = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    keep = torch.tensor([[[True, True, False]], [[True, False, False]]])
    masks = [keep, torch.zeros(keep.shape).masked_fill(~keep, -1e4)]
    # Boolean masks failed in baddbmm ("input bool"); (B, keys) ones broadcast wrongly (an error, or with B·heads
    # queries a silently wrong result).
    with torch.no_grad():
        for mask in masks:
            mask = mask[:, 0] if per_key else mask
            expected = AttnProcessor2_0()(attn, x, encoder_hidden_states=text, attention_mask=mask)
            got = QuantAttnProcessor()(attn, x, encoder_hidden_states=text, attention_mask=mask)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_half_precision_upcast_attention_takes_a_mask():
    # The half-precision mask went into baddbmm with the float32 scores of upcast_attention: "Input dtypes must be
    # the same" (diffusers' AttnProcessor fails the same way; the default AttnProcessor2_0 runs).
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=6, upcast_attention=True).eval()
    attn.to(torch.bfloat16)
    x, text = torch.randn(2, 5, 16, dtype=torch.bfloat16), torch.randn(2, 3, 6, dtype=torch.bfloat16)
    mask = torch.tensor([[[0.0, 0, -1e4]], [[0.0, -1e4, -1e4]]], dtype=torch.bfloat16)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, x, encoder_hidden_states=text, attention_mask=mask)
        attn.set_processor(QuantAttnProcessor())
        got = attn(x, encoder_hidden_states=text, attention_mask=mask)
    assert got.dtype == torch.bfloat16
    # Up to bfloat16 rounding (the scores are float32 here, bfloat16 in SDPA); the outputs average 0.36 in size.
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=2e-3)


def test_calibration_picks_unsigned_formats_for_probabilities():
    fp, q = calibrated(tiny_unet)
    quantizers = attention_quantizers(q)
    assert set(quantizers) == {f"{a}.attn_{t}" for a in attention_modules(q) for t in ("q", "k", "probs", "v")}
    for name, quantizer in quantizers.items():
        info = quantizer.info
        assert info["act_format"] == quantizer.act_quantizer.fmt.name and info["act_mse"] >= 0, name
        assert torch.isfinite(quantizer.act_quantizer.scale).all() and (quantizer.act_quantizer.scale > 0).all()
        if quantizer.tensor == "probs":  # softmax output, in [0, 1]: mixup-sign searches unsigned candidates
            assert info["aal"] and 0 <= info["act_min"] and info["act_max"] <= 1, name
            assert info["act_format"].startswith("ufp4") and set(msfp.QuantConfig().aal_act_formats) < set(
                info["act_mse_by_format"]), name
        else:  # Q, K, V of this model are two-sided
            assert not info["aal"] and info["act_format"].startswith("fp4"), name
    _, plain = calibrated(tiny_unet, QuantConfig())
    assert not attention_quantizers(plain)
    assert all(type(a.processor) is AttnProcessor2_0 for a in attention_modules(plain).values())
    x, t, cond = inputs(fp, {})
    assert not torch.equal(run(q, x, t, cond), run(plain, x, t, cond))
    # Same FLOPs in total (attention matmuls counted either way); QKᵀ and P·V of every attention now at 4 bits.
    assert q.msfp_flops == plain.msfp_flops
    meta, plain_meta = msfp.checkpoint.quant_meta(q), msfp.checkpoint.quant_meta(plain)
    macs = sum(i["macs"] for i in meta["attention"].values() if i["kind"] in ("attn-q", "attn-probs"))  # one per matmul
    fractions, plain_fractions = low_bit_fractions(meta), low_bit_fractions(plain_meta)
    assert fractions["attention_matmuls_4bit"] == 2 * len(attention_modules(q))
    assert fractions["flops_4bit"] == pytest.approx(plain_fractions["flops_4bit"] + 2 * macs / q.msfp_flops["total"])


def test_signed_only_preset_keeps_probabilities_signed():
    _, q = calibrated(tiny_dit, QuantConfig.from_dict({**QuantConfig.preset("w4a4-fp").to_dict(),
                                                       "quantize_attention": True}))
    assert {quantizer.info["act_format"][:3] for quantizer in attention_quantizers(q).values()} == {"fp4"}


def test_timestep_groups_get_their_own_scales():
    _, q = calibrated(tiny_unet, QuantConfig(quantize_attention=True, act_timestep_groups=3))
    scales = attention_quantizers(q)["mid_block.attentions.0.attn_probs"].act_quantizer.scale
    assert scales.shape == (3,) and len(set(scales.tolist())) == 3  # one trajectory step per group


def test_policy_selectors_match_attention_inputs():
    config = QuantConfig(quantize_attention=True, full_precision_layers=[r"mid_block\.attentions\.0\..*"],
                         eight_bit_layers=["@first", "@last", r".*\.attn_probs"])
    q = msfp.quantize(tiny_unet(), config)
    quantizers = attention_quantizers(q)
    assert not any(n.startswith("mid_block.attentions.0.") for n in quantizers)
    assert "mid_block.attentions.0.attn_q" in q.msfp_full_precision_layers
    assert isinstance(q.mid_block.attentions[0].to_q, nn.Linear)  # the block's linears too
    assert {n for n, quantizer in quantizers.items() if quantizer.precision == "8bit"} == \
        {n for n in quantizers if n.endswith("attn_probs")}
    with pytest.raises(ValueError, match="has no diffusers Attention module"):
        msfp.quantize(tiny_plain(), ATTENTION)
    unusual = tiny_unet()
    unusual.mid_block.attentions[0].set_processor(QuantAttnProcessor())
    with pytest.raises(ValueError, match="'mid_block.attentions.0' uses QuantAttnProcessor, which msfp cannot"):
        msfp.quantize(unusual, ATTENTION)


@pytest.mark.parametrize("family", ["unet", "cond-unet"])
def test_save_load_round_trip_is_exact(tmp_path, family):
    build, cond = FAMILIES[family]
    config = QuantConfig(quantize_attention=True, act_timestep_groups=2,
                         full_precision_layers=[r"mid_block\..*\.attn_v"],
                         eight_bit_layers=["@first", "@last", r".*\.attn_k"])
    _, q = calibrated(build, config, cond.get("encoder_hidden_states"))
    msfp.save_quantized(q, tmp_path / "q")
    loaded = msfp.load_quantized(tmp_path / "q")
    x, t, cond = inputs(q, cond)
    assert torch.equal(run(loaded, x, t, cond), run(q, x, t, cond))
    saved, reloaded = attention_quantizers(q), attention_quantizers(loaded)
    assert {quantizer.precision for quantizer in saved.values()} == {"4bit", "8bit"}
    assert not [n for n in saved if n.startswith("mid_block") and n.endswith("attn_v")]
    assert set(reloaded) == set(saved) and all(isinstance(a.processor, QuantAttnProcessor)
                                               for a in attention_modules(loaded).values())
    for name, quantizer in saved.items():
        assert reloaded[name].precision == quantizer.precision and reloaded[name].info == quantizer.info
    text = describe(read_quant_meta(tmp_path / "q"))
    assert "attn-probs" in text and "ufp4_" in text and "attention matmuls: quantized" in text


def test_nan_in_query_names_the_attention_and_timestep():
    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), ATTENTION)
    with torch.no_grad():
        q.mid_block.attentions[0].to_q.bias[0] = float("nan")  # the quantized copy breaks after the trajectories
    with pytest.raises(FloatingPointError, match=r"attention attn-q input 'mid_block\.attentions\.0\.attn_q' received "
                                                 r"NaN/inf inputs at timestep\(s\) \[\d+"):
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True)


def test_finetuning_trains_the_attention_input_scales():
    from msfp.finetune import FinetuneConfig, finetune

    fp, q = calibrated(tiny_unet)
    before = {n: m.act_quantizer.scale.detach().clone() for n, m in attention_quantizers(q).items()}
    finetune(q, fp, scheduler(), FinetuneConfig(iters=4, batch_size=4, traj_samples=4, traj_steps=3, rank=2,
                                                act_lr=1e-2), disable=True)
    after = {n: m.act_quantizer.scale.detach() for n, m in attention_quantizers(q).items()}
    assert before and any(not torch.equal(before[n], after[n]) for n in before)


def test_replacing_the_processor_of_a_quantized_attention_is_an_error():
    _, q = calibrated(tiny_unet)
    x, t, cond = inputs(q, {})
    expected = run(q, x, t, cond)
    for attn in attention_modules(q).values():  # what set_attn_processor does: would drop the quantizers silently
        attn.set_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match=r"attention '.*attentions\.0' has quantized matmul inputs but runs "
                                           r"AttnProcessor2_0.*set_attn_processor"):
        run(q, x, t, cond)
    for attn in attention_modules(q).values():
        attn.set_processor(QuantAttnProcessor())
    assert torch.equal(run(q, x, t, cond), expected)


def test_calibration_cache_is_keyed_by_what_is_recorded(tmp_path):
    # A cache written without attention quantizers must neither be reused for a model with them nor change its result.
    fp = tiny_unet()
    plain = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(plain, fp, scheduler(), num_samples=4, num_steps=3, disable=True, cache_dir=tmp_path)
    reports, models = [], []
    for cache_dir in (tmp_path, tmp_path, None):
        q = msfp.quantize(copy.deepcopy(fp), copy.deepcopy(ATTENTION))
        reports.append(msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=3, disable=True,
                                      cache_dir=cache_dir))
        models.append(q)
    assert [r.cached for r in reports] == [False, True, False]  # recorded once, then reused
    assert len(list(tmp_path.glob("layer-inputs-*.safetensors"))) == 2
    for q in models[:2]:
        assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), models[2].state_dict().values())
                   if isinstance(a, torch.Tensor))


def test_fusing_the_projections_of_a_quantized_model_is_an_error():
    # diffusers' fuse_qkv_projections() builds full-precision to_qkv/to_kv copies of the quantized to_q/to_k/to_v and
    # switches to a processor that runs them: the projections silently ran full precision.
    q = msfp.quantize(tiny_cond_unet(), "w4a4-msfp")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8)}
    expected = q(x, t, **cond).sample
    q.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match=r"attention '.*attn1' has quantized q/k/v projections but runs "
                                           r"FusedAttnProcessor2_0.*unfuse_qkv_projections"):
        q(x, t, **cond)
    q.unfuse_qkv_projections()
    assert torch.equal(q(x, t, **cond).sample, expected)
    # Fused before quantizing, the fused projections are ordinary layers, quantized like the others (the unused
    # separate ones stay full precision: calibration would say they never ran).
    fp = tiny_cond_unet()
    fp.fuse_qkv_projections()
    config = QuantConfig.preset("w4a4-msfp")
    config.full_precision_layers = [r".*\.attn\d\.to_[qkv]"]
    fused = msfp.quantize(copy.deepcopy(fp), config)
    msfp.calibrate(fused, fp, scheduler(), num_samples=2, num_steps=2, cond=cond, disable=True)
    assert type(fused.mid_block.attentions[0].transformer_blocks[0].attn1.to_qkv).__name__ == "QuantLayer"
    assert fused(x, t, **cond).sample.isfinite().all()
