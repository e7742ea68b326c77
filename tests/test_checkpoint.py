import copy
import json
import shutil
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL, DDIMPipeline, DDPMPipeline, DiTPipeline
from safetensors.torch import load_file, save_file

import msfp
import msfp.talora
from msfp import checkpoint
from msfp.cli import main
from msfp.formats import fake_quant
from msfp.samples import load_samples
from msfp.packing import decode, pack, quantize_to_codes, unpack
from msfp.quantizers import MIN_SCALE, WeightQuantizer
from msfp.surgery import quant_layers
from tiny_models import (PlainDenoiser, scheduler, sdxl_cond, tiny_dit, tiny_pixart, tiny_plain, tiny_sdxl_unet,
                         tiny_unet)


def calibrated(build=tiny_unet, preset="w4a4-msfp", **kwargs):
    fp = build()
    q = msfp.quantize(copy.deepcopy(fp), preset)
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=2, disable=True, **kwargs)
    return q


def outputs(model, shape, **cond):
    torch.manual_seed(1)
    with torch.no_grad():
        return msfp.models.denoise(model, torch.randn(3, *shape), torch.tensor([5, 400, 999]), **cond)


def unet_outputs(model):
    return outputs(model, (1, 8, 8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A calibrated tiny UNet and its packed checkpoint directory."""
    q = calibrated()
    return q, msfp.save_quantized(q, tmp_path_factory.mktemp("ckpt") / "q")


@pytest.mark.parametrize("build", [tiny_unet, tiny_dit, tiny_pixart, tiny_sdxl_unet])
def test_round_trip_is_exact_without_full_precision_weights(tmp_path, build):
    text = torch.randn(4, 3, 8)
    given = {tiny_pixart: {"encoder_hidden_states": text}, tiny_sdxl_unet: sdxl_cond(4)}.get(build)
    q = calibrated(build, cond=given) if given else calibrated(build)
    msfp.save_quantized(q, tmp_path / "q")
    loaded = msfp.load_quantized(tmp_path / "q")
    shape = (q.config.in_channels, q.config.sample_size, q.config.sample_size)
    cond = {tiny_unet: {}, tiny_dit: {"class_labels": torch.tensor([0, 1, 2])},
            tiny_pixart: {"encoder_hidden_states": text[:3]}, tiny_sdxl_unet: sdxl_cond(3, seed=1)}[build]
    assert torch.equal(outputs(loaded, shape, **cond), outputs(q, shape, **cond))
    msfp.checkpoint.unfreeze_weights(loaded)  # the re-quantizing path gives the same outputs
    assert torch.equal(outputs(loaded, shape, **cond), outputs(q, shape, **cond))
    assert {n: layer.info for n, layer in quant_layers(loaded).items()} == \
        json.loads(json.dumps({n: layer.info for n, layer in quant_layers(q).items()}))
    for name, layer in quant_layers(loaded).items():
        assert torch.equal(layer.weight, quant_layers(q)[name].quantized_weight())


def test_file_holds_packed_codes_not_weights(saved):
    q, out = saved
    state = load_file(out / "model.safetensors")
    for name, layer in quant_layers(q).items():
        assert f"{name}.weight" not in state
        codes = state[f"{name}.weight_codes"]
        bits = 8 if layer.precision == "8bit" else 4
        assert codes.dtype == torch.uint8 and codes.shape == (1, (layer.weight.numel() * bits + 7) // 8)
        assert f"{name}.weight_quantizer.scale" in state and f"{name}.bias" in state
        assert f"{name}.weight_quantizer.zero_point" not in state  # signed weight formats have none
        assert (f"{name}.act_quantizer.zero_point" in state) == layer.act_quantizer.fmt.needs_zero_point
    meta = json.loads((out / "msfp_quant.json").read_text())
    qc = meta["quantization_config"]
    assert qc["quant_method"] == "msfp" and qc["format_version"] == checkpoint.FORMAT_VERSION
    assert qc["weight_storage"]["weight_sets"] == 1 and qc["modules_to_not_convert"] == []
    assert set(qc["versions"]) == {"msfp", "torch", "diffusers"}


def test_saving_the_same_model_again_writes_the_same_bytes(tmp_path, saved):
    # safetensors writes its metadata entries in hash order, which changes between calls: with two entries, equal
    # checkpoints had different bytes and weights_sha256 about every other time.
    q, out = saved
    for i in range(6):
        msfp.save_quantized(q, tmp_path / f"again{i}")
        assert (tmp_path / f"again{i}" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_quant_meta_is_the_saved_metadata_without_writing(saved):
    q, out = saved
    meta = checkpoint.read_quant_meta(out)
    assert meta.pop("meta_sha256") == checkpoint._meta_sha256(meta)
    assert meta.pop("weights_sha256") == checkpoint._sha256(out / "model.safetensors")
    assert checkpoint.quant_meta(q) == meta


def test_an_edited_layer_format_is_refused_not_decoded(tmp_path, saved):
    # Only model.safetensors was checksummed: a layer's weight_format edited in msfp_quant.json decoded its codes on
    # the other grid, and the model loaded and sampled other weights without a word.
    out = tmp_path / "edited"
    shutil.copytree(saved[1], out)
    meta = json.loads((out / "msfp_quant.json").read_text())
    layer = meta["layers"]["down_blocks.0.resnets.0.conv1"]
    layer["weight_format"] = "fp4_e2m1" if layer["weight_format"] == "fp4_e1m2" else "fp4_e1m2"
    (out / "msfp_quant.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(ValueError, match=r"msfp_quant.json: checksum mismatch: the file was edited after msfp saved it"):
        msfp.load_quantized(out)
    r = CliRunner().invoke(main, ["sample", "--model", str(out), "-n", "1", "--steps", "1", "--out",
                                  str(tmp_path / "s.npz")])
    assert r.exit_code == 1 and "checksum mismatch" in r.output, r.output


def test_a_removed_metadata_checksum_is_refused_except_in_version_2_files(tmp_path, saved):
    # Deleting meta_sha256 (to "fix" a checksum error) turned the check off: an edited format decoded other weights.
    out = tmp_path / "edited"
    shutil.copytree(saved[1], out)
    meta = json.loads((out / "msfp_quant.json").read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 3
    del meta["meta_sha256"]
    (out / "msfp_quant.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"msfp_quant.json: its checksum \(meta_sha256\) was removed: the file was "
                                         "edited"):
        msfp.load_quantized(out)
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 1 and "meta_sha256) was removed" in r.output, r.output
    # Version 2 checkpoints, written before the checksum was recorded, still load.
    (out / "msfp_quant.json").write_text(json.dumps({**meta, "format_version": 2}))
    assert torch.equal(unet_outputs(msfp.load_quantized(out)), unet_outputs(saved[0]))


class OwnLoRA(PlainDenoiser):
    """A model with its own low-rank branch called ``lora`` (not msfp's): its layers are the base model's."""

    def __init__(self):
        super().__init__()
        low_rank = torch.nn.Sequential(torch.nn.Conv2d(8, 2, 1), torch.nn.Conv2d(2, 8, 1))
        self.branch = torch.nn.ModuleDict({"lora": low_rank})

    def forward(self, x, t):
        h = self.inp(x) + self.t_proj(t.float().view(-1, 1) / 1000)[:, :, None, None]
        h = self.mid(self.act(h)) + self.branch["lora"](h)
        return self.out(torch.nn.functional.silu(h))


def test_a_models_own_module_named_lora_is_saved(tmp_path):
    # Every key with ".lora." in it was dropped as a merged msfp LoRA factor: the save succeeded (replacing any
    # earlier checkpoint there) and the load failed on the missing biases and scales.
    def build():
        torch.manual_seed(0)
        return OwnLoRA().eval()

    q = calibrated(build, sample_shape=(1, 8, 8))
    assert {"branch.lora.0", "branch.lora.1"} <= set(quant_layers(q))
    msfp.save_quantized(q, tmp_path / "q")
    stored = load_file(tmp_path / "q" / "model.safetensors").keys()
    assert {"branch.lora.0.bias", "branch.lora.1.weight_quantizer.scale"} <= stored
    loaded = msfp.load_quantized(tmp_path / "q", model=build())
    assert torch.equal(outputs(loaded, (1, 8, 8)), outputs(q, (1, 8, 8)))
    # Its parameters are the base model's, which msfp info counts for the 4-bit share.
    assert checkpoint.read_quant_meta(tmp_path / "q")["base_parameters"] == sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_dit_reloads_bit_for_bit(tmp_path, dtype):
    # DiT's positional embedding is a non-persistent buffer: model.to(dtype) cast it, the state dict leaves it out,
    # and the model rebuilt from its config had it in float32 (outputs differed by up to 0.05).
    q = calibrated(tiny_dit).to(dtype)
    msfp.save_quantized(q, tmp_path / "q")
    loaded = msfp.load_quantized(tmp_path / "q")
    assert loaded.pos_embed.pos_embed.dtype == dtype
    torch.manual_seed(1)
    x, t, labels = torch.randn(3, 4, 8, 8, dtype=dtype), torch.tensor([5, 400, 999]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=labels).sample, q(x, t, class_labels=labels).sample)
    # and onto a caller's float32 instance as well
    assert msfp.load_quantized(tmp_path / "q", model=tiny_dit()).pos_embed.pos_embed.dtype == dtype


@pytest.mark.parametrize("preset", ["w4a4-int", "w6a6-msfp", "w8a8-fp"])
def test_other_bit_widths_and_zero_points_round_trip(tmp_path, preset):
    q = calibrated(preset=preset)
    out = msfp.save_quantized(q, tmp_path / "q")
    loaded = msfp.load_quantized(out)
    assert torch.equal(unet_outputs(loaded), unet_outputs(q))
    bits = {"w4a4-int": 4, "w6a6-msfp": 6, "w8a8-fp": 8}[preset]
    state = load_file(out / "model.safetensors")
    conv = quant_layers(q)["down_blocks.0.resnets.0.conv1"]
    assert state["down_blocks.0.resnets.0.conv1.weight_codes"].numel() == conv.weight.numel() * bits // 8


def test_unsigned_weight_formats_store_zero_points(tmp_path):
    fp = tiny_unet()
    config = msfp.QuantConfig(weight_formats=["ufp4_e2m2", "uint4"])
    q = msfp.quantize(copy.deepcopy(fp), config)
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=2, disable=True)
    out = msfp.save_quantized(q, tmp_path / "q")
    assert "down_blocks.0.resnets.0.conv1.weight_quantizer.zero_point" in load_file(out / "model.safetensors")
    assert torch.equal(unet_outputs(msfp.load_quantized(out)), unet_outputs(q))


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "fp6_e3m2", "fp8_e4m3", "int8", "int4",
                                 "ufp4_e2m2", "ufp4_e4m0", "uint4"])
def test_dequantized_weights_are_fixed_points_of_the_quantizer(fmt):
    """The loaded layer's weight is decode(codes)·s (+ z); re-quantizing it with the same scales must give it back
    bit for bit, including zero-range channels and channels whose scale is clamped to MIN_SCALE."""
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.exp(torch.randn(64, 1) * 4)
    w[0] = 0.0  # zero range
    w[1] = 3.0  # constant channel
    w[2] = torch.randn(48) * 1e-20  # scale below MIN_SCALE
    w[3] = w[3] - 1e4  # far from zero (large zero point for unsigned formats)
    w[4, :3] = torch.tensor([-2.5e-45, 1e-38, 0.0])  # subnormal float32 inputs
    quantizer = WeightQuantizer(fmt, 64)
    quantizer.initialize(w, num_clip=9)
    with torch.no_grad():
        quantizer.scale[5] = 1e-30  # e.g. driven below MIN_SCALE by fine-tuning
        expected = quantizer(w)
    assert quantizer.scale[2].item() == pytest.approx(MIN_SCALE) and quantizer.scale[5].item() < MIN_SCALE
    scale = quantizer.scale.detach().clamp_min(MIN_SCALE)[:, None]
    zero = quantizer.zero_point.detach()[:, None] if quantizer.fmt.needs_zero_point else None
    codes = quantize_to_codes(w, fmt, scale, zero)
    codes = unpack(pack(codes, quantizer.fmt.bits), quantizer.fmt.bits, codes.numel()).view(w.shape)
    dequantized = decode(codes, fmt) * scale + (0 if zero is None else zero)
    assert torch.equal(dequantized, expected)
    with torch.no_grad():
        assert torch.equal(quantizer(dequantized), dequantized)
        assert torch.equal(fake_quant(dequantized, fmt, scale, zero), dequantized)


def test_degenerate_channels_survive_a_round_trip(tmp_path):
    fp = tiny_unet()
    with torch.no_grad():
        conv = fp.down_blocks[0].resnets[0].conv1
        conv.weight[0] = 0.0
        conv.weight[1] = 1e-20
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=2, disable=True)
    layer = quant_layers(q)["down_blocks.0.resnets.0.conv1"]
    assert layer.weight_quantizer.scale[:2].tolist() == pytest.approx([MIN_SCALE, MIN_SCALE])
    loaded = msfp.load_quantized(msfp.save_quantized(q, tmp_path / "q"))
    assert torch.equal(quant_layers(loaded)["down_blocks.0.resnets.0.conv1"].weight, layer.quantized_weight())
    assert torch.equal(unet_outputs(loaded), unet_outputs(q))


def test_plain_module_needs_an_instance(tmp_path):
    q = calibrated(tiny_plain, sample_shape=(1, 8, 8))
    msfp.save_quantized(q, tmp_path / "q")
    with pytest.raises(ValueError, match="plain PyTorch module .*PlainDenoiser.*load_quantized\\(dir, model="):
        msfp.load_quantized(tmp_path / "q")
    loaded = msfp.load_quantized(tmp_path / "q", model=tiny_plain())
    assert torch.equal(outputs(loaded, (1, 8, 8)), outputs(q, (1, 8, 8)))
    wrong_size = "does not match .*PlainDenoiser: inp.bias: shape \\(8,\\), model expects \\(16,\\)"
    with pytest.raises(ValueError, match=wrong_size):
        msfp.load_quantized(tmp_path / "q", model=PlainDenoiser(hidden=16))


    class OtherDenoiser(PlainDenoiser):  # same parameters, another computation
        def forward(self, x, t):
            return -super().forward(x, t)

    with pytest.raises(ValueError, match=r"quantized from a tiny_models.PlainDenoiser, not from the model passed "
                                         r"\([\w.<>]*OtherDenoiser\)$"):  # the class once, not twice
        msfp.load_quantized(tmp_path / "q", model=OtherDenoiser())
    # Same class and shapes, another convolution: it loaded and computed something else.
    dilated = tiny_plain()
    dilated.mid.dilation, dilated.mid.padding = (2, 2), (2, 2)
    with pytest.raises(ValueError, match=r"does not match .*PlainDenoiser: mid: dilation \[1, 1\] there, \[2, 2\] "
                                         r"here, padding \[1, 1\] there, \[2, 2\] here"):
        msfp.load_quantized(tmp_path / "q", model=dilated)
    # Same class, shapes and convolutions, another module without weights: it loaded and computed something else.
    gelu = tiny_plain()
    gelu.act = torch.nn.GELU()
    with pytest.raises(ValueError, match=r"quantized from another tiny_models.PlainDenoiser than the model passed: "
                                         r"its module 'act' differs \(a SiLU there, a GELU here\)"):
        msfp.load_quantized(tmp_path / "q", model=gelu)
    missing = tiny_plain()
    del missing.act
    with pytest.raises(ValueError, match=r"its module 'act' differs \(a SiLU there, missing here\)"):
        msfp.load_quantized(tmp_path / "q", model=missing)


def test_a_plain_modules_weightless_settings_must_be_the_saved_ones(tmp_path):
    # A GroupNorm's groups change the output but no weight shape: another count loaded without a word.
    q = calibrated(TiedNorm, sample_shape=(1, 8, 8))
    msfp.save_quantized(q, tmp_path / "q")
    other = TiedNorm()
    other.norm = other.norm_again = torch.nn.GroupNorm(4, 8)
    with pytest.raises(ValueError, match=r"its module 'norm' differs \(num_groups 2 there, 4 here\)"):
        msfp.load_quantized(tmp_path / "q", model=other)
    assert torch.equal(outputs(msfp.load_quantized(tmp_path / "q", model=TiedNorm()), (1, 8, 8)),
                       outputs(q, (1, 8, 8)))



class Scaled(PlainDenoiser):
    """A setting of the model's own (not of a submodule's) and a list-valued one of a submodule's."""

    def __init__(self, t_scale=1000.0, shifts=(0, 0)):
        super().__init__()
        self.t_scale = t_scale
        self.act.shifts = list(shifts)

    def forward(self, x, t):
        return super().forward(torch.roll(x, self.act.shifts, dims=(2, 3)), t * 1000.0 / self.t_scale)


def test_a_plain_models_own_and_list_valued_settings_must_be_the_saved_ones(tmp_path):
    # Neither was recorded: another t_scale or shift loaded and computed something else.
    q = calibrated(Scaled, sample_shape=(1, 8, 8))
    out = msfp.save_quantized(q, tmp_path / "q")
    with pytest.raises(ValueError, match=r"quantized from another .*Scaled than the model passed: its own settings "
                                         r"differ \(t_scale 1000.0 there, 1.0 here\)"):
        msfp.load_quantized(out, model=Scaled(t_scale=1.0))
    with pytest.raises(ValueError, match=r"its module 'act' differs \(shifts \[0, 0\] there, \[1, 1\] here\)"):
        msfp.load_quantized(out, model=Scaled(shifts=(1, 1)))
    assert torch.equal(outputs(msfp.load_quantized(out, model=Scaled()), (1, 8, 8)), outputs(q, (1, 8, 8)))
    # Checkpoints written before the model's own settings were recorded load as they did.
    _edit_meta(out, lambda meta: meta["base_model"].pop("own"))
    msfp.load_quantized(out, model=Scaled(t_scale=1.0))


class WithFunctions(PlainDenoiser):
    def __init__(self):
        super().__init__()
        self.act.choices = (torch.nn.functional.silu, "silu")  # a function's text names its address


def test_a_setting_holding_a_function_does_not_refuse_the_same_model_in_another_process(tmp_path):
    q = calibrated(WithFunctions, sample_shape=(1, 8, 8))
    msfp.save_quantized(q, tmp_path / "q")
    assert "choices" not in checkpoint.read_quant_meta(tmp_path / "q")["base_model"]["modules"]["act"]["settings"]
    msfp.load_quantized(tmp_path / "q", model=WithFunctions())


class WrappedUNet(torch.nn.Module):
    """A plain module around a diffusers UNet (its config is the UNet's, not the wrapper's)."""

    def __init__(self, **config):
        super().__init__()
        torch.manual_seed(0)
        self.unet = type(tiny_unet()).from_config(tiny_unet().config, **config).eval()

    def forward(self, x, t):
        return self.unet(x, t).sample


def test_a_wrapped_diffusers_model_must_have_the_saved_config(tmp_path):
    # A wrapper is a plain module: only its class name was checked, and one around a UNet with another act_fn loaded.
    q = calibrated(WrappedUNet, sample_shape=(1, 8, 8))
    msfp.save_quantized(q, tmp_path / "q")
    with pytest.raises(ValueError, match=r"quantized from another .*WrappedUNet than the model passed: "
                                         r"unet: act_fn 'silu' there, 'mish' here"):
        msfp.load_quantized(tmp_path / "q", model=WrappedUNet(act_fn="mish"))
    hollow = WrappedUNet()
    hollow.unet = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"quantized from a .*WrappedUNet whose unet is a UNet2DModel; in the model "
                                         r"passed it is no diffusers model"):
        msfp.load_quantized(tmp_path / "q", model=hollow)
    loaded = msfp.load_quantized(tmp_path / "q", model=WrappedUNet())
    assert torch.equal(outputs(loaded, (1, 8, 8)), outputs(q, (1, 8, 8)))
    # Checkpoints written before the inner configs were recorded still load (they were refused: "no diffusers model").
    _edit_meta(tmp_path / "q", lambda meta: meta["base_model"].pop("inner"))
    assert torch.equal(outputs(msfp.load_quantized(tmp_path / "q", model=WrappedUNet()), (1, 8, 8)),
                       outputs(q, (1, 8, 8)))


def test_a_model_passed_to_load_must_be_the_saved_architecture(saved):
    # Same tensor shapes, another activation and head size: the shape check alone accepted it.
    _, out = saved
    other = type(tiny_unet()).from_config(tiny_unet().config, act_fn="gelu", attention_head_dim=8)
    with pytest.raises(ValueError, match=r"quantized from another UNet2DModel than the model passed: "
                                         r"act_fn 'silu' there, 'gelu' here, attention_head_dim 4 there, 8 here"):
        msfp.load_quantized(out, model=other)
    with pytest.raises(ValueError, match="quantized from a UNet2DModel, not from the model passed"):
        msfp.load_quantized(out, model=tiny_dit())
    assert torch.equal(unet_outputs(msfp.load_quantized(out, model=tiny_unet())), unet_outputs(msfp.load_quantized(out)))
    # The quantized model (or a loaded one) passed by mistake: "model.safetensors does not match UNet2DModel:
    # missing conv_in.act_quantizer.scale; ...", tensors the file does hold.
    for quantized in (saved[0], msfp.load_quantized(out)):
        with pytest.raises(ValueError, match="the model passed is already quantized by msfp; pass a fresh "
                                             "full-precision instance"):
            msfp.load_quantized(out, model=quantized)


def test_diffusers_list_of_defaulted_keys_is_neither_recorded_nor_obeyed(tmp_path):
    # _use_default_values was recorded in string-hash order (the metadata's bytes differed between processes), and
    # from_config replaced the values it lists by the installed diffusers' defaults: a recorded act_fn was ignored.
    q = calibrated(lambda: type(tiny_unet()).from_config(tiny_unet().config, act_fn="mish"))
    out = msfp.save_quantized(q, tmp_path / "q")
    assert "_use_default_values" not in checkpoint.read_quant_meta(out)["base_model"]["config"]
    _edit_meta(out, lambda meta: meta["base_model"]["config"].update(_use_default_values=["act_fn"]))  # an older one
    loaded = msfp.load_quantized(out)
    assert loaded.config.act_fn == "mish" and torch.equal(unet_outputs(loaded), unet_outputs(q))


def test_a_pipeline_in_place_of_its_denoiser_gets_a_clear_error(tmp_path, saved):
    # Each failed with "'DDIMPipeline' object has no attribute 'named_modules'".
    q, out = saved
    hint = r"expected the denoiser, an nn.Module, got DDIMPipeline: pass its denoiser \(pipe.unet or pipe.transformer"
    with pytest.raises(TypeError, match="save_quantized: " + hint):
        msfp.save_quantized(DDIMPipeline(unet=q, scheduler=scheduler()), tmp_path / "q")
    with pytest.raises(TypeError, match="quant_meta: " + hint):
        checkpoint.quant_meta(DDIMPipeline(unet=q, scheduler=scheduler()))
    with pytest.raises(TypeError, match="load_quantized: " + hint):
        msfp.load_quantized(out, model=DDIMPipeline(unet=tiny_unet(), scheduler=scheduler()))
    assert not (tmp_path / "q").exists()


class TiedNorm(PlainDenoiser):
    """One GroupNorm registered under two names: tied tensors in the state dict."""

    def __init__(self):
        super().__init__()
        self.norm = self.norm_again = torch.nn.GroupNorm(2, 8)

    def forward(self, x, t):
        h = self.norm(self.inp(x)) + self.t_proj(t.float().view(-1, 1) / 1000)[:, :, None, None]
        return self.out(torch.nn.functional.silu(self.mid(self.act(self.norm_again(h)))))


def test_tied_modules_round_trip(tmp_path):
    def build():
        torch.manual_seed(0)
        model = TiedNorm().eval()
        with torch.no_grad():
            model.norm.weight.uniform_(0.5, 1.5)  # not the initial ones, so the test sees them restored
        return model

    q = calibrated(build, sample_shape=(1, 8, 8))
    msfp.save_quantized(q, tmp_path / "q")  # safetensors refused tensors sharing memory
    loaded = msfp.load_quantized(tmp_path / "q", model=TiedNorm())
    assert loaded.norm is loaded.norm_again and torch.equal(loaded.norm.weight, q.norm.weight)
    assert torch.equal(outputs(loaded, (1, 8, 8)), outputs(q, (1, 8, 8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plain_module_on_a_gpu_loads_there(tmp_path):
    q = calibrated(tiny_plain, sample_shape=(1, 8, 8))
    msfp.save_quantized(q, tmp_path / "q")
    loaded = msfp.load_quantized(tmp_path / "q", model=tiny_plain().cuda())
    assert all(p.is_cuda for p in loaded.parameters())
    torch.testing.assert_close(outputs(loaded.cpu(), (1, 8, 8)), outputs(q, (1, 8, 8)), rtol=0, atol=0)


def _edit_meta(out, edit):
    meta = json.loads((out / "msfp_quant.json").read_text())
    edit(meta)
    meta["meta_sha256"] = checkpoint._meta_sha256(meta)  # re-signed: the edits here test the checks behind it
    (out / "msfp_quant.json").write_text(json.dumps(meta))


def test_bad_directories_fail_clearly(tmp_path, saved):
    q, _ = saved
    with pytest.raises(ValueError, match="is not a msfp output directory: msfp_quant.json is missing"):
        msfp.load_quantized(tmp_path)
    with pytest.raises(ValueError, match="never calibrated"):
        msfp.save_quantized(msfp.quantize(tiny_unet(), "w4a4-msfp"), tmp_path / "x")
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(FileExistsError, match="not a msfp output directory; refusing"):
        msfp.save_quantized(q, tmp_path / "pipe")

    out = msfp.save_quantized(q, tmp_path / "q")
    (out / "msfp_quant.json").write_text('{"format_version": 2, ')
    with pytest.raises(ValueError, match="msfp_quant.json: unreadable"):
        msfp.load_quantized(out)

    for version, message in [(99, "format version 99; this msfp .* reads versions 2, 3"),
                             (1, "format version 1 \\(unpacked float32 weights.*re-run msfp quantize\\)")]:
        out = msfp.save_quantized(q, tmp_path / "q")
        _edit_meta(out, lambda meta: meta.update(format_version=version))
        with pytest.raises(ValueError, match=message):
            msfp.load_quantized(out)

    out = msfp.save_quantized(q, tmp_path / "q")
    _edit_meta(out, lambda meta: meta["base_model"]["config"].update(block_out_channels=[8, 32]))
    with pytest.raises(ValueError, match="does not match UNet2DModel: .*shape"):
        msfp.load_quantized(out)

    out = msfp.save_quantized(q, tmp_path / "q")
    _edit_meta(out, lambda meta: meta["base_model"].update(class_name="UNet3DModelThatDoesNotExist"))
    with pytest.raises(ValueError, match="has no model class 'UNet3DModelThatDoesNotExist'; if it is your own "
                                         r"subclass, pass an instance: load_quantized\(dir, model="):
        msfp.load_quantized(out)


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.pop("layers"), "'layers' is missing or not a dict; the file was edited or not written by msfp"),
    (lambda meta: meta.pop("base_model"), "'base_model' is missing"),
    (lambda meta: meta.pop("num_train_timesteps"), "'num_train_timesteps' is missing or not a int"),
    (lambda meta: meta["quantization_config"].pop("modules_to_not_convert"),
     "'quantization_config' has no 'modules_to_not_convert'"),
    (lambda meta: meta["layers"]["conv_in"].pop("precision"), "layers entry 'conv_in' has no 'precision'"),
    (lambda meta: meta["layers"]["conv_out"].update(act_format="fp4_e9m9"),
     "layers entry 'conv_out': act_format 'fp4_e9m9': format 'fp4_e9m9'"),
])
def test_damaged_metadata_names_the_file_and_the_entry(tmp_path, saved, edit, message):
    out = msfp.save_quantized(saved[0], tmp_path / "q")
    _edit_meta(out, edit)
    with pytest.raises(ValueError, match="msfp_quant.json: .*" + message):
        msfp.load_quantized(out)


def test_metadata_that_is_not_utf8_is_reported_as_unreadable(tmp_path, saved):
    out = msfp.save_quantized(saved[0], tmp_path / "q")
    data = bytearray((out / "msfp_quant.json").read_bytes())
    data[10] = 0xDF  # one damaged byte
    (out / "msfp_quant.json").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="msfp_quant.json: unreadable .*utf-8"):
        msfp.load_quantized(out)


def test_a_save_interrupted_between_its_renames_is_pointed_out(tmp_path, saved):
    out = msfp.save_quantized(saved[0], tmp_path / "q")
    out.rename(tmp_path / ".q.old")  # what a crash between the two renames leaves, with the new version's directory
    from test_fileio import dead_writers_directory

    dead_writers_directory(out)
    with pytest.raises(FileNotFoundError, match=r"\.q\.old holds its previous version, left by an interrupted save"):
        msfp.load_quantized(out)
    for command in (["info", out], ["sample", "--model", out, "--out", tmp_path / "s.npz"], ["finetune", out]):
        r = CliRunner().invoke(main, [str(a) for a in command])  # sample said "not a Hub id", finetune "no such dir"
        assert r.exit_code == 1 and ".q.old holds its previous version" in r.output, (command, r.output)
    msfp.save_quantized(saved[0], out)  # puts it back first, then replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]

    # The same, by a writer on another host: nothing can tell it is gone, so the messages say what to do.
    out.rename(tmp_path / ".q.old")
    (tmp_path / ".q.tmp-otherhost_4026531836-77-x").mkdir()
    for command in (["info", out], ["sample", "--model", out, "--out", tmp_path / "s.npz"]):
        r = CliRunner().invoke(main, [str(a) for a in command])
        assert r.exit_code == 1 and ("q.old holds its previous version, moved aside by a save that has not finished: "
                                     "if none is running, rename it back") in r.output, (command, r.output)
    with pytest.raises(FileExistsError, match=r"if no save of .*q is running, rename .*\.q\.old back to"):
        msfp.save_quantized(saved[0], out)
    # Before the work, not after it: quantize used to calibrate fully, then refuse to save.
    from msfp import calibration

    def calibrate(*args, **kwargs):
        raise AssertionError("calibrated before refusing")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(calibration, "calibrate", calibrate)
        r = CliRunner().invoke(main, ["quantize", "--out", str(out)])
    assert r.exit_code == 1 and "q.old back to" in r.output, r.output


def test_info_reads_checkpoints_written_before_quantized_attention(tmp_path, saved):
    out = msfp.save_quantized(saved[0], tmp_path / "q")
    _edit_meta(out, lambda meta: meta["quantization_config"].pop("quantize_attention"))
    from msfp.info import describe

    assert "attention matmuls: full precision" in describe(checkpoint.read_quant_meta(out))


def test_a_failed_load_leaves_the_callers_model_unchanged(tmp_path):
    q = calibrated(tiny_plain, sample_shape=(1, 8, 8))
    out = msfp.save_quantized(q, tmp_path / "q")
    torch.manual_seed(0)
    mine = PlainDenoiser(hidden=16)
    before = copy.deepcopy(mine.state_dict())
    with pytest.raises(ValueError, match="does not match tiny_models.PlainDenoiser: inp.bias: shape \\(8,\\), model "
                                         "expects \\(16,\\)"):
        msfp.load_quantized(out, model=mine)
    assert type(mine.mid) is torch.nn.Conv2d and not hasattr(mine, "msfp_config")
    assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())
    msfp.quantize(mine, "w4a4-msfp")  # it used to be left quantized: "already quantized"

    def normed():  # the same class with a module added since (a checkpoint of an older version of it, say)
        model = tiny_plain()
        model.norm = torch.nn.GroupNorm(2, 8)
        return model

    mine = normed()  # a tensor the checkpoint lacks was found only after quantizing the caller's model
    with pytest.raises(ValueError, match="its module 'norm' differs \\(missing there, a GroupNorm here\\)"):
        msfp.load_quantized(out, model=mine)
    assert type(mine.mid) is torch.nn.Conv2d and not hasattr(mine, "msfp_config")
    with pytest.raises(ValueError, match="its module 'norm' differs \\(a GroupNorm there, missing here\\)"):
        msfp.load_quantized(msfp.save_quantized(calibrated(normed, sample_shape=(1, 8, 8)), tmp_path / "n"),
                            model=tiny_plain())


def test_a_quantized_layer_of_another_kernel_shape_is_refused(tmp_path):
    # Its weight is stored as codes, whose count a 3×3 kernel and a 1×9 one share: it loaded, reading the codes as 1×9.
    out = msfp.save_quantized(calibrated(tiny_plain, sample_shape=(1, 8, 8)), tmp_path / "q")
    other = tiny_plain()
    other.mid = torch.nn.Conv2d(8, 8, (1, 9), padding="same")
    with pytest.raises(ValueError, match=r"does not match .*PlainDenoiser: mid.weight: shape \(8, 8, 3, 3\) when "
                                         r"quantized, model has \(8, 8, 1, 9\)"):
        msfp.load_quantized(out, model=other)


def test_a_full_precision_conv_of_another_geometry_is_refused(tmp_path):
    # Only quantized convs' geometry was recorded: a full-precision one with another dilation loaded and computed
    # something else.
    config = msfp.QuantConfig.preset("w4a4-msfp")
    config.full_precision_layers = ["mid"]
    out = msfp.save_quantized(calibrated(tiny_plain, preset=config, sample_shape=(1, 8, 8)), tmp_path / "q")
    dilated = tiny_plain()
    dilated.mid.dilation, dilated.mid.padding = (2, 2), (2, 2)
    with pytest.raises(ValueError, match=r"does not match .*PlainDenoiser: mid: dilation \[1, 1\] there, \[2, 2\] "
                                         r"here, padding \[1, 1\] there, \[2, 2\] here"):
        msfp.load_quantized(out, model=dilated)
    # Checkpoints written before full-precision convs were recorded load as they did.
    _edit_meta(out, lambda meta: meta["geometry"].pop("mid"))
    msfp.load_quantized(out, model=dilated)


def test_the_metadata_file_has_each_list_of_numbers_on_one_line(saved):
    # json.dumps(indent=1) put every number of every weight shape, stride and router run on a line of its own.
    text = (saved[1] / checkpoint.CONFIG_NAME).read_text()
    conv = quant_layers(saved[0])["down_blocks.0.resnets.0.conv1"]
    assert f'"down_blocks.0.resnets.0.conv1": {list(conv.weight.shape)}' in text
    assert json.loads(text) == checkpoint.read_quant_meta(saved[1])


def test_a_compiled_model_is_saved_as_the_model_it_compiles(tmp_path, saved):
    # Saved as it was, every name had torch.compile's "_orig_mod." prefix and the base model was an OptimizedModule:
    # the checkpoint it replaced a good one with could not be loaded.
    q = saved[0]
    out = msfp.save_quantized(torch.compile(q), tmp_path / "q")
    assert checkpoint.read_quant_meta(out)["base_model"]["class_name"] == "UNet2DModel"
    assert torch.equal(unet_outputs(msfp.load_quantized(out)), unet_outputs(q))


def test_the_formats_the_quantizers_use_are_saved_even_if_changed_after_calibration(tmp_path, saved):
    q = copy.deepcopy(saved[0])
    layer = quant_layers(q)["down_blocks.0.resnets.0.conv1"]
    layer.weight_quantizer.initialize(layer.weight.detach(), candidates=["fp4_e3m0"])
    assert layer.info["weight_format"] != "fp4_e3m0"  # calibration's record is stale now
    loaded = msfp.load_quantized(msfp.save_quantized(q, tmp_path / "q"))
    assert quant_layers(loaded)["down_blocks.0.resnets.0.conv1"].weight_quantizer.fmt.name == "fp4_e3m0"
    assert torch.equal(unet_outputs(loaded), unet_outputs(q))


def test_a_quantized_layer_tied_to_an_embedding_reloads_untied(tmp_path):
    class TiedHead(PlainDenoiser):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(8, 8)
            self.head = torch.nn.Linear(8, 8, bias=False)
            self.head.weight = self.emb.weight  # the embedding reads it in full precision, the head quantized

        def forward(self, x, t):
            h = self.mid(self.act(self.inp(x) + self.emb((t // 125).clamp(max=7))[:, :, None, None]))
            return self.out(self.head(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    def build():
        torch.manual_seed(0)
        return TiedHead().eval()

    q = calibrated(build, preset=msfp.QuantConfig(full_precision_layers=["t_proj"]), sample_shape=(1, 8, 8))
    loaded = msfp.load_quantized(msfp.save_quantized(q, tmp_path / "q"), model=build())
    assert torch.equal(loaded.emb.weight, q.emb.weight)  # it used to get the head's quantized weight
    assert torch.equal(unet_outputs(loaded), unet_outputs(q))
    # Saved again, its base model counted the untied weight twice (more parameters, a smaller 4-bit share).
    assert checkpoint.quant_meta(loaded) == checkpoint.quant_meta(q)


def test_truncated_corrupted_or_tampered_weights_fail_clearly(tmp_path, saved):
    q, _ = saved
    out = msfp.save_quantized(q, tmp_path / "q")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: checksum mismatch .*truncated, corrupted"):
        msfp.load_quantized(out)

    flipped = bytearray(data)
    flipped[len(data) - 100] ^= 0x10  # one bit of one packed code
    (out / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        msfp.load_quantized(out)

    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        msfp.load_quantized(out)

    # Consistent checksums but wrong content: unreadable bytes, and a file lacking a layer's codes.
    out = msfp.save_quantized(q, tmp_path / "q")
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    _edit_meta(out, lambda meta: meta.update(weights_sha256=checkpoint._sha256(out / "model.safetensors")))
    with pytest.raises(ValueError, match="model.safetensors: cannot read the weights"):
        msfp.load_quantized(out)
    out = msfp.save_quantized(q, tmp_path / "q")
    state = load_file(out / "model.safetensors")
    del state["conv_in.weight_codes"]
    state["mid_block.resnets.0.conv1.weight_codes"] = state["mid_block.resnets.0.conv1.weight_codes"][:, :-1]
    save_file(state, out / "model.safetensors")
    _edit_meta(out, lambda meta: meta.update(weights_sha256=checkpoint._sha256(out / "model.safetensors")))
    with pytest.raises(ValueError, match=r"does not match UNet2DModel: conv_in.weight_codes: missing, model expects "
                                         r"\(weight sets, 72\); mid_block.resnets.0.conv1.weight_codes: shape \(1, 1151\), "
                                         r"model expects \(weight sets, 1152\)"):
        msfp.load_quantized(out)


def test_failed_save_leaves_the_earlier_result_intact(tmp_path, saved):
    q, _ = saved
    out = msfp.save_quantized(q, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save_file", broken)
        with pytest.raises(OSError, match="disk full"):
            msfp.save_quantized(q, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary directory left behind


def test_saving_over_a_checkpoint_keeps_the_users_other_files(tmp_path, saved):
    # msfp finetune DIR writes back into DIR: that used to delete everything else in it.
    q, _ = saved
    out = msfp.save_quantized(q, tmp_path / "q")
    (out / "samples.npz").write_bytes(b"samples")
    msfp.save_quantized(q, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "msfp_quant.json", "samples.npz"]
    assert (out / "samples.npz").read_bytes() == b"samples" and torch.equal(
        unet_outputs(msfp.load_quantized(out)), unet_outputs(q))


def test_a_model_on_the_fp8_backend_is_not_saved_over_its_checkpoint(saved):
    # Its FP8 layers hold E4M3 codes, not the quantized layers a checkpoint stores: saving used to write a checkpoint
    # without them, over the directory it came from.
    _, out = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fp8_model = msfp.load_quantized(out, backend="fp8")
    with pytest.raises(ValueError, match=r"save_quantized needs the fake-quant model, but \d+ layer\(s\) run on the "
                                         r"FP8 backend \(e.g. '.*'\): a packed checkpoint stores"):
        msfp.save_quantized(fp8_model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("tensor", ["weight", "weight_quantizer.scale"])
def test_a_diverged_layer_is_named_when_saving(tmp_path, saved, tensor):
    q = copy.deepcopy(saved[0])
    layer = quant_layers(q)["up_blocks.1.resnets.1.conv2"]
    with torch.no_grad():
        layer.get_parameter(tensor).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"^up_blocks.1.resnets.1.conv2: quantized weight set 0 has NaN values"):
        msfp.save_quantized(q, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_saving_needs_enabled_quantizers(tmp_path, saved):
    q = copy.deepcopy(saved[0])
    quant_layers(q)["conv_in"].act_quantizer.enabled = False
    with pytest.raises(ValueError, match="quantizer disabled \\(e.g. 'conv_in'\\)"):
        msfp.save_quantized(q, tmp_path / "q")


def test_frozen_weights_are_exact_and_never_stale(saved):
    q = copy.deepcopy(saved[0])
    reference = unet_outputs(q)
    msfp.checkpoint.freeze_weights(q)
    layer = quant_layers(q)["down_blocks.0.resnets.0.conv1"]
    assert layer.weights_frozen and torch.equal(unet_outputs(q), reference)

    def expected():
        msfp.checkpoint.unfreeze_weights(q)
        out = unet_outputs(q)
        msfp.checkpoint.freeze_weights(q)
        return out

    with torch.no_grad():
        layer.weight.mul_(1.5)  # an optimizer step
    assert torch.equal(unet_outputs(q), expected()) and not torch.equal(unet_outputs(q), reference)
    with torch.no_grad():
        layer.weight_quantizer.scale.mul_(0.5)
    assert torch.equal(unet_outputs(q), expected())
    layer.weight.data = layer.weight.data * 0.25  # new storage, same parameter
    assert torch.equal(unet_outputs(q), expected())
    layer.weight_quantizer.fmt = msfp.get_format("fp4_e3m0")
    assert torch.equal(unet_outputs(q), expected())
    layer.weight_quantizer.enabled = False
    assert torch.equal(unet_outputs(q), expected())
    # Writes through .data (diffusers' EMAModel.copy_to) do not bump the version counter: documented, and a second
    # freeze_weights() picks them up.
    layer.weight_quantizer.enabled = True
    layer.weight.data.mul_(2.0)
    msfp.checkpoint.freeze_weights(q)
    assert torch.equal(unet_outputs(q), expected())


def test_frozen_weights_of_inference_tensors_are_never_stale(saved):
    # A model copied inside inference_mode holds inference tensors: freeze_weights failed reading their version
    # counter, which they do not have, though inference mode writes them in place.
    with torch.inference_mode():
        q = copy.deepcopy(saved[0])
        msfp.checkpoint.freeze_weights(q)
        reference = unet_outputs(q)
        quant_layers(q)["down_blocks.0.resnets.0.conv1"].weight.mul_(1.5)
        changed = unet_outputs(q)
        msfp.checkpoint.unfreeze_weights(q)
        assert torch.equal(unet_outputs(q), changed) and not torch.equal(changed, reference)


@pytest.mark.parametrize("backend", ["fake", "fp8"])
def test_a_model_loaded_under_inference_mode_is_the_model_loaded_outside(saved, backend):
    # Loading inside inference_mode failed in freeze_weights: "Inference tensors do not track version counter".
    reference = unet_outputs(msfp.load_quantized(saved[1], backend=backend))
    with torch.inference_mode():
        loaded = msfp.load_quantized(saved[1], backend=backend)
        assert torch.equal(unet_outputs(loaded), reference)
    # Of normal tensors: its frozen weights stay cached, and it runs outside inference mode as well.
    assert not any(t.is_inference() for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(unet_outputs(loaded), reference)
    # A given model built inside inference mode is loaded in it: its inference tensors can be written nowhere else
    # (outside, load_state_dict failed with "Inplace update to inference tensor outside InferenceMode").
    with torch.inference_mode():
        built = tiny_unet()
        assert torch.equal(unet_outputs(msfp.load_quantized(saved[1], model=built, backend=backend)), reference)


def test_a_first_frozen_call_under_autocast_leaves_a_full_precision_weight(saved):
    from msfp.talora import add_talora

    q = copy.deepcopy(saved[0])
    add_talora(q, num_loras=1, rank=2)
    layer = quant_layers(q)["down_blocks.0.resnets.0.conv1"]
    layer.weight_quantizer.enabled = False  # so that the cached weight shows every rounding, not only 4-bit steps
    with torch.no_grad():
        layer.lora.B.normal_(std=0.05)  # a LoRA, whose B·A product autocast would round to bfloat16
        full = layer.weight_quantizer(layer.effective_weight())
        msfp.checkpoint.freeze_weights(q)
        layer._weight_cache.clear()  # as if frozen inside the autocast region
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]))
    assert torch.equal(layer.quantized_weight(), full)


def test_frozen_weights_let_gradients_through(saved):
    q = copy.deepcopy(saved[0]).train()
    layer = quant_layers(q)["down_blocks.0.resnets.0.conv1"]

    def grads():
        q.zero_grad()
        torch.manual_seed(1)
        q(torch.randn(2, 1, 8, 8), torch.tensor([3, 700])).sample.square().mean().backward()
        return layer.weight.grad.clone(), layer.weight_quantizer.scale.grad.clone()

    plain = grads()
    msfp.checkpoint.freeze_weights(q)
    frozen = grads()
    assert plain[0].abs().sum() > 0 and all(torch.equal(a, b) for a, b in zip(plain, frozen))


def test_loaded_cache_is_the_weight_itself(saved):
    loaded = msfp.load_quantized(saved[1])
    with torch.no_grad():
        unet_outputs(loaded)
        for layer in quant_layers(loaded).values():
            assert layer.quantized_weight().data_ptr() == layer.weight.data_ptr()


def test_quantized_unet_drops_into_ddim_pipeline(saved):
    q, out = saved
    loaded = msfp.load_quantized(out)
    seen = []
    quant_layers(loaded)["mid_block.resnets.0.conv1"].observer = lambda layer, x: seen.append(
        layer.context.timesteps.tolist())

    def run(model):
        pipe = DDIMPipeline(unet=model, scheduler=scheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                    output_type="np").images

    images = run(loaded)
    assert images.shape == (2, 8, 8, 1) and (images == run(q)).all()
    sched = scheduler()
    sched.set_timesteps(3)
    assert seen == [[t, t] for t in sched.timesteps.tolist()]  # the timestep reached the layers, every step


def test_quantized_dit_drops_into_dit_pipeline(tmp_path):
    q = calibrated(tiny_dit)
    loaded = msfp.load_quantized(msfp.save_quantized(q, tmp_path / "q"))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        norm_num_groups=4, sample_size=8).eval()
    seen = []
    quant_layers(loaded)["transformer_blocks.0.ff.net.2"].observer = lambda layer, x: seen.append(
        layer.context.timesteps.tolist())

    def run(model):
        pipe = DiTPipeline(transformer=model, vae=vae, scheduler=scheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe(class_labels=[0, 3], guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                    num_inference_steps=2, output_type="np").images

    images = run(loaded)
    assert images.shape == (2, 8, 8, 3) and (images == run(q)).all()
    assert len(seen) == 2 and all(len(set(t)) == 1 and len(t) == 2 for t in seen) and seen[0] != seen[1]


def test_cli_quantize_and_info(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "model")
    runner = CliRunner()
    result = runner.invoke(main, ["quantize", "--model", str(tmp_path / "model"), "--preset", "w4a4-msfp",
                                  "--out", str(tmp_path / "q"), "--calib-samples", "4", "--calib-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "down_blocks.0.resnets.0.conv1" in result.output and "yes (structural)" in result.output
    # Calibrated away from msfp sample's seeds (0.. by default), as msfp compare does.
    assert "calibration: 8 points from the trajectories of seeds 10000..10003;" in result.output
    info = runner.invoke(main, ["info", str(tmp_path / "q")])
    assert info.exit_code == 0, info.output
    assert "weights at 4 bits:" in info.output and "FLOPs at 4 bits:" in info.output
    assert "ufp4_" in info.output
    bad = runner.invoke(main, ["info", str(tmp_path / "model")])
    assert bad.exit_code == 1 and "Error: " in bad.output and "not a msfp output directory" in bad.output
    bad = runner.invoke(main, ["quantize", "--preset", "w2a2", "--out", str(tmp_path / "z")])
    assert bad.exit_code == 1 and "unknown preset 'w2a2'" in bad.output


def test_single_lora_model_is_saved_with_its_lora_merged(tmp_path, saved):
    q = copy.deepcopy(saved[0])
    msfp.talora.add_talora(q, num_loras=1, rank=2)
    with torch.no_grad():
        for layer in quant_layers(q).values():
            layer.lora.B.normal_(std=0.05)  # as if fine-tuned: the LoRA changes the quantized weights
    assert not torch.equal(unet_outputs(q), unet_outputs(saved[0]))
    out = msfp.save_quantized(q, tmp_path / "q")
    assert not any(".lora." in k for k in load_file(out / "model.safetensors"))  # merged, never stored
    assert torch.equal(unet_outputs(msfp.load_quantized(out)), unet_outputs(q))


@pytest.mark.parametrize("lora", ["talora", "single"])
def test_finetuned_talora_round_trip_is_exact(tmp_path, lora):
    from msfp.finetune import FinetuneConfig, finetune

    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=4, disable=True)
    finetune(q, fp, scheduler(), FinetuneConfig(iters=6, batch_size=4, traj_samples=4, traj_steps=4, rank=2,
                                                lora=lora, lora_lr=1e-2), disable=True)
    out = msfp.save_quantized(q, tmp_path / "q")
    loaded = msfp.load_quantized(out)
    assert torch.equal(outputs(loaded, (1, 8, 8)), outputs(q, (1, 8, 8)))  # timesteps 5, 400, 999: mixed routing
    meta = checkpoint.read_quant_meta(out)
    k = 4 if lora == "talora" else 1
    assert meta["talora"]["num_loras"] == k and meta["finetune"]["iters_done"] == 6
    runs = meta["talora"]["assignment"]  # [first_t, last_t, k]: every training timestep, in order
    assert [k for first, last, k in runs for _ in range(first, last + 1)] == msfp.talora.lora_assignment(q, torch.arange(1000))
    assert all(a[2] != b[2] for a, b in zip(runs, runs[1:]))
    if lora == "talora":
        assert {run[2] for run in meta["talora"]["assignment"]} == {0, 1, 2, 3}
        layer = msfp.surgery.quant_layers(loaded)["down_blocks.0.resnets.0.conv1"]
        assert layer.weight_sets.shape[0] == 4 and not hasattr(layer.lora, "A")
    # A loaded checkpoint saves back to the same file: every weight set, not only the first.
    again = msfp.save_quantized(loaded, tmp_path / "again")
    first, second = (load_file(d / "model.safetensors") for d in (out, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(outputs(msfp.load_quantized(again), (1, 8, 8)), outputs(q, (1, 8, 8)))
    # And the same metadata (the fine-tuning record used to be dropped); the layer policy's selectors come back
    # as the layer names they resolved to.
    resaved = checkpoint.read_quant_meta(again)
    differs = ("quantization_config", "meta_sha256")  # the metadata's checksum covers the quantization config
    assert {k: v for k, v in resaved.items() if k not in differs} == {k: v for k, v in meta.items() if k not in differs}
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "LoRA" in info.output, info.output


def test_a_loaded_router_knows_the_schedules_length(tmp_path):
    from diffusers import DDIMScheduler

    from msfp.finetune import FinetuneConfig, finetune

    short = DDIMScheduler(num_train_timesteps=500, beta_schedule="linear", clip_sample=True)
    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, short, num_samples=2, num_steps=2, disable=True)
    finetune(q, fp, short, FinetuneConfig(iters=2, batch_size=2, traj_samples=2, traj_steps=2, rank=2, num_loras=2),
             disable=True)
    loaded = msfp.load_quantized(msfp.save_quantized(q, tmp_path / "q"))
    # It used to be built before the length was set, so it split [0, 1000) into its initial LoRA intervals.
    assert loaded.msfp_router.num_train_timesteps == q.msfp_router.num_train_timesteps == 500


def test_cli_samples_from_a_quantized_directory(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "model")
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "q"),
                             "--calib-samples", "4", "--calib-steps", "2"])
    assert r.exit_code == 0, r.output
    assert checkpoint.read_quant_meta(tmp_path / "q")["scheduler_config"]["num_train_timesteps"] == 1000
    r = runner.invoke(main, ["sample", "--model", str(tmp_path / "q"), "-n", "3", "--steps", "2",
                             "--out", str(tmp_path / "s.npz")])
    assert r.exit_code == 0, r.output
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    r = runner.invoke(main, ["sample", "--model", str(tmp_path / "q"), "-n", "3", "--steps", "2", "--backend", "fp8",
                             "--out", str(tmp_path / "fp8.npz")])
    assert r.exit_code == 0, r.output
    assert re.search(r"backend fp8: \d+ of \d+ quantized layers on E4M3 codes, emulated \(cpu device", r.output)
    # FP8 codes differ from fake-quant only by fp32 summation order: 8-bit images agree to about a level
    fp8_images = np.load(tmp_path / "fp8.npz")["arr_0"].astype(int)
    assert np.abs(fp8_images - images).mean() < 1.0
    backends = [load_samples(tmp_path / f)["meta"]["backend"] for f in ("s.npz", "fp8.npz")]
    assert backends == ["fake", "fp8"]  # recorded: the images depend on it
    r = runner.invoke(main, ["sample", "--model", str(tmp_path / "model"), "-n", "1", "--backend", "fp8",
                             "--out", str(tmp_path / "x.npz")])
    assert r.exit_code != 0 and "needs a quantized directory" in r.output


def test_cli_eval_reports_the_noise_prediction_error_of_a_quantized_model(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "model")
    runner = CliRunner()
    for spec, out in ((tmp_path / "model", "fp.npz"), (tmp_path / "q", "q.npz")):
        if spec == tmp_path / "q":
            r = runner.invoke(main, ["quantize", "--model", str(tmp_path / "model"), "--out", str(spec),
                                     "--calib-samples", "4", "--calib-steps", "2"])
            assert r.exit_code == 0, r.output
        r = runner.invoke(main, ["sample", "--model", str(spec), "-n", "3", "--steps", "2",
                                 "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "q.npz"), "--paired", str(tmp_path / "fp.npz"), "--model",
                             str(tmp_path / "q"), "--fp-model", str(tmp_path / "model"), "--heldout-samples", "2",
                             "--heldout-steps", "3", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["metrics"]["eps_mse"] > 0 and len(result["eps_mse_per_timestep"]) == 3
    assert 0 < result["metrics"]["eps_mse_weighted"]
    assert "noise-prediction MSE" in r.output

    # Its error against another full-precision model than the one it was quantized from would mean nothing.
    r = runner.invoke(main, ["eval", str(tmp_path / "q.npz"), "--model", str(tmp_path / "q")])
    assert r.exit_code == 1 and f"{tmp_path / 'q'} was quantized from another UNet2DModel than --fp-model " \
        "'default': " in r.output, r.output
    r = runner.invoke(main, ["finetune", str(tmp_path / "q"), "--iters", "1"])
    assert r.exit_code == 1 and "than --model 'default': " in r.output, r.output


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_with_zero_points_saves_and_reloads(tmp_path, dtype):
    # Its quantizers compute in float32: the checkpoint's check of the packed codes used to decode in half precision,
    # round differently, and refuse to save ("a bug in msfp").
    q = calibrated(preset=msfp.QuantConfig(weight_formats=["ufp4_e2m2"])).to(dtype)
    msfp.save_quantized(q, tmp_path / "q")
    loaded = msfp.load_quantized(tmp_path / "q")  # in the dtypes it was saved in: it used to come back float32
    stored = load_file(tmp_path / "q" / "model.safetensors").keys()  # unused zero points are not
    dtypes = [{k: v.dtype for k, v in m.state_dict().items() if k in stored or k.endswith(".weight")}
              for m in (loaded, q)]
    assert dtypes[0] == dtypes[1] and dtypes[0]["conv_in.weight"] == dtype
    for name, layer in quant_layers(loaded).items():
        assert torch.equal(layer.weight, quant_layers(q)[name].quantized_weight()), name
    torch.manual_seed(1)
    x = torch.randn(3, 1, 8, 8, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([5, 400, 999])).sample, q(x, torch.tensor([5, 400, 999])).sample)
    # Checkpoints written before the weights' dtype was recorded load in float32, as they always did (restoring the
    # stored tensors' half dtypes alone left a mixed model that failed on its first call).
    _edit_meta(tmp_path / "q", lambda meta: meta.pop("weight_dtypes"))
    older = msfp.load_quantized(tmp_path / "q")
    assert {v.dtype for v in older.state_dict().values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()} == {torch.float32}
    with torch.no_grad():
        older(x.float(), torch.tensor([5, 400, 999]))
