import json
import logging
import warnings

import huggingface_hub
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler,
                       UNet2DModel)

from msfp.models import load_model
from msfp.sampling import sample

def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_default_model_loads_offline_and_samples():
    model, scheduler = load_model("default")
    assert isinstance(model, UNet2DModel) and not model.training
    assert isinstance(scheduler, DDIMScheduler)
    assert (model.config.sample_size, model.config.in_channels) == (32, 1)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    images = sample(model, scheduler, 2, num_inference_steps=2, disable=True)
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()
    assert images.abs().max() <= 1.0 + 1e-5  # clip_sample: the last DDIM step returns the clipped x0 prediction


def test_loading_does_not_warn_about_accelerate(tmp_path):
    # diffusers' default low_cpu_mem_usage=True logs a warning on every load where accelerate is missing.
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        load_model("default")
        load_model(tmp_path)
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [r for r in records if "low_cpu_mem_usage" in r.getMessage()]


def test_pipeline_dir(tmp_path):
    unet = tiny_unet()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_end=0.03)).save_pretrained(tmp_path)
    model, scheduler = load_model(tmp_path)
    assert same_weights(model, unet) and not model.training
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.beta_end == 0.03
    model2, _ = load_model(str(tmp_path))
    assert same_weights(model2, unet)


def test_a_pipelines_denoiser_folder_gets_the_pipelines_schedule(tmp_path):
    # pipe/unet has no scheduler_config.json of its own: it got DDIMScheduler()'s linear betas, calibrated and saved
    # with them, where pipe/scheduler says scaled_linear.
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012)).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, scheduler = load_model(tmp_path / "unet")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012


def test_bare_model_dir(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no scheduler_config.json"):
        model, scheduler = load_model(tmp_path)
    assert same_weights(model, unet) and isinstance(scheduler, DDIMScheduler)
    DDPMScheduler(num_train_timesteps=50).save_pretrained(tmp_path)
    _, scheduler = load_model(tmp_path)
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.num_train_timesteps == 50


def test_a_folder_with_only_variant_weights_loads_them(tmp_path):
    # save_pretrained(variant="fp16") writes diffusion_pytorch_model.fp16.safetensors alone; loading said "no file
    # named diffusion_pytorch_model.bin".
    unet = tiny_unet()
    unet.half().save_pretrained(tmp_path / "model", variant="fp16")
    model, _ = load_model(tmp_path / "model")
    assert next(model.parameters()).dtype == torch.float32 and same_weights(model.half(), unet)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe", variant="fp16")
    assert same_weights(load_model(tmp_path / "pipe")[0].half(), unet)
    unet.save_pretrained(tmp_path / "model", variant="bf16")
    with pytest.raises(ValueError, match="model: holds the weights only as variants bf16, fp16 and msfp cannot tell"):
        load_model(tmp_path / "model")


def test_bad_specs(tmp_path):
    with pytest.raises(TypeError, match="model spec must be 'default', a directory or a Hub id .*got int"):
        load_model(123)
    with pytest.raises(TypeError, match="got UNet2DModel; pass a loaded model to msfp.quantize itself"):
        load_model(tiny_unet())
    with pytest.raises(FileNotFoundError, match="no/such/dir/here.*no such directory"):
        load_model("no/such/dir/here")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*neither a diffusers pipeline.*nor a model"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin.*is a file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel"}))
    with pytest.raises(ValueError, match="config.json: unknown model class 'NoSuchModel'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))  # a class, not a model
    with pytest.raises(ValueError, match="unknown model class 'DDPMScheduler'"):
        load_model(tmp_path)
    from diffusers import AutoencoderKL

    # A VAE loaded as the "denoiser", and denoise() handed the timestep to its sample_posterior flag.
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="vae/config.json: AutoencoderKL is not a denoiser: its forward takes no "
                                         "timestep"):
        load_model(tmp_path / "vae")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read JSON config"):
        load_model(tmp_path)
    from diffusers import UNet1DModel

    # A denoiser msfp cannot sample: it passed, then failed inside sampling with a tensor-dimension traceback.
    UNet1DModel(block_out_channels=(8, 8, 8), down_block_types=("DownBlock1D",) * 3,
                up_block_types=("UpBlock1D",) * 3, mid_block_type="UNetMidBlock1D").save_pretrained(tmp_path / "1d")
    with pytest.raises(ValueError, match="1d/config.json: msfp supports the diffusers image denoisers UNet2DModel, "
                                         ".*, not UNet1DModel"):
        load_model(tmp_path / "1d")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    unet = tiny_unet()
    unet.save_pretrained(tmp_path)
    DDPMScheduler().save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_out.weight"], state["conv_out.bias"]
    save_file({**state, "extra.weight": torch.zeros(1)}, weights)
    # Without accelerate the missing weights were uninitialised memory, and msfp quantize saved a checkpoint of them.
    with pytest.raises(ValueError, match=f"{tmp_path}: its weights do not fit the UNet2DModel its config describes "
                                         r"\(missing: conv_out.(weight|bias), conv_out.(weight|bias); not in the "
                                         r"model: extra.weight\)"):
        load_model(tmp_path)


def test_a_scheduler_whose_backend_is_missing_loads_from_a_complete_config(tmp_path, monkeypatch):
    # Without torchsde diffusers exports a stand-in DPMSolverSDEScheduler that takes any argument: its signature has no
    # beta_schedule, so the config was refused as having no betas (it has them).
    import diffusers
    from diffusers.utils import DummyObject

    class DPMSolverSDEScheduler(metaclass=DummyObject):
        _backends = ["torch", "torchsde"]

    monkeypatch.setattr(diffusers, "DPMSolverSDEScheduler", DPMSolverSDEScheduler)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"],
                                                           "scheduler": ["diffusers", "DPMSolverSDEScheduler"]}))
    tiny_unet().save_pretrained(tmp_path / "unet")
    config = tmp_path / "scheduler" / "scheduler_config.json"
    config.parent.mkdir()
    schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    config.write_text(json.dumps({"_class_name": "DPMSolverSDEScheduler", "num_train_timesteps": 1000, **schedule}))
    loaded = load_model(tmp_path)[1].config
    assert {k: loaded[k] for k in schedule} == schedule
    # Its defaults (not DDIM's) cannot be read without the backend: a setting left out is an error, not DDIM's.
    config.write_text(json.dumps({"_class_name": "DPMSolverSDEScheduler", "num_train_timesteps": 1000}))
    with pytest.raises(ValueError, match="DPMSolverSDEScheduler needs torch, torchsde installed for the defaults"):
        load_model(tmp_path)


def test_bad_pipeline_dirs(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                           "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ValueError, match="names no denoiser"):
        load_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"],
                                                           "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(FileNotFoundError, match=r"unet/config.json is missing"):
        load_model(tmp_path)
    tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="no scheduler/scheduler_config.json"):
        load_model(tmp_path)
    # A schedule without betas would silently become a default linear-beta DDIM.
    for other in (FlowMatchEulerDiscreteScheduler(), EDMEulerScheduler()):
        other.save_pretrained(tmp_path / "scheduler")
        with pytest.raises(ValueError, match=f"scheduler_config.json: {type(other).__name__} has no DDPM noise "
                                             "schedule"):
            load_model(tmp_path)
    DDPMScheduler(beta_end=0.03).save_pretrained(tmp_path / "scheduler")
    assert load_model(tmp_path)[1].config.beta_end == 0.03
    from diffusers import LCMScheduler, TCDScheduler

    for betas in (LCMScheduler(beta_end=0.013), TCDScheduler(beta_end=0.013)):  # used to be "has no ... betas"
        betas.save_pretrained(tmp_path / "scheduler")
        assert load_model(tmp_path)[1].config.beta_end == 0.013
    from diffusers import CogVideoXDDIMScheduler

    # Betas, but reshaped by snr_shift_scale: DDIM would sample another schedule.
    CogVideoXDDIMScheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match="CogVideoXDDIMScheduler reshapes its betas or steps in ways DDIM would not"):
        load_model(tmp_path)
    DDPMScheduler(trained_betas=[]).save_pretrained(tmp_path / "scheduler")  # an IndexError, later
    with pytest.raises(ValueError, match="trained_betas is empty, so there is no noise schedule"):
        load_model(tmp_path)
    # A hand-written config leaves settings out, which diffusers fills in with the class's defaults: read as "no
    # betas" (DDPM's) or as DDIM's defaults instead of the class's (LCM's scaled_linear).
    config = tmp_path / "scheduler" / "scheduler_config.json"
    for kind, expected in (("DDPMScheduler", DDPMScheduler()), ("LCMScheduler", LCMScheduler())):
        config.write_text(json.dumps({"_class_name": kind, "num_train_timesteps": 1000}))
        loaded = load_model(tmp_path)[1].config
        assert [loaded[k] for k in ("beta_schedule", "beta_start", "beta_end")] == \
            [expected.config[k] for k in ("beta_schedule", "beta_start", "beta_end")]
    config.write_text(json.dumps({"num_train_timesteps": 1000}))
    with pytest.raises(ValueError, match="names no scheduler class .* so its noise schedule is unknown"):
        load_model(tmp_path)
    from diffusers import DDIMParallelScheduler, DDPMParallelScheduler, SASolverScheduler

    for family in (SASolverScheduler, DDPMParallelScheduler, DDIMParallelScheduler):  # were "has no ... betas"
        family(beta_end=0.013).save_pretrained(tmp_path / "scheduler")
        assert load_model(tmp_path)[1].config.beta_end == 0.013
    # 50 betas for the default 1000 steps: an IndexError at t = 800, in the first sampling step
    DDPMScheduler(trained_betas=[0.01] * 50).save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match="trained_betas holds 50 values for num_train_timesteps 1000; they must be "
                                         "equal"):
        load_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": "UNet2DModel"}))
    with pytest.raises(ValueError, match=r"unet should be \[library, class name\], got 'UNet2DModel'"):
        load_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 32]}))
    with pytest.raises(ValueError, match=r"unet: cannot load the UNet2DModel from its config and weights \(.*size "
                                         "mismatch"):
        load_model(tmp_path)
    for bad, why in ((dict(down_block_types=["NoSuchBlock2D", "DownBlock2D"]), "NoSuchBlock2D does not exist"),
                     (dict(layers_per_block="two"), "'str' object cannot be interpreted as an integer")):
        (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, **bad}))  # used to name no folder
        with pytest.raises(ValueError, match=f"unet: cannot load the UNet2DModel from its config and weights \\({why}"):
            load_model(tmp_path)
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    scheduler_config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler_config,
                                                                             "beta_schedule": "cosine-ish"}))
    with pytest.raises(ValueError, match="scheduler_config.json: cannot build its noise schedule \\(cosine-ish is not "
                                         "implemented"):
        load_model(tmp_path)
    (tmp_path / "unet" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="unet/config.json: expected a JSON object of settings, got list"):
        load_model(tmp_path)


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    # Force offline mode so the test never touches the network, whatever the machine.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=r"'msfp-test/no-such-model' is no directory here \(.*\), and could not "
                                      "download model 'msfp-test/no-such-model'.*'default' or a local"):
        load_model("msfp-test/no-such-model")


@pytest.mark.parametrize("safetensors", [True, False])
def test_a_hub_download_fetches_the_configs_and_one_copy_of_the_denoiser(monkeypatch, tmp_path, safetensors):
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    repo, fetched = tmp_path / "repo", tmp_path / "snapshot"
    unet = tiny_unet()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(repo, safe_serialization=safetensors)
    weights = "diffusion_pytorch_model." + ("safetensors" if safetensors else "bin")
    # What repos such as SD-1.5 hold beside them: variants and other components ("unet/*" fetched them all).
    for extra in ("unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
                  "unet/diffusion_pytorch_model.fp16.bin", "vae/diffusion_pytorch_model.safetensors",
                  "text_encoder/model.safetensors"):
        (repo / extra).parent.mkdir(exist_ok=True)
        (repo / extra).write_bytes(b"not needed")
    calls = []

    def snapshot_download(repo_id, allow_patterns):  # the Hub's pattern matching over the repo's files
        calls.append(repo_id)
        files = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (fetched / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, fetched / name)
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, scheduler = load_model("msfp-test/tiny-ddpm")
    assert same_weights(model, unet) and isinstance(scheduler, DDIMScheduler)
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json", f"unet/{weights}"]
    assert len(calls) == (1 if safetensors else 2)  # PyTorch pickles only where a repo has no safetensors


def test_denoise_passes_the_timestep_by_name_through_data_parallel():
    from msfp.models import denoise
    from tiny_models import tiny_pixart

    model = tiny_pixart().eval()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 3, 8)
    cond = dict(encoder_hidden_states=text, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        # DataParallel's forward(*inputs, **kwargs) hides the name: t went in as encoder_hidden_states (TypeError).
        assert torch.equal(denoise(torch.nn.DataParallel(model), x, t, **cond), denoise(model, x, t, **cond))


def test_a_denoiser_that_takes_no_timestep_gets_a_clear_error():
    import copy

    import msfp

    class NoTimestep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    model = NoTimestep()
    q = msfp.quantize(copy.deepcopy(model), "w4a4-msfp")
    # Calibration failed on Python's "forward() takes 2 positional arguments but 3 were given".
    with pytest.raises(TypeError, match=r"NoTimestep.forward\(x\) takes no timestep: msfp calls a denoiser as "
                                        r"model\(x, t, \*\*cond\).*forward\(x, t\) ignores t"):
        msfp.calibrate(q, model, DDIMScheduler(), num_samples=2, num_steps=2, sample_shape=(1, 4, 4), disable=True)
    with pytest.raises(TypeError, match=r"^<lambda>\(x\) takes no timestep"):  # a plain function is a denoiser too
        msfp.models.denoise(lambda x: x, torch.zeros(1, 1, 4, 4), torch.zeros(1))
    for takes_t in (lambda *args: args[0], lambda x, *, timestep: x):  # in *args; by name, as msfp passes it then
        assert msfp.models.denoise(takes_t, torch.ones(1, 1, 2, 2), torch.zeros(1)).sum() == 4
