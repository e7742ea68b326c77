import copy
import re
import warnings

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

import msfp
from msfp import QuantConfig
from msfp.calibration import collect_trajectories
from msfp.conditioning import select
from msfp.fp8 import convert_to_fp8
from msfp.models import SCHEDULE_KEYS
from msfp.surgery import quant_layers
from tiny_models import (pixart_1024_cond, scheduler, sdxl_cond, tiny_class_unet, tiny_cond_unet, tiny_dit, tiny_pixart,
                         tiny_pixart_1024, tiny_plain, tiny_sdxl_unet, tiny_unet)

FAMILIES = {
    "unet": (tiny_unet, {}),
    "class-unet": (tiny_class_unet, {}),
    "cond-unet": (tiny_cond_unet, {"cond": {"encoder_hidden_states": torch.randn(4, 3, 8)}}),
    "dit": (tiny_dit, {}),
    "pixart": (tiny_pixart, {"cond": {"encoder_hidden_states": torch.randn(4, 3, 8)}}),
    # Nested conditioning: added_cond_kwargs={...}, as their pipelines pass it.
    "sdxl-unet": (tiny_sdxl_unet, {"cond": sdxl_cond(4)}),
    "pixart-1024": (tiny_pixart_1024, {"cond": pixart_1024_cond(4)}),
    "plain": (tiny_plain, {"sample_shape": (1, 8, 8)}),
}


def calibrated(build, preset="w4a4-msfp", **kwargs):
    fp = build()
    q = msfp.quantize(copy.deepcopy(fp), preset)
    report = msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=3, disable=True, **kwargs)
    return fp, q, report


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_calibrates_and_runs(family):
    build, kwargs = FAMILIES[family]
    fp, q, report = calibrated(build, **kwargs)
    assert report.num_points == 4 * 3
    for name, layer in quant_layers(q).items():
        assert layer.info["weight_format"] and torch.isfinite(layer.act_quantizer.scale).all(), name
        assert (layer.act_quantizer.scale > 0).all() and (layer.weight_quantizer.scale > 0).all(), name
    shape = kwargs.get("sample_shape") or (fp.config.in_channels, fp.config.sample_size, fp.config.sample_size)
    x, t = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    cond = select(kwargs.get("cond", {}), slice(0, 2))
    if family in ("class-unet", "dit"):
        cond["class_labels"] = torch.tensor([0, 2])
    with torch.no_grad():
        out_q, out_fp = (msfp.models.denoise(m, x, t, **cond) for m in (q, fp))
    assert torch.isfinite(out_q).all() and not torch.equal(out_q, out_fp)
    # Quantization noise, not a broken model: the error is a small part of the output's power. Measured: 0.001-0.12
    # of it across the families; with the search keeping the worst clip of each row instead, 0.33-1.03.
    relative_error = ((out_q - out_fp).pow(2).mean() / out_fp.pow(2).mean()).item()
    assert relative_error < 0.25, relative_error


def test_the_recorded_schedule_lists_diffusers_defaulted_keys_in_sorted_order():
    # Saved with the model in string-hash order, it made msfp_quant.json differ between processes.
    scheduler_ = DDIMScheduler.from_config(dict(num_train_timesteps=1000))
    listed = list(scheduler_.config["_use_default_values"])
    assert listed != sorted(listed)  # (or the test would pass whatever the order)
    fp = tiny_plain()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler_, num_samples=2, num_steps=2, sample_shape=(1, 8, 8), disable=True)
    # Less the schedule's own keys, whose recorded values DDIM's defaults would replace when sampling from it.
    assert q.msfp_scheduler_config["_use_default_values"] == sorted(set(listed) - set(SCHEDULE_KEYS))
    assert "beta_end" in listed and q.msfp_scheduler_config["beta_end"] == 0.02


def test_search_picks_unsigned_on_silu_data_and_signed_on_symmetric_data():
    _, q, _ = calibrated(tiny_plain, QuantConfig(eight_bit_layers=[]), sample_shape=(1, 8, 8))
    layers = quant_layers(q)
    assert layers["mid"].info["aal"] and layers["mid"].info["aal_reason"].startswith("traced")
    assert layers["mid"].info["act_format"].startswith("ufp4")  # reads nn.SiLU output
    assert layers["out"].info["aal"] and layers["out"].info["aal_reason"].startswith("statistical")  # F.silu
    assert layers["out"].info["act_format"].startswith("ufp4")
    assert not layers["inp"].info["aal"] and layers["inp"].info["act_format"].startswith("fp4")  # Gaussian x_t
    # Either detector can be turned off (no test did, and ignoring the flags passed).
    _, q, _ = calibrated(tiny_plain, QuantConfig(eight_bit_layers=[], aal_structural=False), sample_shape=(1, 8, 8))
    assert quant_layers(q)["mid"].info["aal_reason"].startswith("statistical")  # SiLU's output is one-sided anyway
    _, q, _ = calibrated(tiny_plain, QuantConfig(eight_bit_layers=[], aal_statistical=False), sample_shape=(1, 8, 8))
    layers = quant_layers(q)
    assert layers["mid"].info["aal_reason"].startswith("traced")
    assert not layers["out"].info["aal"] and layers["out"].info["act_format"].startswith("fp4")


def test_without_mixup_sign_every_format_is_signed():
    _, q, _ = calibrated(tiny_unet, "w4a4-fp")
    assert all(layer.info["act_format"].startswith("fp") for layer in quant_layers(q).values()
               if layer.precision == "4bit")
    _, q, _ = calibrated(tiny_unet, "w4a4-int")
    formats = {layer.precision: set() for layer in quant_layers(q).values()}
    for layer in quant_layers(q).values():
        formats[layer.precision].add(layer.info["act_format"])
    assert formats["4bit"] == {"uint4"} and formats["8bit"] <= {"fp8_e4m3", "uint8"}


def test_nan_activations_name_layer_and_timestep():
    fp = tiny_plain()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    with torch.no_grad():
        q.mid.bias[0] = float("nan")  # the quantized copy breaks after calibration trajectories
    with pytest.raises(FloatingPointError, match=r"layer 'out' received NaN/inf inputs at timestep\(s\) \[\d+"):
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(1, 8, 8))


def test_non_finite_weights_name_the_layer_before_any_work():
    # The last layer's weight failed its search, after the trajectories, as "search_quant_params got 1 non-finite
    # values".
    fp = tiny_plain()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    with torch.no_grad():
        q.out.weight[0, 0, 0, 0] = float("inf")
    calls = []
    fp.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"^out: its weight holds 1 non-finite values \(NaN or inf\)"):
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(1, 8, 8))
    assert not calls


def test_a_cache_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    # It failed after the trajectories, with a bare FileExistsError naming a file inside it.
    fp = tiny_plain()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    (tmp_path / "cache").write_text("")
    calls = []
    fp.register_forward_hook(lambda *_: calls.append(1))
    for cache_dir in (tmp_path / "cache", tmp_path / "cache" / "sub"):
        message = f"^cache_dir '{re.escape(str(cache_dir))}': .*; pass a folder msfp can write to$"
        with pytest.raises(OSError, match=message):
            msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(1, 8, 8),
                           cache_dir=cache_dir)
    assert not calls and getattr(q, "msfp_base_weights", None) is None


def test_out_of_range_class_labels_are_refused_before_any_work():
    fp = tiny_class_unet()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    with pytest.raises(ValueError, match=r"class label 3 is out of range: UNet2DModel has 3 classes, labels 0\.\.2$"):
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, class_labels=[1, 3], disable=True)
    with pytest.raises(ValueError, match=r"class_labels must be integers, got torch.float32"):  # were truncated
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, class_labels=[0.7, 1.9], disable=True)
    assert getattr(q, "msfp_base_weights", None) is None


def test_empty_calibration_set_and_missing_conditioning():
    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    with pytest.raises(ValueError, match="empty calibration set"):
        msfp.calibrate(q, fp, scheduler(), num_samples=0, disable=True)
    cond_fp = tiny_cond_unet()
    with pytest.raises(ValueError, match=r"needs conditioning \['encoder_hidden_states'\]: pass cond=\{name: tensor "
                                         r"with one row per sample\}$"):
        collect_trajectories(cond_fp, scheduler(), num_samples=2, num_steps=2, disable=True)
    # PixArt declares its text optional (default None) but cannot run without it.
    with pytest.raises(ValueError, match=r"PixArtTransformer2DModel needs conditioning \['encoder_hidden_states'\]"):
        collect_trajectories(tiny_pixart(), scheduler(), num_samples=2, num_steps=2, disable=True)
    with pytest.raises(ValueError, match="needs a model returned by msfp.quantize"):
        msfp.calibrate(fp, fp, scheduler())
    # quantize() works in place: calibrating q from itself was accepted, and recorded q's weights as the base, so
    # finetune and eval --model later refused the real full-precision model as "other weights".
    q = msfp.quantize(fp, "w4a4-msfp")
    with pytest.raises(ValueError, match=r"fp_model is quantized \(it is qmodel itself\): quantize a copy"):
        msfp.calibrate(q, q, scheduler())
    with pytest.raises(ValueError, match=r"fp_model is quantized: quantize a copy"):
        msfp.calibrate(q, msfp.quantize(tiny_unet(), "w4a4-msfp"), scheduler())


def test_a_half_precision_teacher_with_conditioning_calibrates_a_float32_model():
    # sample() gives the teacher its conditioning in bfloat16 and the points keep it: the float32 quantized model was
    # fed it ("expected m1 and m2 to have the same dtype").
    from types import SimpleNamespace

    from msfp.compare import _flops_by_layer
    from msfp.evaluation import per_timestep_eps_mse

    fp = tiny_cond_unet().to(torch.bfloat16)
    q = msfp.quantize(copy.deepcopy(fp).float(), "w4a4-msfp")
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8)}
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, cond=cond, disable=True)
    assert all(layer.info["weight_format"] for layer in quant_layers(q).values()) and q.msfp_flops["total"] > 0
    points = collect_trajectories(fp, scheduler(), num_samples=2, num_steps=2, cond=cond, disable=True)
    assert points.cond["encoder_hidden_states"].dtype == torch.bfloat16  # the trajectories stay as the teacher ran
    assert len(per_timestep_eps_mse(q, points)) == 2
    assert _flops_by_layer(copy.deepcopy(fp).float(), SimpleNamespace(heldout=points))[1] > 0
    # A bfloat16 model measured on the (float32) points: "Input type (float) and bias type (BFloat16)".
    assert len(per_timestep_eps_mse(fp, points)) == 2
    assert _flops_by_layer(fp, SimpleNamespace(heldout=points))[1] > 0


def test_a_refused_calibration_keeps_what_the_model_records_of_the_last_one():
    # The refused call had already recorded the other model as the teacher: fine-tuning then refused the real one
    # and distilled from the other, copying its weights into the student.
    fp, q, _ = calibrated(tiny_unet)
    recorded = (q.msfp_base_weights, q.msfp_scheduler_config, q.msfp_context.num_train_timesteps)
    other, other_scheduler = tiny_unet(), scheduler()
    other.conv_in.weight.data += 1
    other_scheduler.register_to_config(num_train_timesteps=500)
    with pytest.raises(ValueError, match="empty calibration set"):
        msfp.calibrate(q, other, other_scheduler, num_samples=0, disable=True)
    assert (q.msfp_base_weights, q.msfp_scheduler_config, q.msfp_context.num_train_timesteps) == recorded


def test_a_model_on_the_fp8_backend_is_not_recalibrated():
    # Its FP8 layers hold codes and fixed scales: only the few layers left fake-quant would be calibrated.
    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True)
    convert_to_fp8(q, use_kernels=False)
    with pytest.raises(ValueError, match=r"calibrate\(\) needs the fake-quant model, but \d+ layer\(s\) run on the FP8 "
                                         r"backend .*: calibrate before msfp.fp8.convert_to_fp8"):
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True)


def test_zero_range_channels_and_constant_activations_give_finite_scales():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.head = nn.Linear(3, 4)
            with torch.no_grad():
                self.lin.weight[1] = 0.0  # a zero-range output channel

        def forward(self, x, t):
            return self.head(self.lin(torch.ones_like(x)))  # constant activations

    fp = Constant().eval()
    q = msfp.quantize(copy.deepcopy(fp), QuantConfig(eight_bit_layers=[]))
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(4,))
    for layer in quant_layers(q).values():
        for p in (layer.weight_quantizer.scale, layer.act_quantizer.scale, layer.act_quantizer.zero_point):
            assert torch.isfinite(p).all()
    with torch.no_grad():
        assert torch.isfinite(q(torch.randn(2, 4), torch.tensor([1, 2]))).all()


def test_cache_reuses_trajectories_and_layer_inputs(tmp_path, monkeypatch):
    fp = tiny_unet()
    q1 = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    r1 = msfp.calibrate(q1, fp, scheduler(), num_samples=4, num_steps=3, disable=True, cache_dir=tmp_path)
    q2 = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    r2 = msfp.calibrate(q2, fp, scheduler(), num_samples=4, num_steps=3, disable=True, cache_dir=tmp_path)
    assert not r1.cached and r2.cached and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(q1.state_dict().values(), q2.state_dict().values())
               if isinstance(a, torch.Tensor))
    # Another msfp computes its caches its own way: they were reused across versions.
    monkeypatch.setattr(msfp.identity, "code_digest", lambda: "another msfp")
    r3 = msfp.calibrate(msfp.quantize(copy.deepcopy(fp), "w4a4-msfp"), fp, scheduler(), num_samples=4, num_steps=3,
                        disable=True, cache_dir=tmp_path)
    assert not r3.cached and len(list(tmp_path.glob("*.safetensors"))) == 4
    # Another thread count sums in another order (the default model's trajectories differed by 7e-5), and so would
    # another CPU or GPU: a cache written there was reused, and a report's numbers depended on what ran before it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        r4 = msfp.calibrate(msfp.quantize(copy.deepcopy(fp), "w4a4-msfp"), fp, scheduler(), num_samples=4,
                            num_steps=3, disable=True, cache_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert not r4.cached and len(list(tmp_path.glob("*.safetensors"))) == 6


def test_the_cache_is_not_reused_for_a_model_that_differs_only_in_its_config(tmp_path):
    fp = tiny_unet()
    config = {k: v for k, v in fp.config.items() if not k.startswith("_")}
    other = type(fp).from_config({**config, "flip_sin_to_cos": not fp.config.flip_sin_to_cos}).eval()
    assert other.config.flip_sin_to_cos != fp.config.flip_sin_to_cos
    other.load_state_dict(fp.state_dict())  # same weights: the key used to see only these
    reports = [msfp.calibrate(msfp.quantize(copy.deepcopy(m), "w4a4-msfp"), m, scheduler(), num_samples=4,
                              num_steps=3, disable=True, cache_dir=tmp_path) for m in (fp, other)]
    assert [r.cached for r in reports] == [False, False] and len(list(tmp_path.glob("*.safetensors"))) == 4


def test_the_cache_is_not_reused_under_another_float32_matmul_precision(tmp_path):
    # A global setting that changes float results (TF32 on a GPU): a hit would be another computation's result.
    fp = tiny_plain()
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    reports = []
    try:
        for precision in ("ieee", "bf16", "bf16"):
            matmul.fp32_precision = precision  # torch's per-backend API: the legacy getter then raises
            reports.append(msfp.calibrate(msfp.quantize(copy.deepcopy(fp), "w4a4-msfp"), fp, scheduler(),
                                          num_samples=2, num_steps=2, disable=True, cache_dir=tmp_path,
                                          sample_shape=(1, 8, 8)))
    finally:
        matmul.fp32_precision = before
    assert [r.cached for r in reports] == [False, False, True]


def test_the_cache_is_not_reused_on_a_cpu_with_another_instruction_set(tmp_path, monkeypatch):
    # The same CPU model name can hide another ISA (a VM's flags), and AVX2 and AVX512 kernels round differently.
    fp = tiny_plain()
    reports = []
    for isa in ("AVX2", "AVX512", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        reports.append(msfp.calibrate(msfp.quantize(copy.deepcopy(fp), "w4a4-msfp"), fp, scheduler(), num_samples=2,
                                      num_steps=2, disable=True, cache_dir=tmp_path, sample_shape=(1, 8, 8)))
    assert [r.cached for r in reports] == [False, False, True]


def test_the_cache_is_not_reused_for_a_plain_model_with_another_activation(tmp_path):
    # Same class, same weights: the key held nothing else, so the Tanh model calibrated from the SiLU model's data.
    silu = tiny_plain()
    tanh = tiny_plain()
    tanh.act = nn.Tanh()
    infos = []
    for fp, cache_dir in ((silu, tmp_path), (tanh, tmp_path), (tanh, None)):
        q = msfp.quantize(copy.deepcopy(fp), msfp.QuantConfig(eight_bit_layers=[]))
        report = msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, sample_shape=(1, 8, 8), disable=True,
                                cache_dir=cache_dir)
        infos.append((report.cached, quant_layers(q)["mid"].info["act_min"]))
    assert [cached for cached, _ in infos] == [False, False, False]
    assert infos[1][1] == infos[2][1] != infos[0][1]


def test_a_corrupt_cache_is_recomputed_and_not_reported_as_cached(tmp_path, capsys):
    fp = tiny_unet()
    msfp.calibrate(msfp.quantize(copy.deepcopy(fp), "w4a4-msfp"), fp, scheduler(), num_samples=4, num_steps=3,
                   disable=True, cache_dir=tmp_path)
    for path in tmp_path.glob("*.safetensors"):
        path.write_bytes(b"not safetensors")
    report = msfp.calibrate(msfp.quantize(copy.deepcopy(fp), "w4a4-msfp"), fp, scheduler(), num_samples=4,
                            num_steps=3, disable=True, cache_dir=tmp_path)
    assert not report.cached and capsys.readouterr().out.count("ignoring unreadable calibration cache") == 2


def test_a_model_with_scalar_buffers_calibrates_with_a_cache(tmp_path):
    class WithBatchNorm(nn.Module):  # BatchNorm's num_batches_tracked is 0-dim: hashing it for the key used to fail
        def __init__(self):
            super().__init__()
            self.inp, self.norm, self.out = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1)

        def forward(self, x, t):
            return self.out(torch.nn.functional.silu(self.norm(self.inp(x))))

    fp = WithBatchNorm().eval()
    report = msfp.calibrate(msfp.quantize(copy.deepcopy(fp), "w4a4-msfp"), fp, scheduler(), num_samples=2,
                            num_steps=2, sample_shape=(1, 4, 4), disable=True, cache_dir=tmp_path)
    assert report.num_points == 4 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_calibration_leaves_disabled_quantizers_disabled():
    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    for layer in quant_layers(q).values():
        layer.act_quantizer.enabled = False  # weight-only quantization (W4A16)
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True)
    assert not any(layer.act_quantizer.enabled for layer in quant_layers(q).values())
    assert all(layer.weight_quantizer.enabled for layer in quant_layers(q).values())


def test_the_weight_search_takes_the_configured_zero_points():
    # Only the activation search read search_zero_points: unsigned weight formats always searched 16.
    from msfp.quantizers import WeightQuantizer

    fp = tiny_unet()
    zero_points = []
    for n in (1, 64):
        q = msfp.quantize(copy.deepcopy(fp), QuantConfig(weight_formats=["ufp4_e2m2"], search_zero_points=n))
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True)
        layer = quant_layers(q)["down_blocks.0.resnets.0.conv1"]
        alone = WeightQuantizer(layer.weight_quantizer.fmt, layer.weight.shape[0])
        alone.initialize(layer.weight.detach(), ["ufp4_e2m2"], num_clip=q.msfp_config.search_clip_points, num_zero=n)
        assert torch.equal(layer.weight_quantizer.zero_point, alone.zero_point)
        zero_points.append(layer.weight_quantizer.zero_point)
    assert not torch.equal(*zero_points)


def test_per_timestep_activation_groups():
    from msfp.calibration import recorded_inputs, record_layer_inputs
    from msfp.quantizers import ActivationQuantizer

    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), QuantConfig(act_timestep_groups=2))
    points = collect_trajectories(fp, scheduler(), num_samples=4, num_steps=4, disable=True)
    assert sorted(set(points.t.tolist())) == [0, 250, 500, 750]  # groups 0, 0, 1, 1 of t in [0, 500), [500, 1000)
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=4, disable=True)
    layer = quant_layers(q)["down_blocks.0.resnets.0.conv1"]
    # Each group's scale is the search's answer on that group's inputs alone.
    rec = record_layer_inputs(msfp.quantize(copy.deepcopy(fp), QuantConfig(act_timestep_groups=2)), points,
                              q.msfp_config.act_samples_per_layer, disable=True)["down_blocks.0.resnets.0.conv1"]
    for group, early in enumerate((rec["timesteps"] < 500, rec["timesteps"] >= 500)):
        alone = ActivationQuantizer(layer.act_quantizer.fmt)
        alone.initialize(rec["values"][early], [layer.act_quantizer.fmt.name],
                         num_clip=q.msfp_config.search_clip_points, num_zero=q.msfp_config.search_zero_points)
        assert layer.act_quantizer.scale[group] == alone.scale.reshape(())
    assert layer.act_quantizer.scale[0] != layer.act_quantizer.scale[1]
    assert list(recorded_inputs(q))[0] == "conv_in"
    # Three steps leave the group of t in [666.7, 1000) empty (t = 666, 333, 0): said, not silent.
    q3 = msfp.quantize(copy.deepcopy(fp), QuantConfig(act_timestep_groups=3))
    with pytest.warns(UserWarning, match="no calibration step falls in group\\(s\\) 2 \\(t 666.667–1000\\); they keep"):
        msfp.calibrate(q3, fp, scheduler(), num_samples=4, num_steps=3, disable=True)


def test_more_timestep_groups_than_training_timesteps_are_refused_before_sampling(monkeypatch):
    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), QuantConfig(act_timestep_groups=11))
    monkeypatch.setattr("msfp.calibration.collect_trajectories", lambda *a, **k: pytest.fail("sampled"))
    # Groups past one per timestep never hold a step; 10**7 of them only cost memory and search time.
    with pytest.raises(ValueError, match="act_timestep_groups is 11, more than the scheduler's 10 training "
                                         "timesteps .*use at most 10"):
        msfp.calibrate(q, fp, DDIMScheduler.from_config(scheduler().config, num_train_timesteps=10), num_samples=1,
                       num_steps=2, disable=True)


def test_models_in_training_mode_calibrate_without_dropout_and_keep_their_mode():
    class Dropping(type(tiny_plain())):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x, t):
            return super().forward(self.drop(x), t)

    def build():
        torch.manual_seed(0)
        return Dropping()  # in training mode, as after training

    scales = []
    for train in (True, True, False):
        fp = build().train(train)
        q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(1, 8, 8))
        assert fp.training == train and q.training == train and q.drop.training == train
        scales.append(torch.cat([layer.act_quantizer.scale.flatten() for layer in quant_layers(q).values()]))
    assert torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])


def test_the_layer_input_cache_is_keyed_on_the_quantized_models_weights_and_the_batch_size(tmp_path):
    fp = tiny_unet()
    runs = []
    for batch, scale_conv1 in ((4, 1.0), (4, 3.0), (2, 1.0), (2, 1.0)):
        q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
        with torch.no_grad():  # e.g. another checkpoint's weights: its layer inputs differ from fp's
            q.down_blocks[0].resnets[0].conv1.weight.mul_(scale_conv1)
        report = msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=3, disable=True, cache_dir=tmp_path,
                                batch_size=batch)
        runs.append((report.cached, quant_layers(q)["down_blocks.0.resnets.0.conv2"].act_quantizer.scale.clone()))
    assert [cached for cached, _ in runs] == [False, False, False, True]
    assert not torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[2][1], runs[3][1])


def test_a_cache_filled_at_another_batch_size_gives_what_calibrating_afresh_gives(tmp_path):
    # The batch size orders the trajectory points (and batched kernels round differently): trajectories cached at
    # batch 4 used to be reused at batch 2, so a warm --out gave other formats than a fresh one.
    fp = tiny_unet()
    models = [msfp.quantize(copy.deepcopy(fp), "w4a4-msfp") for _ in range(3)]
    for q, batch, cache in zip(models, (4, 2, 2), (tmp_path, tmp_path, None)):
        msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=3, disable=True, cache_dir=cache,
                       batch_size=batch)
    _, warm, fresh = (q.state_dict() for q in models)
    assert all(torch.equal(warm[k], fresh[k]) for k in fresh if isinstance(fresh[k], torch.Tensor))


def test_nan_noise_from_the_full_precision_model_is_reported_where_it_happens():
    class BreaksLate(type(tiny_plain())):
        def forward(self, x, t):
            out = super().forward(x, t)
            return torch.where(t.view(-1, 1, 1, 1) < 400, torch.nan, out)

    torch.manual_seed(0)
    fp = BreaksLate().eval()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    with pytest.raises(FloatingPointError, match="the full-precision model predicted NaN/inf noise at timestep 333 "
                                                 "for 2 of 2 samples \\(the trajectory of seed 0 among them\\)"):
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=3, disable=True, sample_shape=(1, 8, 8))


def test_per_timestep_scales_refuse_a_layer_whose_rows_are_not_the_batch(tmp_path):
    class Folded(nn.Module):  # tokens folded into the batch dimension
        def __init__(self):
            super().__init__()
            self.inp, self.tok, self.out = nn.Linear(4, 8), nn.Linear(2, 2), nn.Linear(8, 4)

        def forward(self, x, t):
            h = self.inp(x) + t.float().view(-1, 1) / 1000
            return self.out(self.tok(h.reshape(-1, 2)).reshape(x.shape[0], 8))

    def state(q):
        tensors = {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
        return tensors, copy.deepcopy({n: m.info for n, m in quant_layers(q).items()}), \
            q.msfp_context.num_train_timesteps, getattr(q, "msfp_base_weights", None)

    def assert_refused_untouched(match, **cache):
        q = msfp.quantize(copy.deepcopy(fp), QuantConfig(eight_bit_layers=[], act_timestep_groups=2))
        before = state(q)
        with pytest.raises(ValueError, match=match):
            msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(4,), **cache)
        after = state(q)
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]

    fp = Folded().eval()
    assert_refused_untouched("'tok' gets inputs of 16 rows for a batch of 4 samples")
    q = msfp.quantize(copy.deepcopy(fp), QuantConfig(eight_bit_layers=[]))  # one scale for all timesteps: fine
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(4,),
                   cache_dir=tmp_path)
    # The same layer inputs from the cache: the check used to be skipped, and inference failed on group shapes. Then
    # it came in the search, after the model had recorded this teacher and its layers before 'tok' had been searched.
    assert_refused_untouched("'tok' gets inputs whose rows are not the batch's samples", cache_dir=tmp_path)
    # Its recorded sample is as bounded as a batched layer's: drawn per row, it was 4x larger here (1024x for a
    # per-pixel MLP on 32x32 inputs), all held in memory and written to the cache.
    from msfp.calibration import record_layer_inputs

    points = collect_trajectories(fp, scheduler(), num_samples=4, num_steps=2, sample_shape=(4,), disable=True)
    rec = record_layer_inputs(msfp.quantize(copy.deepcopy(fp), QuantConfig(eight_bit_layers=[])), points, 64,
                              batch_size=8, disable=True)
    assert {name: len(r["values"]) for name, r in rec.items()} == {"inp": 64, "tok": 64, "out": 64}
    assert rec["tok"]["macs"] == 4 * 2 * 2  # per model sample: 4 rows of a 2x2 linear


def test_a_layer_called_with_one_unbatched_input_calibrates():
    class SharedTimeMlp(nn.Module):  # its time MLP runs once on a 1-D embedding of the batch's one timestep
        def __init__(self):
            super().__init__()
            self.time, self.body = nn.Linear(1, 4), nn.Linear(4, 4)

        def forward(self, x, t):
            emb = self.time(t.float().reshape(-1)[:1] / 1000)  # shape (4,)
            return self.body(x) + emb

    fp = SharedTimeMlp().eval()
    q = msfp.quantize(copy.deepcopy(fp), QuantConfig(eight_bit_layers=[]))
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, disable=True, sample_shape=(4,))  # IndexError
    layers = quant_layers(q)
    assert layers["time"].info["macs"] == 1  # one 1x4 product per call, shared by the call's 4 samples
    assert layers["body"].info["macs"] == 16


def test_trajectory_keys_do_not_depend_on_string_hashing():
    # A scheduler config missing keys (older Hub configs) lists them in _use_default_values in set order, which
    # follows PYTHONHASHSEED: fine-tuning's teacher key changed between processes, so `msfp finetune --resume` in a
    # new process was refused as "another teacher" and the trajectories were sampled again.
    from hash_seeds import outputs_under_hash_seeds

    code = ("from diffusers import DDIMScheduler\n"
            "from msfp.calibration import trajectory_key\n"
            "from tiny_models import tiny_plain\n"
            "s = DDIMScheduler.from_config({'num_train_timesteps': 1000})\n"
            "assert len(s.config['_use_default_values']) > 5\n"
            "print(trajectory_key(tiny_plain(), s, 2, 2, 0, batch_size=2))\n")
    keys = outputs_under_hash_seeds(code)
    assert len(keys) == 1, keys


def test_calibration_warns_when_the_output_comes_from_a_4bit_layer(tmp_path):
    # A wrapper's own head after a whole UNet: @last cannot tell it from an adapter by registration, and keeps the
    # UNet's conv_out at 8 bits; the traced output says which layer made it.
    from msfp.calibration import OutputLayerWarning

    class Headed(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.head = tiny_unet(), nn.Conv2d(1, 1, 1)

        def forward(self, x, t):
            return self.head(self.unet(x, t).sample)

    torch.manual_seed(0)
    fp = Headed().eval()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    for run in ("recorded", "from the cache"):  # a calibration from the cache did not check it
        with pytest.warns(OutputLayerWarning, match=r"output comes from 'head', which is at 4 bits, while @last kept "
                                                    r"'unet.conv_out' at 8 bits.*eight_bit_layers \+= \['head'\]"):
            report = msfp.calibrate(copy.deepcopy(q), fp, scheduler(), num_samples=2, num_steps=2, disable=True,
                                    sample_shape=(1, 8, 8), cache_dir=tmp_path)
        assert report.cached == (run == "from the cache")
    with warnings.catch_warnings():  # the model's own output layer: no warning
        warnings.simplefilter("error", OutputLayerWarning)
        fp = tiny_unet()
        msfp.calibrate(msfp.quantize(copy.deepcopy(fp), "w4a4-msfp"), fp, scheduler(), num_samples=2, num_steps=2,
                       disable=True)
