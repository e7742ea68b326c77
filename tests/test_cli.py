import copy
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import msfp
from msfp.cli import main
from msfp.samples import load_samples, save_samples
from tiny_models import tiny_unet


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def fashion_like(n, seed=0):
    """n uint8 (32, 32, 1) images: padded Fashion-MNIST test images, shifted so that sets differ."""
    with np.load(Path(__file__).parent / "data" / "fashion_mnist_test256.npz") as f:
        images = f["images"][seed: seed + n]
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]


def test_sample_writes_npz_and_grid(tmp_path, tiny_model_dir):
    r = run("sample", "--model", tiny_model_dir, "--num", 3, "--steps", 2, "--seed", 5, "--scheduler", "dpm",
            "--out", tmp_path / "s.npz")
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 's.npz'} (3 images, seeds 5..7) and {tmp_path / 's.png'}" in r.output
    s = load_samples(tmp_path / "s.npz")
    assert s["images"].shape == (3, 8, 8, 1) and s["seeds"].tolist() == [5, 6, 7]
    assert s["meta"]["model"] == str(tiny_model_dir) and s["meta"]["scheduler"] == "DPMSolverMultistepScheduler"
    # What a quantized model's images would also depend on; a full-precision model has no backend. 3 images at
    # --batch 64 are drawn 3 per call: 64 was recorded, as for 64 images, which are drawn otherwise.
    assert {k: s["meta"][k] for k in ("batch_size", "device", "cuda_graphs")} == dict(batch_size=3, device="cpu",
                                                                                     cuda_graphs=False)
    assert "backend" not in s["meta"]
    assert (tmp_path / "s.png").is_file()


def test_sample_bad_input(tmp_path):
    r = run("sample", "--model", tmp_path / "nope", "--out", tmp_path / "s.npz")
    assert r.exit_code == 1 and "Error: model spec" in r.output and "no such directory" in r.output
    r = run("sample", "--scheduler", "heun", "--out", tmp_path / "s.npz")
    assert r.exit_code == 2 and "'heun' is not one of" in r.output
    r = run("sample", "--num", 1, "--steps", 1, "--out", tmp_path / "s.png")  # the grid used to overwrite the samples
    assert r.exit_code == 1 and "s.png: a sample file's name must end in .npz" in r.output
    assert not (tmp_path / "s.png").exists()
    r = run("eval", tmp_path / "s.npz", "--data-dir", tmp_path / "nope")  # used to drop KID & co. silently
    assert r.exit_code == 2 and "Directory" in r.output and "does not exist" in r.output
    if not torch.cuda.is_available():
        r = run("sample", "--num", 1, "--steps", 1, "--cuda-graphs", "--out", tmp_path / "s.npz")
        assert r.exit_code == 1 and "CUDA graphs need the model on a CUDA device; it is on cpu" in r.output
        assert not (tmp_path / "s.npz").exists()


def test_sample_defaults_to_the_gpu_where_there_is_one(tmp_path, monkeypatch):
    # The model loads on the CPU; without a device, generate() would sample where it is, even on a GPU machine
    # (and --backend fp8 would then quietly run emulated).
    import msfp.samples

    devices = []
    monkeypatch.setattr(msfp.samples, "generate", lambda *args, device=None, **kwargs: devices.append(device))
    for available, world_size in ((True, "1"), (False, "1"), (True, "2")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setenv("WORLD_SIZE", world_size)
        assert run("sample", "--out", tmp_path / "s.npz").exit_code == 0
    # under torchrun (WORLD_SIZE 2) generate() picks each rank's GPU itself
    assert devices == ["cuda", "cpu", None]


@pytest.mark.parametrize("command", ["quantize", "finetune", "sample", "eval", "compare"])
def test_help_says_every_command_defaults_to_the_gpu(command):
    # quantize and finetune showed no default, read as "cpu" on a machine without a GPU.
    assert "default: cuda if available" in " ".join(run(command, "--help").output.split())


def test_a_device_this_machine_lacks_is_one_clear_error(tmp_path, monkeypatch):
    r = run("sample", "--device", "tpu", "--out", tmp_path / "s.npz")
    assert r.exit_code == 2 and "'tpu' is not a torch device" in r.output
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    for command in (["sample", "--out", tmp_path / "s.npz"], ["quantize", "--out", tmp_path / "q"],
                    ["eval", tmp_path / "s.npz"], ["finetune", tmp_path], ["compare", "--out", tmp_path / "r"]):
        r = run(command[0], "--device", "cuda", *command[1:])
        assert r.exit_code == 2, (command, r.output)
        assert f"cuda: this torch ({torch.__version__}) is built without CUDA" in r.output, command
    assert list(tmp_path.iterdir()) == []  # stopped before writing anything
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run("sample", "--device", "cuda:0", "--out", tmp_path / "s.npz")
    assert r.exit_code == 2 and "cuda:0: no CUDA GPU is visible" in r.output


@pytest.mark.parametrize("device, why", [("meta", "meta tensors hold no data"),
                                         ("xla", "cannot create tensors on xla (NotImplementedError)")])
def test_device_types_torch_names_but_cannot_compute_on_are_refused(tmp_path, device, why):
    r = run("sample", "--device", device, "--out", tmp_path / "s.npz")  # tracebacks after loading the model
    assert r.exit_code == 2 and f"{device}: " in r.output and why in r.output, r.output


def test_quantize_refuses_a_cache_inside_its_output_before_calibrating(tmp_path):
    r = run("quantize", "--out", tmp_path / "q", "--cache-dir", tmp_path / "q" / "cache")
    assert r.exit_code == 2 and "is inside --out" in r.output, r.output  # it used to calibrate, then refuse to save
    assert list(tmp_path.iterdir()) == []


def test_device_check_counts_the_gpus(monkeypatch):
    from msfp.cli import _device_unavailable

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _device_unavailable(torch.device("cuda")) is None
    assert _device_unavailable(torch.device("cuda:1")) is None
    assert _device_unavailable(torch.device("cuda:2")) == "this machine has cuda:0 to cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _device_unavailable(torch.device("cuda:1")) == "this machine has only cuda:0"
    assert _device_unavailable(torch.device("cpu")) is None
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)
    assert _device_unavailable(torch.device("mps")) == "no mps device is available"


def test_eval_against_reference_images(tmp_path):
    save_samples(tmp_path / "s.npz", fashion_like(40), np.arange(40))
    save_samples(tmp_path / "ref.npz", fashion_like(60, seed=100), np.arange(60))
    r = run("eval", tmp_path / "s.npz", "--ref", tmp_path / "ref.npz", "--json", tmp_path / "out" / "r.json")
    assert r.exit_code == 0, r.output
    for label in ("FD (feature net)", "KID (feature net)", "classifier score", "precision (feature net)",
                  "recall (feature net)"):
        assert label in r.output
    assert "no --inception-weights given" in r.output and "no --paired samples given" in r.output
    result = json.loads((tmp_path / "out" / "r.json").read_text())
    m = result["metrics"]
    assert result["num_samples"] == 40 and result["reference"] == str(tmp_path / "ref.npz")
    # Real images: classifier score well above 1 (4 splits of 10 images), most inside the reference manifold.
    assert m["classifier_score"] > 2 and m["precision"] > 0.5 and 0 < m["recall"] <= 1
    assert len(result["fd_bootstrap"]) == 200 and m["fd_std"] == pytest.approx(np.std(result["fd_bootstrap"]), rel=1e-3)
    assert set(result["skipped"]) == {"fid, sfid, inception_score, inception_precision, inception_recall",
                                      "psnr, paired_mse", "eps_mse, eps_mse_weighted"}
    noise = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 1), dtype=np.uint8)
    save_samples(tmp_path / "noise.npz", noise, np.arange(40))
    r = run("eval", tmp_path / "noise.npz", "--ref", tmp_path / "ref.npz", "--json", tmp_path / "noise.json")
    noise_m = json.loads((tmp_path / "noise.json").read_text())["metrics"]
    assert noise_m["fd"] > 2 * m["fd"] > 0 and noise_m["kid"] > m["kid"] and noise_m["precision"] < m["precision"]


def test_eval_default_reference_without_the_dataset(tmp_path, monkeypatch):
    import msfp.data

    save_samples(tmp_path / "s.npz", fashion_like(20), np.arange(20))
    (tmp_path / "no_data").mkdir()  # a directory without the IDX files
    # Named with --data-dir, it is an error: it used to drop KID, precision and recall as quietly as no dataset.
    r = run("eval", tmp_path / "s.npz", "--data-dir", tmp_path / "no_data", "--json", tmp_path / "r.json")
    assert r.exit_code == 1 and "t10k-images-idx3-ubyte[.gz] not found in " in r.output
    monkeypatch.setattr(msfp.data, "DEFAULT_DATA_DIR", tmp_path / "no_data")  # as on a machine without the package
    r = run("eval", tmp_path / "s.npz", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["reference"] == "Fashion-MNIST test split (10,000 images)"
    assert {"fd", "classifier_score"} <= set(result["metrics"]) and "kid" not in result["metrics"]
    assert "the Fashion-MNIST test images are not available" in result["skipped"]["kid, precision, recall"]
    assert result["skipped"]["eps_mse, eps_mse_weighted"] == "no --model given"  # every metric: computed or skipped


def test_eval_data_dir_names_the_reference_it_used(tmp_path):
    from idx_files import write_fashion_mnist

    save_samples(tmp_path / "s.npz", fashion_like(20), np.arange(20))
    (tmp_path / "data").mkdir()
    write_fashion_mnist(tmp_path / "data")  # 256 images: it was named "Fashion-MNIST test split (10,000 images)"
    r = run("eval", tmp_path / "s.npz", "--data-dir", tmp_path / "data", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["reference"] == f"{tmp_path / 'data'} test split (256 images)"
    assert f"reference: {tmp_path / 'data'} test split (256 images)" in r.output


def test_eval_paired(tmp_path):
    images = fashion_like(10)
    save_samples(tmp_path / "q.npz", images, np.arange(10))
    noisy = images.copy()
    noisy[0, 0, 0, 0] += 10  # one pixel off by 10: MSE = 100 / (10·32·32)
    save_samples(tmp_path / "fp.npz", noisy, np.arange(10))
    r = run("eval", tmp_path / "q.npz", "--ref", tmp_path / "fp.npz", "--paired", tmp_path / "fp.npz",
            "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    mse = 100 / (10 * 32 * 32)
    assert m["paired_mse"] == pytest.approx(mse) and m["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse))
    r = run("eval", tmp_path / "q.npz", "--ref", tmp_path / "fp.npz", "--paired", tmp_path / "q.npz",
            "--json", tmp_path / "r.json")
    assert re.search(r"PSNR vs paired samples \(dB\) +inf\n", r.output)
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["psnr"] is None  # strict JSON has no inf
    # Pairs drawn with other sampling settings gave a PSNR without a word.
    save_samples(tmp_path / "fp10.npz", noisy, np.arange(10), meta=dict(scheduler="DDIMScheduler", steps=10))
    save_samples(tmp_path / "q20.npz", images, np.arange(10), meta=dict(scheduler="DDIMScheduler", steps=20))
    with pytest.warns(UserWarning, match=r"q20.npz and .*fp10.npz were drawn with different sampling settings "
                                         r"\(steps 20 vs 10\): the paired metrics measure that difference too"):
        r = run("eval", tmp_path / "q20.npz", "--ref", tmp_path / "fp10.npz", "--paired", tmp_path / "fp10.npz")
    assert r.exit_code == 0, r.output
    # --json never replaces an input, a file in an input directory, nor a file that is not eval results: it wrote its
    # results over SAMPLES, and over a --model checkpoint's msfp_quant.json (any JSON was taken for results).
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "config.json").write_text('{"sample_size": 32}')
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "msfp_quant.json").write_text('{"format_version": 3}')
    for target, what in ((tmp_path / "q.npz", "SAMPLES"), (tmp_path / "fp.npz", "--paired"),
                         (tmp_path / "notes.txt", "is not the results of an earlier msfp eval"),
                         (tmp_path / "config.json", "is not the results of an earlier msfp eval"),
                         (tmp_path / "q" / "msfp_quant.json", "inside the --model directory")):
        before = target.read_bytes()
        r = run("eval", tmp_path / "q.npz", "--ref", tmp_path / "fp.npz", "--paired", tmp_path / "fp.npz",
                "--model", tmp_path / "q", "--json", target)
        assert r.exit_code == 2 and what in r.output, r.output
        assert target.read_bytes() == before


def test_eval_bad_input(tmp_path):
    images = fashion_like(10)
    save_samples(tmp_path / "s.npz", images, np.arange(10))
    save_samples(tmp_path / "seeds.npz", images, np.arange(1, 11))
    save_samples(tmp_path / "few.npz", images[:5], np.arange(5))
    np.savez(tmp_path / "noseeds.npz", arr_0=images)
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))

    def error(*args):
        r = run("eval", *args)
        assert r.exit_code != 0
        return r.output

    assert "sample file" in error(tmp_path / "missing.npz") and "not found" in error(tmp_path / "missing.npz")
    assert "expected arr_0 = uint8 images" in error(tmp_path / "junk.npz")
    assert "reference images (arr_0) or feature-net statistics (mu, sigma)" in error(
        tmp_path / "s.npz", "--ref", tmp_path / "junk.npz")
    assert "give --ref or --ref-images, not both" in error(tmp_path / "s.npz", "--ref", tmp_path / "s.npz",
                                                          "--ref-images", tmp_path)
    assert "holds no images" in error(tmp_path / "s.npz", "--ref-images", tmp_path)
    # Options that only shape a metric not asked for were ignored without a word.
    assert "--fp-model, --heldout-steps set(s) how --model is measured; without --model" in error(
        tmp_path / "s.npz", "--fp-model", "default", "--heldout-steps", 5)
    assert "--data-dir locates the default reference; it has no use with --ref" in error(
        tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--data-dir", tmp_path)
    out = error(tmp_path / "s.npz", "--paired", tmp_path / "seeds.npz")
    assert "not drawn with the same seeds: image 0 has seed 0 vs 1" in out
    assert "(10, 32, 32, 1) but" in error(tmp_path / "s.npz", "--paired", tmp_path / "few.npz")
    assert "noseeds.npz has no seeds" in error(tmp_path / "s.npz", "--paired", tmp_path / "noseeds.npz")
    assert "Inception weights" in error(tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--inception-weights",
                                        tmp_path / "none.pth")

    # Reference files that are not .npz, or hold unusable statistics: one clear line each.
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "empty.npz").write_bytes(b"")
    for bad in ("array.npy", "empty.npz"):
        message = error(tmp_path / "s.npz", "--ref", tmp_path / bad)
        assert f"{bad}: not a .npz reference file (not a zip archive)" in message
    mu, sigma = np.zeros(128), np.eye(128)
    for name, stats, message in (
            ("nan.npz", dict(mu=np.full(128, np.nan), sigma=sigma), "finite: False"),
            ("square.npz", dict(mu=mu, sigma=np.eye(3)), r"mu \(128,\), sigma \(3, 3\)"),
            ("inception.npz", dict(mu=np.zeros(2048), sigma=np.eye(2048)),
             "are 2048-dimensional, the feature network's features 128-dimensional")):
        np.savez(tmp_path / name, **stats)
        assert re.search(message, error(tmp_path / "s.npz", "--ref", tmp_path / name)), name
    np.savez(tmp_path / "fine.npz", mu=mu, sigma=sigma)
    assert run("eval", tmp_path / "s.npz", "--ref", tmp_path / "fine.npz").exit_code == 0
    np.savez(tmp_path / "none.npz", arr_0=np.zeros((0, 32, 32, 1), np.uint8))
    assert "with N, H, W >= 1" in error(tmp_path / "none.npz")
    # Too few images for the distribution metrics: those are skipped with the reason, the rest is reported.
    save_samples(tmp_path / "three.npz", images[:3], np.arange(3))
    r = run("eval", tmp_path / "three.npz", "--ref", tmp_path / "s.npz", "--json", tmp_path / "three.json")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "three.json").read_text())
    assert result["skipped"]["fd, kid, precision, recall"] == "they need at least 4 samples, got 3"
    assert result["metrics"]["classifier_score"] >= 1


def test_eval_reference_image_dir_and_other_image_sizes(tmp_path):
    from PIL import Image

    for i, im in enumerate(fashion_like(12, seed=50)):
        Image.fromarray(im[..., 0]).save(tmp_path / f"{i:02d}.png")
    save_samples(tmp_path / "s.npz", fashion_like(12), np.arange(12))
    r = run("eval", tmp_path / "s.npz", "--ref-images", tmp_path, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "kid" in json.loads((tmp_path / "r.json").read_text())["metrics"]

    save_samples(tmp_path / "rgb.npz", np.zeros((4, 16, 16, 3), np.uint8), np.arange(4))
    r = run("eval", tmp_path / "rgb.npz", "--ref-images", tmp_path, "--json", tmp_path / "rgb.json")
    # Nothing to compute: it used to exit 0 with an empty table.
    assert r.exit_code == 1 and f"no metric could be computed for {tmp_path / 'rgb.npz'} (" in r.output
    assert "the shipped feature network takes 32x32x1 Fashion-MNIST images; the samples are 16x16x3" in r.output
    assert not (tmp_path / "rgb.json").exists()


def test_commands_refuse_to_replace_the_current_directory_before_any_work(tmp_path, monkeypatch, tiny_model_dir):
    q, elsewhere, missing = tmp_path / "q", tmp_path / "report", tmp_path / "no-model"
    q.mkdir()  # an existing empty directory is fine (it used to be refused, after calibrating)
    r = run("quantize", "--model", tiny_model_dir, "--out", q, "--calib-samples", 2, "--calib-steps", 2, "--batch", 2)
    assert r.exit_code == 0, r.output
    elsewhere.mkdir()
    # From inside the directory each would replace: refused at once, before the model (missing here) is even loaded;
    # compare ran every method first, and finetune wrote its work directory into q as "..finetune".
    for directory, args in ((q, ["quantize", "--model", missing, "--out", "."]),
                            (q, ["finetune", ".", "--model", missing]),
                            (elsewhere, ["compare", "--model", missing, "--out", "."])):
        monkeypatch.chdir(directory)
        r = run(*args)
        assert r.exit_code == 1 and "the current directory is inside it" in r.output, (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "report"]
    assert sorted(p.name for p in q.iterdir()) == ["model.safetensors", "msfp_quant.json"]


def test_a_quantized_directory_samples_with_the_full_precision_models_schedule(tmp_path):
    # A scheduler config without timestep_spacing (older repos, google/ddpm-cifar10-32 say): DDIM fills in "leading"
    # and lists the key as defaulted, so Euler and DPM-Solver built from it take their own default ("linspace").
    # Recorded without that list, the quantized directory's Euler and DPM-Solver stepped at DDIM's "leading" timesteps
    # while the full-precision model's did not: paired metrics compared two samplers.
    from msfp.cli import _load_any_model
    from msfp.samples import get_scheduler

    tiny_unet().save_pretrained(tmp_path / "fp")
    (tmp_path / "fp" / "scheduler_config.json").write_text(json.dumps(dict(
        _class_name="DDPMScheduler", beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
        num_train_timesteps=1000, clip_sample=True, variance_type="fixed_small")))
    r = run("quantize", "--model", tmp_path / "fp", "--out", tmp_path / "q", "--calib-samples", 2, "--calib-steps", 2)
    assert r.exit_code == 0, r.output
    listed = json.loads((tmp_path / "q" / "msfp_quant.json").read_text())["scheduler_config"]["_use_default_values"]
    assert "timestep_spacing" in listed and listed == sorted(listed)  # sorted: the same file in every process
    fp_scheduler, q_scheduler = (_load_any_model(str(tmp_path / d))[1] for d in ("fp", "q"))
    for name in ("euler", "dpm"):
        fp_steps, q_steps = get_scheduler(name, fp_scheduler), get_scheduler(name, q_scheduler)
        fp_steps.set_timesteps(10)
        q_steps.set_timesteps(10)
        assert fp_steps.config.timestep_spacing == "linspace"
        assert torch.equal(q_steps.timesteps, fp_steps.timesteps), name


def test_a_quantized_directory_samples_on_the_noise_schedule_it_was_calibrated_on(tmp_path):
    # Calibrated through the API with an LCM scheduler whose file leaves its schedule to LCM's defaults (scaled_linear,
    # 0.00085 to 0.012): diffusers lists those keys as defaulted, and DDIM rebuilt from the record took DDIM's instead.
    from diffusers import LCMScheduler

    from msfp.checkpoint import _meta_sha256
    from msfp.cli import _load_any_model

    tiny_unet().save_pretrained(tmp_path / "fp")
    (tmp_path / "fp" / "scheduler_config.json").write_text(json.dumps(dict(_class_name="LCMScheduler",
                                                                          num_train_timesteps=1000)))
    fp, _ = _load_any_model(str(tmp_path / "fp"))
    teacher = LCMScheduler.from_pretrained(tmp_path / "fp")
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, teacher, num_samples=2, num_steps=2, disable=True)
    out = msfp.save_quantized(q, tmp_path / "q")
    assert torch.equal(_load_any_model(str(out))[1].alphas_cumprod, teacher.alphas_cumprod)
    # Checkpoints written before listed the schedule's keys as defaulted too: they sample on it as well.
    meta = json.loads((out / "msfp_quant.json").read_text())
    meta["scheduler_config"]["_use_default_values"] += ["beta_start", "beta_end", "beta_schedule"]
    meta["meta_sha256"] = _meta_sha256(meta)
    (out / "msfp_quant.json").write_text(json.dumps(meta))
    assert torch.equal(_load_any_model(str(out))[1].alphas_cumprod, teacher.alphas_cumprod)


def test_clear_errors_for_files_of_the_wrong_kind(tmp_path, tiny_model_dir):
    q = tmp_path / "q"
    r = run("quantize", "--model", tiny_model_dir, "--out", q, "--calib-samples", 2, "--calib-steps", 2)
    assert r.exit_code == 0, r.output
    r = run("quantize", "--model", q, "--out", tmp_path / "q2")  # used to say it had no config.json
    assert r.exit_code == 1 and "is a quantized msfp checkpoint; this needs the full-precision model" in r.output
    r = run("eval", q / "msfp_quant.json")  # used to talk about pickled data
    assert r.exit_code == 1 and "msfp_quant.json: not a .npz sample file (not a zip archive)" in r.output
    assert run("info", q).exit_code == 0
    # info checks the files as loading does: it printed a damaged checkpoint's table as if it were fine.
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    (bad / "model.safetensors").write_bytes((q / "model.safetensors").read_bytes()[:1000])
    r = run("info", bad)
    assert r.exit_code == 1 and "model.safetensors: checksum mismatch with msfp_quant.json" in r.output
    (bad / "model.safetensors").unlink()
    r = run("info", bad)
    assert r.exit_code == 1 and "model.safetensors is missing" in r.output
    edited = json.loads((q / "msfp_quant.json").read_text())
    layer = next(iter(edited["layers"].values()))
    layer["weight_format"] = "int4" if layer["weight_format"] != "int4" else "fp4_e2m1"
    (bad / "msfp_quant.json").write_text(json.dumps(edited))
    r = run("info", bad)
    assert r.exit_code == 1 and "msfp_quant.json: checksum mismatch: the file was edited after msfp" in r.output
    (bad / "msfp_quant.json").write_text("[1, 2]")  # said "checkpoint format version None"
    r = run("info", bad)
    assert r.exit_code == 1 and "msfp_quant.json: holds a JSON list, not the object msfp writes" in r.output
    meta = json.loads((q / "msfp_quant.json").read_text())
    del meta["layers"]
    (q / "msfp_quant.json").write_text(json.dumps(meta))
    r = run("info", q)  # used to be a KeyError traceback
    assert r.exit_code == 1 and "msfp_quant.json: 'layers' is missing or not a dict; the file was edited" in r.output


def test_unwritable_outputs_fail_before_the_work(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a path below a file cannot be created, even by root
    save_samples(tmp_path / "s.npz", fashion_like(4), np.arange(4))
    for args in (["sample", "--model", tiny_model_dir, "--num", 1, "--steps", 1, "--out", blocker / "s.npz"],
                 ["compare", "--model", tiny_model_dir, "--out", blocker / "report", "--num", 2, "--steps", 1],
                 ["eval", tmp_path / "s.npz", "--json", blocker / "r.json"]):
        r = run(*args)
        # They used to sample, run the reference method or compute every metric first.
        assert r.exit_code == 1 and "a-file" in r.output and "sample:" not in r.output, (args, r.output)
        assert "[1/" not in r.output and "fd" not in r.output, (args, r.output)
    if Path("/sys/kernel").is_dir():  # Linux's sysfs: no new files there, even for root
        # An existing folder passed mkdir(exist_ok=True): the work ran, then the write failed naming a temp file.
        for args in (["sample", "--model", tiny_model_dir, "--num", 1, "--steps", 1, "--out", "/sys/s.npz"],
                     ["eval", tmp_path / "s.npz", "--json", "/sys/r.json"]):
            r = run(*args)
            assert r.exit_code == 1 and "cannot write /sys/" in r.output and "sample:" not in r.output, r.output
            assert "fd" not in r.output and ".tmp-" not in r.output, (args, r.output)


def test_bad_counts_and_rates_name_their_flag(tmp_path):
    # These used to be reported by field name (FinetuneConfig.batch_size, CompareSettings.num_samples), as "--num 0
    # is smaller than the number of processes", or accepted (--max-minutes -1, --lr -1).
    for command, flag in ((["sample", "--out", tmp_path / "s.npz", "-n", 0], "'--num' / '-n'"),
                          (["sample", "--out", tmp_path / "s.npz", "--steps", 0], "'--steps'"),
                          (["compare", "--out", tmp_path / "c", "--batch", 0], "'--batch'"),
                          (["finetune", tmp_path, "--lr", -1], "'--lr'"),
                          (["finetune", tmp_path, "--max-minutes", -1], "'--max-minutes'"),
                          (["eval", tmp_path / "s.npz", "--paired", tmp_path / "nothere.npz"], "'--paired'"),
                          # int64 seeds (sample files); 2**64 - 1 used to fail after sampling
                          (["sample", "--out", tmp_path / "s.npz", "--seed", 2**64 - 1], "'--seed'"),
                          (["quantize", "--out", tmp_path / "q", "--seed", -1], "'--seed'")):
        r = run(*command)
        assert r.exit_code == 2 and f"Invalid value for {flag}" in r.output, (command, r.output)


def test_quantize_and_finetune_refuse_a_directory_another_run_is_writing(tmp_path, tiny_model_dir):
    from msfp.fileio import exclusive_run

    out = tmp_path / "q"
    quantize = ["quantize", "--model", tiny_model_dir, "--out", out, "--calib-samples", 2, "--calib-steps", 2]
    with exclusive_run(out, "msfp finetune"):
        r = run(*quantize)
    assert r.exit_code == 1 and f"{out} is being written by another run (msfp finetune, pid {os.getpid()} on " \
        in r.output, r.output
    assert not out.exists()
    assert run(*quantize).exit_code == 0
    with exclusive_run(out, "msfp quantize"):  # a second fine-tuning run would share its work directory
        r = run("finetune", out, "--model", tiny_model_dir, "--iters", 1)
    assert r.exit_code == 1 and "is being written by another run (msfp quantize, pid " in r.output, r.output
    assert not (tmp_path / ".q.lock").exists() and not (tmp_path / ".q.finetune").exists()


def test_a_model_that_needs_conditioning_is_refused_before_any_work(tmp_path):
    # It failed after loading, copying and quantizing, asking the command-line user to "pass cond={...}".
    from diffusers import DDPMScheduler
    from tiny_models import tiny_cond_unet

    tiny_cond_unet().save_pretrained(tmp_path / "cond")
    DDPMScheduler().save_pretrained(tmp_path / "cond")
    for args in (("quantize", "--model", tmp_path / "cond", "--out", tmp_path / "q"),
                 ("sample", "--model", tmp_path / "cond", "--out", tmp_path / "s.npz"),
                 ("compare", "--model", tmp_path / "cond", "--out", tmp_path / "report")):
        r = run(*args)
        assert r.exit_code == 1 and "UNet2DConditionModel needs conditioning (encoder_hidden_states), which the msfp " \
            "command line cannot give" in r.output, r.output
        assert not (tmp_path / "q").exists() and not (tmp_path / "report").exists()


def test_an_interrupted_finetune_says_how_to_continue(tmp_path, tiny_model_dir, monkeypatch):
    # It printed click's "Aborted!" only (msfp compare says where its results are kept and how to resume).
    import msfp.finetune

    q = tmp_path / "q"
    r = run("quantize", "--model", tiny_model_dir, "--out", q, "--calib-samples", 2, "--calib-steps", 2)
    assert r.exit_code == 0, r.output
    before = (q / "model.safetensors").read_bytes()
    for checkpointed in (False, True):
        def interrupted(qmodel, fp_model, scheduler, config, work_dir, **kwargs):
            if checkpointed:
                work_dir.mkdir(exist_ok=True)
                (work_dir / msfp.finetune.STATE_NAME).write_bytes(b"a checkpoint")
            raise KeyboardInterrupt

        monkeypatch.setattr(msfp.finetune, "finetune", interrupted)
        r = run("finetune", q, "--model", tiny_model_dir)
        assert r.exit_code == 1 and f"interrupted: {q} is unchanged; " in r.output, r.output
        assert ("--resume to continue" in r.output) == checkpointed, r.output
    assert (q / "model.safetensors").read_bytes() == before


def test_calibration_and_teacher_seeds_never_reach_evals_heldout_trajectories(tmp_path):
    # --seed 10000 calibrated (or distilled) on exactly the trajectories msfp eval --model measures as held out.
    missing = tmp_path / "no-model"
    for args, count in ((["quantize", "--model", missing, "--out", tmp_path / "a" / "q"], "--calib-samples"),
                        (["finetune", tmp_path / "a" / "q"], "--traj-samples")):
        for seed, n in ((9999, 2), (19999, 1)):
            r = run(*args, "--seed", seed, count, n)
            first = seed + 10000
            assert r.exit_code == 2 and f"--seed {seed} with {count} {n} draws trajectories from seeds {first}.." \
                f"{first + n - 1}, which overlap msfp eval's held-out trajectories (seeds 20000..29999)" in r.output
        # Below or beyond them: refused later, for the missing input (30000 worked before the check; it must still).
        for seed, n in ((9999, 1), (20000, 64), (30000, 64)):
            r = run(*args, "--seed", seed, count, n)
            assert r.exit_code == 1 and "held-out" not in r.output, r.output


def test_finetune_refuses_options_its_run_has_no_use_for(tmp_path):
    # They were ignored without a word (e.g. --rank 32 with --lora none trained no LoRA at all).
    missing = tmp_path / "q"
    for args, message in ((["--loss", "mse", "--dfa-weighting", "square"],
                           "--dfa-weighting set(s) how the DFA loss is weighted; --loss mse is not weighted"),
                          (["--lora", "none", "--num-loras", 2, "--rank", 8, "--lr", 0.1, "--router-lr", 0.1],
                           "--num-loras, --rank, --lr, --router-lr set(s) the LoRAs; --lora none trains none"),
                          (["--lora", "single", "--num-loras", 2, "--router-lr", 0.1],
                           "--num-loras, --router-lr set(s) TALoRA's LoRAs per layer and router; --lora single")):
        r = run("finetune", missing, *args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    # What those runs do use passes (and the missing directory is named next).
    for args in (["--loss", "mse", "--lora", "none", "--act-lr", 0.1], ["--lora", "single", "--rank", 8, "--lr", 0.1],
                 ["--dfa-weighting", "square", "--num-loras", 2, "--router-lr", 0.1]):
        r = run("finetune", missing, *args)
        assert r.exit_code == 1 and str(missing) in r.output, (args, r.output)


def test_refused_runs_leave_no_empty_folders_behind(tmp_path, tiny_model_dir, monkeypatch):
    # The lock beside --out made its parent folders before the preset or model was checked; they stayed, empty.
    monkeypatch.chdir(tmp_path)
    for args in (["quantize", "--model", tiny_model_dir, "--preset", "bogus", "--out", "typo/deep/q"],
                 ["quantize", "--model", "no-such-model", "--out", "typo2/q"],
                 ["compare", "--model", "no-such-model", "--out", "typo3/deep/r"]):
        r = run(*args)
        assert r.exit_code == 1, (args, r.output)
    assert os.listdir(tmp_path) == []
