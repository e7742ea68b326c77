"""The benchmark scripts that need no GPU, run end to end on the shipped default model with tiny settings."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_writes_table_and_paired_differences(tmp_path, capsys):
    ablation = load_script("ablation")
    out = tmp_path / "ablation"
    # The default model, because FD needs a reference: its shipped feature statistics (tiny models have none).
    ablation.main(["--model", "default", "--rows", "fp,w4a4-msfp,w4a4-msfp+lora-mse", "--num", "10",
                   "--steps", "2", "--calib-samples", "3", "--calib-steps", "2", "--heldout-samples", "2",
                   "--finetune-iters", "2", "--finetune-batch", "4", "--rank", "2", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    methods = printed["methods"]
    assert list(methods) == ["fp", "w4a4-msfp", "w4a4-msfp+lora-mse"]
    # The printed JSON keeps FD's bootstrap replicates, so another run's rows can be paired with these.
    assert all(len(methods[n]["fd_bootstrap"]) == 200 for n in ("w4a4-msfp", "w4a4-msfp+lora-mse"))
    (difference,) = printed["fd_differences"]
    fd = {n: methods[n]["metrics"]["fd"] for n in methods}
    assert difference["method"] == "w4a4-msfp+lora-mse" and difference["versus"] == "w4a4-msfp"
    assert difference["fd_difference"] == pytest.approx(fd["w4a4-msfp+lora-mse"] - fd["w4a4-msfp"])
    lo, hi = difference["interval"]
    assert lo <= hi
    table = (out / "results.md").read_text()
    assert "| w4a4-msfp+lora-mse | w4a4-msfp |" in table and f"{difference['fd_difference']:+.1f}" in table
    assert (out / "results.json").is_file() and (out / "index.html").is_file()
