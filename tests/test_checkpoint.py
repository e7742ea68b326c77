import copy
import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline

import msfp
from msfp import checkpoint
from msfp.cli import main
from tiny_models import scheduler, tiny_dit, tiny_plain, tiny_unet


def calibrated(build=tiny_unet, preset="w4a4-msfp", **kwargs):
    fp = build()
    q = msfp.quantize(copy.deepcopy(fp), preset)
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=2, disable=True, **kwargs)
    return q


def outputs(model, shape, **cond):
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(3, *shape), torch.tensor([5, 400, 999]), **cond)
    return getattr(out, "sample", out)


@pytest.mark.parametrize("build", [tiny_unet, tiny_dit])
def test_round_trip_is_exact_without_full_precision_weights(tmp_path, build):
    q = calibrated(build)
    msfp.save_quantized(q, tmp_path / "q")
    loaded = msfp.load_quantized(tmp_path / "q")
    shape = (q.config.in_channels, q.config.sample_size, q.config.sample_size)
    cond = {"class_labels": torch.tensor([0, 1, 2])} if build is tiny_dit else {}
    assert torch.equal(outputs(loaded, shape, **cond), outputs(q, shape, **cond))
    assert {n: layer.info for n, layer in msfp.surgery.quant_layers(loaded).items()} == \
        json.loads(json.dumps({n: layer.info for n, layer in msfp.surgery.quant_layers(q).items()}))


def test_plain_module_needs_an_instance(tmp_path):
    q = calibrated(tiny_plain, sample_shape=(1, 8, 8))
    msfp.save_quantized(q, tmp_path / "q")
    with pytest.raises(ValueError, match="plain PyTorch module .*PlainDenoiser.*load_quantized\\(dir, model="):
        msfp.load_quantized(tmp_path / "q")
    loaded = msfp.load_quantized(tmp_path / "q", model=tiny_plain())
    assert torch.equal(outputs(loaded, (1, 8, 8)), outputs(q, (1, 8, 8)))


def test_bad_directories_fail_clearly(tmp_path):
    q = calibrated()
    with pytest.raises(ValueError, match="is not a msfp output directory: msfp_quant.json is missing"):
        msfp.load_quantized(tmp_path)
    with pytest.raises(ValueError, match="never calibrated"):
        msfp.save_quantized(msfp.quantize(tiny_unet(), "w4a4-msfp"), tmp_path / "x")
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(FileExistsError, match="not a msfp output directory; refusing"):
        msfp.save_quantized(q, tmp_path / "pipe")

    out = msfp.save_quantized(q, tmp_path / "q")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read the weights.*truncated"):
        msfp.load_quantized(out)

    out = msfp.save_quantized(q, tmp_path / "q")
    meta = json.loads((out / "msfp_quant.json").read_text())
    meta["format_version"] = 99
    (out / "msfp_quant.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99"):
        msfp.load_quantized(out)

    out = msfp.save_quantized(q, tmp_path / "q")
    meta = json.loads((out / "msfp_quant.json").read_text())
    meta["base_model"]["config"]["block_out_channels"] = [8, 32]
    (out / "msfp_quant.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match UNet2DModel: .*shape"):
        msfp.load_quantized(out)


def test_failed_save_leaves_the_earlier_result_intact(tmp_path, monkeypatch):
    q = calibrated()
    out = msfp.save_quantized(q, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        msfp.save_quantized(q, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary directory left behind


def test_cli_quantize_and_info(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "model")
    runner = CliRunner()
    result = runner.invoke(main, ["quantize", "--model", str(tmp_path / "model"), "--preset", "w4a4-msfp",
                                  "--out", str(tmp_path / "q"), "--calib-samples", "4", "--calib-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "down_blocks.0.resnets.0.conv1" in result.output and "yes (structural)" in result.output
    info = runner.invoke(main, ["info", str(tmp_path / "q")])
    assert info.exit_code == 0, info.output
    assert "weights at 4 bits:" in info.output and "FLOPs at 4 bits:" in info.output
    assert "ufp4_" in info.output
    bad = runner.invoke(main, ["info", str(tmp_path / "model")])
    assert bad.exit_code == 1 and "Error: " in bad.output and "not a msfp output directory" in bad.output
    bad = runner.invoke(main, ["quantize", "--preset", "w2a2", "--out", str(tmp_path / "z")])
    assert bad.exit_code == 1 and "unknown preset 'w2a2'" in bad.output
