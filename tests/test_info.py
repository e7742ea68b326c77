import copy

import pytest
import torch

import msfp
from msfp.checkpoint import quant_meta
from msfp.info import describe, layer_rows, low_bit_fractions, resolved_selectors
from test_checkpoint import _edit_meta
from tiny_models import scheduler, tiny_unet


def meta_of(preset):
    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), preset)
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True)
    return quant_meta(q)


@pytest.fixture(scope="module")
def metas():
    return {preset: meta_of(preset) for preset in ("w4a4-msfp", "w4a8-msfp", "w6a6-msfp")}


def test_fractions_at_4_bits_follow_the_formats_not_the_layer_group(metas):
    w4a4, w4a8, w6a6 = (low_bit_fractions(metas[p]) for p in ("w4a4-msfp", "w4a8-msfp", "w6a6-msfp"))
    assert 0.9 < w4a4["weights_4bit"] < 1 and 0.9 < w4a4["flops_4bit"] < 1 and w4a4["layers_4bit"] > 0
    # W4A8: the same 4-bit weights, but no matmul has both operands at 4 bits.
    assert w4a8["weights_4bit"] == w4a4["weights_4bit"] and w4a8["flops_4bit"] == 0 == w4a8["layers_4bit"]
    # W6A6 used to count as "99 % at 4 bits": its main layers are in the group the edges are not.
    assert w6a6["weights_4bit"] == 0 == w6a6["flops_4bit"] == w6a6["layers_4bit"]
    assert "weights at 4 bits: 0.0 %" in describe(metas["w6a6-msfp"])


def test_a_config_is_called_a_preset_only_when_it_is_one(metas):
    # A config kept a preset's name after an edit, or named one in a JSON file without its fields: msfp info called
    # it that preset.
    assert "\npreset w4a4-msfp: " in describe(metas["w4a4-msfp"])
    # Re-saved after loading by older versions, its layer selectors ("@first", ...) are the layer names they
    # resolved to: still the preset.
    resolved = copy.deepcopy(metas["w4a4-msfp"])
    del resolved["quantization_config"]["selectors_as_given"]  # not recorded then
    names = resolved_selectors(resolved)["eight_bit_layers"]
    assert "conv_in" in names and "time_embedding\\.linear_1" in names
    resolved["quantization_config"]["eight_bit_layers"] = names
    assert "\npreset w4a4-msfp: " in describe(resolved)
    # Other selectors are a change: with none, its edge layers are at 4 bits (it was called the preset).
    for selectors in ([], ["conv_in"]):
        edited = copy.deepcopy(metas["w4a4-msfp"])
        edited["quantization_config"]["eight_bit_layers"] = selectors
        assert "(preset w4a4-msfp with eight_bit_layers changed): " in describe(edited)
    edited = copy.deepcopy(metas["w4a4-msfp"])
    edited["quantization_config"].update(act_timestep_groups=4, aal_act_formats=[])
    assert ("\nconfig 'w4a4-msfp' (preset w4a4-msfp with aal_act_formats, act_timestep_groups changed): "
            in describe(edited))
    edited["quantization_config"]["name"] = "custom"
    assert "\nconfig 'custom': " in describe(edited)


def test_a_loaded_and_saved_again_model_keeps_the_selectors_it_was_quantized_with(tmp_path):
    # A loaded model selects its layers by their saved names; saved again (msfp finetune on a checkpoint) the file
    # held those names instead of the selectors, so an edited selector list could not be told from the preset's.
    fp = tiny_unet()
    config = msfp.QuantConfig.preset("w4a4-msfp")
    for selectors in (["@first", "conv_out"], ["conv_in", "conv_out"]):  # plain names are their escaped form too
        config.eight_bit_layers = selectors
        q = msfp.quantize(copy.deepcopy(fp), config)
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True)
        msfp.save_quantized(q, tmp_path / "a")
        msfp.save_quantized(msfp.load_quantized(tmp_path / "a"), tmp_path / "b")
        for name in ("a", "b"):
            meta = msfp.checkpoint.read_quant_meta(tmp_path / name)
            assert meta["quantization_config"]["eight_bit_layers"] == selectors
            assert "(preset w4a4-msfp with eight_bit_layers changed): " in describe(meta)
        assert msfp.load_quantized(tmp_path / "b").msfp_config.eight_bit_layers == ["conv_in", "conv_out"]
    # A checkpoint of older versions re-saved after loading holds the resolved names, unmarked: saved again, it stays
    # unmarked, and its names are not taken for an edit of the preset's roles.
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True)
    msfp.save_quantized(q, tmp_path / "old")
    names = resolved_selectors(msfp.checkpoint.read_quant_meta(tmp_path / "old"))["eight_bit_layers"]
    _edit_meta(tmp_path / "old", lambda meta: meta["quantization_config"].update(eight_bit_layers=names)
               or meta["quantization_config"].pop("selectors_as_given"))
    msfp.save_quantized(msfp.load_quantized(tmp_path / "old"), tmp_path / "again")
    meta = msfp.checkpoint.read_quant_meta(tmp_path / "again")
    assert meta["quantization_config"]["selectors_as_given"] is False and "\npreset w4a4-msfp: " in describe(meta)


def test_the_errors_of_a_fine_tuned_model_are_named_as_calibrations(metas):
    # Fine-tuning changes weights and activation scales, not the recorded errors: they read as the model's own.
    note = "weight_mse and act_mse are calibration's, before fine-tuning"
    assert note not in describe(metas["w4a4-msfp"])
    tuned = copy.deepcopy(metas["w4a4-msfp"])
    tuned["finetune"] = dict(iters_done=2, lora="single", loss="mse")
    assert note in describe(tuned) and "fine-tuned: 2 iterations, lora=single, loss=mse" in describe(tuned)


def test_bits_column_shows_each_layers_formats(metas):
    bits = {p: {r["name"]: r["bits"] for r in layer_rows(metas[p])} for p in metas}
    assert bits["w4a4-msfp"]["conv_in"] == "w8a8" and bits["w4a4-msfp"]["down_blocks.0.resnets.0.conv1"] == "w4a4"
    assert bits["w4a8-msfp"]["down_blocks.0.resnets.0.conv1"] == "w4a8"
    assert set(bits["w6a6-msfp"].values()) == {"w6a6", "w8a8"}


def test_a_layer_called_twice_per_forward_counts_its_work_twice():
    from tiny_models import PlainDenoiser

    class Twice(PlainDenoiser):  # mid runs twice per forward
        def forward(self, x, t):
            h = self.act(self.inp(x) + self.t_proj(t.float()[:, None] / 1000)[:, :, None, None])
            return self.out(self.act(self.mid(self.act(self.mid(h)))))

    torch.manual_seed(0)
    fp = Twice().eval()
    q = msfp.quantize(copy.deepcopy(fp), msfp.QuantConfig(eight_bit_layers=[]))
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, sample_shape=(1, 8, 8), disable=True)
    meta = quant_meta(q)
    assert meta["layers"]["mid"]["macs"] == 2 * 8 * 8 * 8 * 8 * 9  # two 3×3 convs of 8→8 channels on 8×8
    assert low_bit_fractions(meta)["flops_4bit"] == 1.0  # every layer is 4-bit: it said 0.53 in a similar model


def test_layers_msfp_cannot_quantize_are_named_and_count_in_the_totals_only():
    from tiny_models import PlainDenoiser

    class WithTransposed(PlainDenoiser):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ConvTranspose2d(8, 8, 3, padding=1)

        def forward(self, x, t):
            h = self.act(self.inp(x) + self.t_proj(t.float()[:, None] / 1000)[:, :, None, None])
            return self.out(self.act(self.mid(self.up(h))))

    torch.manual_seed(0)
    fp = WithTransposed().eval()
    with pytest.warns(UserWarning, match=r"1 layer\(s\) msfp cannot quantize stay full precision: up "
                                         r"\(ConvTranspose2d\)"):
        q = msfp.quantize(copy.deepcopy(fp), msfp.QuantConfig(eight_bit_layers=[]))
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, sample_shape=(1, 8, 8), disable=True)
    meta = quant_meta(q)
    assert meta["quantization_config"]["unsupported_layers"] == {"up": "ConvTranspose2d"}
    assert "full precision, as msfp quantizes only Conv2d and Linear: up (ConvTranspose2d)" in describe(meta)
    # Every other layer is 4-bit; the transposed conv's MACs (8·8·9 per pixel, as mid's) are in the total only.
    quantized_macs = (1 * 8 * 9 + 8 * 8 * 9 + 8 * 1 * 9) * 64 + 8
    assert low_bit_fractions(meta)["flops_4bit"] == pytest.approx(quantized_macs / (quantized_macs + 8 * 8 * 9 * 64))


def test_the_4bit_weight_share_counts_parameters_once_and_no_buffers():
    class Normed(torch.nn.Module):  # BatchNorm's running statistics are state, not weights; the head is tied
        def __init__(self):
            super().__init__()
            self.inp, self.norm = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.mid, self.out = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Linear(8, 8)
            self.t_embed = torch.nn.Embedding(10, 8)
            self.t_embed.weight = self.out.weight

        def forward(self, x, t):
            h = self.mid(self.norm(self.inp(x)) + self.t_embed(t.long() % 10)[:, :, None, None])
            return self.out(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)[:, :1]

    torch.manual_seed(0)
    fp = Normed().eval()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(1, 4, 4))
    meta = quant_meta(q)
    assert meta["base_parameters"] == sum(p.numel() for p in fp.parameters())  # was + 17 buffers + 64 tied
    four = sum(i["weights"] for i in meta["layers"].values() if i["weight_format"].startswith("fp4"))
    assert low_bit_fractions(meta)["weights_4bit"] == four / sum(p.numel() for p in fp.parameters())
