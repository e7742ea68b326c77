"""The scripts that train and evaluate the shipped assets, run end to end with tiny settings on 256 real images."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from idx_files import write_fashion_mnist
from PIL import Image

from msfp.feature_net import load_feature_net, load_reference_stats
from msfp.models import load_model

SCRIPTS = Path(__file__).parent.parent / "scripts"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "fashion-mnist").mkdir()
    return write_fashion_mnist(tmp_path / "fashion-mnist")


@pytest.fixture
def train_default_model(tmp_path, data_dir):
    script = load_script("train_default_model")

    def run(*extra):
        return script.main(["--data", str(data_dir), "--out", str(tmp_path / "model"),
                            "--work-dir", str(tmp_path / "work"), "--batch", "4", "--warmup", "1",
                            "--threads", "1", *extra])
    return run


def test_train_default_model_writes_a_loadable_pipeline_and_replaces_the_folder(tmp_path, train_default_model,
                                                                               capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("not a model")
    # A folder that is not a pipeline is not replaced (--out src/msfp/assets deleted the feature network).
    with pytest.raises(SystemExit):
        train_default_model("--steps", "3")
    assert "is not a pipeline directory" in capsys.readouterr().err and (tmp_path / "model" / "notes.txt").is_file()
    (tmp_path / "model" / "notes.txt").unlink()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    (tmp_path / "model" / "MODEL_CARD.md").write_text("another model's card")
    train_default_model("--steps", "3", "--ckpt-every", "2")
    log = json.loads(capsys.readouterr().out)
    assert log["steps"] == 3 and log["machine"]["versions"]["msfp_code"]
    assert log["command"].startswith("python scripts/train_default_model.py --data ")
    assert json.loads((tmp_path / "model" / "train_log.json").read_text()) == log
    # The whole folder is the run's: nothing of the model it replaced is kept.
    assert not (tmp_path / "model" / "MODEL_CARD.md").exists()
    unet, scheduler = load_model(str(tmp_path / "model"))
    assert sum(p.numel() for p in unet.parameters()) == log["parameters"] == 3_939_393  # the shipped architecture
    assert torch.isfinite(unet(torch.zeros(1, 1, 32, 32), 10).sample).all()


def test_train_default_model_resumes_only_the_same_recipe(tmp_path, train_default_model, capsys):
    train_default_model("--steps", "2")
    first = load_model(str(tmp_path / "model"))[0].state_dict()
    capsys.readouterr()
    train_default_model("--steps", "2")  # the checkpoint is at the last step: nothing left to train
    assert "resumed from" in capsys.readouterr().err
    again = load_model(str(tmp_path / "model"))[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(SystemExit):
        train_default_model("--steps", "2", "--lr", "5e-4")
    assert "other settings (--lr 0.001 → 0.0005)" in capsys.readouterr().err
    train_default_model("--steps", "2", "--lr", "5e-4", "--no-resume")
    assert "resumed" not in capsys.readouterr().err


def test_train_default_model_resumes_only_on_the_device_that_wrote_the_checkpoint(tmp_path, train_default_model,
                                                                                capsys):
    train_default_model("--steps", "2", "--max-minutes", "0")  # stopped at step 0: a checkpoint, no export
    ckpt_path = tmp_path / "work" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["device"] == "cpu"
    # As a CUDA run writes it: its generator state is 16 bytes, which the CPU generator's set_state refused opaquely.
    torch.save(dict(ckpt, device="cuda", gen=torch.zeros(16, dtype=torch.uint8)), ckpt_path)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_default_model("--steps", "2")
    assert f"{ckpt_path} was written on cuda, this run is on cpu: " in capsys.readouterr().err
    # A checkpoint from before the device was recorded still resumes.
    torch.save({k: v for k, v in ckpt.items() if k != "device"}, ckpt_path)
    train_default_model("--steps", "2")
    assert "resumed from" in capsys.readouterr().err


def test_train_default_model_continues_an_interrupted_run_exactly(tmp_path, train_default_model, capsys, monkeypatch):
    train_default_model("--steps", "4", "--ckpt-every", "2", "--no-resume")
    uninterrupted = load_model(str(tmp_path / "model"))[0].state_dict()
    # A time budget stops the run without exporting a half-trained model (it used to, and the same command then
    # stopped at once again: the budget counted every earlier run).
    train_default_model("--steps", "4", "--ckpt-every", "2", "--no-resume", "--max-minutes", "0")
    assert "time budget of 0.0 min reached at step 0/4" in capsys.readouterr().err
    assert all(torch.equal(uninterrupted[k], v) for k, v in load_model(str(tmp_path / "model"))[0].state_dict().items())
    # Interrupted after step 2's checkpoint (a crash in step 3), then the same command: the same weights.
    from diffusers.training_utils import EMAModel

    real_step, steps = EMAModel.step, []

    def crash_in_step_3(self, parameters):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_step(self, parameters)

    with monkeypatch.context() as m:
        m.setattr(EMAModel, "step", crash_in_step_3)
        with pytest.raises(KeyboardInterrupt):
            train_default_model("--steps", "4", "--ckpt-every", "2", "--no-resume")
    train_default_model("--steps", "4", "--ckpt-every", "2")
    assert "resumed from" in capsys.readouterr().err
    resumed = load_model(str(tmp_path / "model"))[0].state_dict()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    with pytest.raises(SystemExit):
        train_default_model("--steps", "4", "--work-dir", str(tmp_path / "model" / "work"))
    assert "is inside --out" in capsys.readouterr().err


def test_train_default_model_checks_options_first(capsys):
    for args, message in ((["--batch", "0"], "--batch must be >= 1, got 0"),
                          (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
                          # these trained nothing (or NaN weights) for the whole run
                          (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
                          (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
                          (["--max-minutes", "-1"], "--max-minutes must be >= 0, got -1.0"),
                          (["--max-minutes", "nan"], "--max-minutes must be >= 0, got nan"),  # was: no budget
                          (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0")):
        with pytest.raises(SystemExit):
            load_script("train_default_model").main(args)
        assert message in capsys.readouterr().err


def test_train_feature_net_writes_net_and_statistics_together(tmp_path, data_dir, capsys):
    out = tmp_path / "feature_net"
    out.mkdir()
    (out / "MODEL_CARD.md").write_text("card")
    load_script("train_feature_net").main(["--data", str(data_dir), "--out", str(out), "--epochs", "1",
                                           "--batch", "64", "--feature-dim", "16"])
    summary = json.loads(capsys.readouterr().out)
    assert (out / "MODEL_CARD.md").read_text() == "card"  # the card is kept
    net = load_feature_net(out)
    assert net.config["feature_dim"] == 16
    assert json.loads((out / "train_log.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    mu, sigma = load_reference_stats("test", out)
    assert mu.shape == (16,) and sigma.shape == (16, 16) and np.allclose(sigma, sigma.T)
    # Both splits are the same 256 images here, so the training statistics equal the test ones: FD 0.
    assert summary["fd_train10k_vs_test"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("option", ["--epochs", "--batch", "--feature-dim", "--threads"])
def test_train_feature_net_checks_options_first(capsys, option):
    with pytest.raises(SystemExit):
        load_script("train_feature_net").main([option, "0"])
    assert f"{option} must be >= 1, got 0" in capsys.readouterr().err


def test_train_feature_net_checks_its_learning_rate_first(capsys):
    with pytest.raises(SystemExit):
        load_script("train_feature_net").main(["--lr", "-0.1"])
    assert "--lr must be a finite number > 0, got -0.1" in capsys.readouterr().err


def test_evaluate_default_model_scores_samples_and_the_real_data_floor(tmp_path, data_dir, capsys):
    out, grid = tmp_path / "eval" / "eval.json", tmp_path / "eval" / "grid.png"
    load_script("evaluate_default_model").main([
        "--data", str(data_dir), "--num-samples", "8", "--steps", "2", "--batch", "8", "--kid-subsets", "2",
        "--kid-subset-size", "4", "--splits", "2", "--out", str(out), "--grid", str(grid), "--grid-count", "4"])
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert result["machine"]["versions"]["msfp_code"] and result["command"].startswith("python scripts/")
    # FD against --data's 256 test images, as KID: it was against the shipped statistics of 10,000, named so.
    assert result["reference"] == f"{data_dir} test split (256 images)"
    for side in ("samples", "real_train_floor"):
        assert sum(result[side]["predicted_classes"].values()) == 8
        assert result[side]["fd"] > 0 and result[side]["classifier_score"] >= 1
    # Eight real images are far closer to the real test images than eight 2-step samples are.
    assert result["real_train_floor"]["fd"] < result["samples"]["fd"]
    assert Image.open(grid).size == (8 * 34 + 2, 34 + 2)  # one row of 4 of the 8 columns, 2-pixel padding


def test_evaluate_default_model_refuses_more_samples_than_real_training_images(tmp_path, data_dir, capsys):
    script = load_script("evaluate_default_model")
    script.load_model = lambda spec: pytest.fail("the model was loaded: the check came after the work")
    # The floor was measured on all 256 real images while the result said num_samples 300.
    with pytest.raises(SystemExit):
        script.main(["--data", str(data_dir), "--num-samples", "300", "--out", str(tmp_path / "e.json")])
    assert (f"--num-samples 300 is more than the 256 training images in {data_dir}, which give the real-data floor at "
            "the same N") in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "4", "--splits", "5"], "--splits must be between 1 and --num-samples (4), got 5"),
    (["--num-samples", "1", "--splits", "1"], "--num-samples must be >= 2, got 1"),  # FD's covariance
    (["--kid-subsets", "0"], "--kid-subsets must be >= 1, got 0"),
    (["--kid-subset-size", "1"], "--kid-subset-size must be >= 2, got 1"),
    (["--grid-count", "0"], "--grid-count must be >= 1, got 0"),
    (["--grid-steps", "-1"], "--grid-steps must be >= 1, got -1"),
])
def test_evaluate_default_model_checks_options_before_sampling(capsys, args, message):
    # No data or model is needed: each of these failed only once the samples were drawn, hours in.
    with pytest.raises(SystemExit):
        load_script("evaluate_default_model").main(args)
    assert message in capsys.readouterr().err
