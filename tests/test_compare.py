import copy
import json
import os
import re
import shlex
import shutil
import sys

import diffusers
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import msfp.calibration
import msfp.compare
from msfp.cli import main
from msfp.compare import (METHODS, Built, CompareSettings, build_finetuned, build_ptq, parse_methods,
                          register_method, run_compare)
from msfp.finetune import FinetuneDivergedError

TINY = ["--num", 10, "--steps", 2, "--calib-samples", 3, "--calib-steps", 2, "--heldout-samples", 2, "--batch", 8]
TINY_UNCALIBRATED = ["--num", 10, "--steps", 2, "--calib-steps", 2, "--heldout-samples", 2, "--batch", 8]  # fp, torchao


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def compare(tmp_path, name, model_dir, methods="fp,w4a4-int,w4a4-msfp"):
    tiny = TINY_UNCALIBRATED if methods == "fp" else TINY
    r = run("compare", "--model", model_dir, "--methods", methods, "--out", tmp_path / name, *tiny)
    assert r.exit_code == 0, r.output
    return r, json.loads((tmp_path / name / "results.json").read_text())


def without_timings(result):
    out = {}
    for name, r in result["methods"].items():
        calibration = {k: v for k, v in (r["calibration"] or {}).items() if not k.endswith("seconds") and k != "cached"}
        out[name] = dict(r, sample_seconds=None, calibration=calibration)
    return out


def test_compare_writes_results_and_self_contained_report(tmp_path, tiny_model_dir):
    r, result = compare(tmp_path, "a", tiny_model_dir)
    assert f"report: {tmp_path / 'a' / 'index.html'}" in r.output
    assert re.search(r"^w4a4-msfp\s", r.output, re.M) and "PSNR vs fp" in r.output
    assert list(result["methods"]) == ["fp", "w4a4-int", "w4a4-msfp"]
    assert result["settings"]["num_samples"] == 10 and result["seeds"]["samples"] == "0..9"
    assert result["machine"]["versions"]["msfp"] and result["wall_seconds"] > 0
    # What the rows depend on; torchao's (its baselines' rows) was missing, so upgrading it mid-run went unnoticed.
    assert result["machine"]["versions"].keys() >= {"torch", "diffusers", "triton", "torchao", "msfp_code"}
    fp, msfp = result["methods"]["fp"], result["methods"]["w4a4-msfp"]
    assert fp["eps_mse_per_timestep"] is None and fp["calibration"] is None and fp["layers"] is None
    # The tiny model's 8x8 images do not fit the feature net: those metrics are skipped with a reason, not faked.
    assert "feature network takes 32x32x1" in " ".join(msfp["skipped_metrics"].values())
    # The printed table says why its blanks are blank, once per reason (it used to list skipped methods only).
    assert re.search(r"^not computed: fd, kid, classifier_score, precision, recall \(all methods\): .*32x32x1",
                     r.output, re.M)
    assert "psnr, paired_mse (fp): the reference the other methods are paired with" in r.output
    # It used to point at an --inception-weights option that compare does not have.
    assert ("fid, sfid, inception_score, inception_precision, inception_recall (all methods): msfp compare computes "
            "none; `msfp eval OUT/samples/METHOD.npz --inception-weights FILE`, with compare's --ref/--ref-images, "
            "adds them") in r.output
    assert msfp["metrics"]["psnr"] > 0 and msfp["eps_mse_mean"] > 0 and msfp["eps_mse_weighted"] > 0
    assert fp["fd_bootstrap"] is None  # no FD on 8x8 images, so nothing to resample
    assert len(msfp["eps_mse_per_timestep"]) == 2 and msfp["calibration"]["points"] == 6
    assert 0 < msfp["low_bit"]["weights_4bit"] <= 1 and msfp["layers"][0].keys() >= {"name", "weight", "act", "aal"}
    assert msfp["aals"] and all(a["reason"] for a in msfp["aals"])
    assert any(row["act"].startswith("u") for row in msfp["layers"])  # mixup-sign picked unsigned somewhere
    assert (tmp_path / "a" / msfp["grid"]).is_file() and (tmp_path / "a" / msfp["samples"]).is_file()

    html = (tmp_path / "a" / "index.html").read_text()
    # Self-contained: nothing is loaded from elsewhere (images are data: URIs, the plot is inline SVG).
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", html), "external resource in the report"
    assert "<link" not in html and "<script" not in html and "@import" not in html and "url(" not in html
    assert html.count('src="data:image/png;base64,') == 3 and "<svg" in html and "<polyline" in html
    for text in ("w4a4-msfp", "Per-layer formats", "AALs", result["machine"]["cpu"]):
        assert text in html


def test_same_seed_same_numbers(tmp_path, tiny_model_dir):
    _, a = compare(tmp_path, "a", tiny_model_dir, "fp,w4a4-fp")
    _, b = compare(tmp_path, "b", tiny_model_dir, "fp,w4a4-fp")
    assert without_timings(a) == without_timings(b)


def test_bad_method_lists_valid_ones(tmp_path):
    r = run("compare", "--methods", "fp,w4a4-msfq", "--out", tmp_path / "x")
    assert r.exit_code == 1
    assert "unknown method(s) 'w4a4-msfq'; valid methods: fp, w4a4-msfp" in r.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="listed twice: w4a4-fp"):
        parse_methods("w4a4-fp,w4a4-fp")
    assert parse_methods("w4a4-int") == ["fp", "w4a4-int"]  # the reference is always drawn
    assert parse_methods("W4A4-MSFP+TALoRA") == ["fp", "w4a4-msfp+talora"]  # case ignored, as for --preset
    register_method("My-W4A4", lambda ctx: build_ptq(ctx, "w4a4-int"), "a registered name with capitals")
    try:  # (lower-cased, it was refused as unknown while listed among the valid methods)
        assert parse_methods(" my-w4a4") == parse_methods("My-W4A4") == ["fp", "My-W4A4"]
        with pytest.raises(ValueError, match="listed twice: My-W4A4"):
            parse_methods("My-W4A4,MY-w4a4")
    finally:
        METHODS.pop("My-W4A4")
    r = run("compare", "--methods", "", "--out", tmp_path / "x")  # ran the reference alone
    assert r.exit_code == 1 and "no method names in ''" in r.output and not (tmp_path / "x").exists()
    # The Python API checked nothing: a KeyError after the reference's sampling, leaving a run to resume.
    with pytest.raises(ValueError, match="unknown method\\(s\\) 'nonexistent'; valid methods: fp, "):
        run_compare(CompareSettings(), ["fp", "nonexistent"], tmp_path / "x")
    with pytest.raises(ValueError, match="expected a non-empty list of method names, got 'fp,w4a4-int' "
                                         "\\(parse_methods\\('a,b'\\) makes one\\)"):
        run_compare(CompareSettings(), "fp,w4a4-int", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.compare").exists()


def test_a_directory_that_is_not_a_report_is_never_replaced(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for out in (".", tmp_path):
        r = run("compare", "--out", out, *TINY)
        assert r.exit_code == 1 and f"{tmp_path} exists and is not a msfp compare report" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_results_json_that_compare_did_not_write_does_not_make_a_report(tmp_path):
    # `msfp eval --json` writes a results.json too: that was enough for compare to replace the directory, and with
    # it the user's own samples.
    out = tmp_path / "mine"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "my_50k_run.npz").write_bytes(b"hours of sampling")
    (out / "results.json").write_text(json.dumps({"metrics": {"fd": 3.0}}))
    r = run("compare", "--out", out, *TINY)
    assert r.exit_code == 1 and f"{out} exists and is not a msfp compare report" in r.output, r.output
    assert (out / "samples" / "my_50k_run.npz").read_bytes() == b"hours of sampling"


def test_bad_settings_fail_before_any_work(tmp_path):
    r = run("compare", "--methods", "w4a4-msfp+talora", "--finetune-batch", "0", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "Invalid value for '--finetune-batch': 0 is not in the range x>=1" in r.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="CompareSettings.num_samples must be a whole number ≥ 1, got -1"):
        CompareSettings(num_samples=-1)
    # Settings from Python or JSON: 2.5 images passed, and "10" was a TypeError from the comparison.
    for field, value in (("num_samples", 2.5), ("steps", "10"), ("finetune_batch", True), ("seed", 1.5)):
        with pytest.raises(ValueError, match=rf"CompareSettings.{field} must be a whole number.*got {value!r}"):
            CompareSettings(**{field: value})
    assert type(CompareSettings(num_samples=np.int64(3)).num_samples) is int  # recorded in progress.json
    assert CompareSettings(seed=-5).seed == -5  # any seed is fine
    # Image 10000 would start from calibration trajectory 0's noise.
    assert CompareSettings(num_samples=10_000, calib_samples=10_000).num_samples == 10_000
    for name in ("num_samples", "calib_samples"):
        with pytest.raises(ValueError, match=rf"CompareSettings.{name} must be <= 10000, got 10001: .* seeds 10000 "
                                             "apart"):
            CompareSettings(**{name: 10_001})
    r = run("compare", "--num", 10_001, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "'--num' / '-n': 10001 is not in the range 1<=x<=10000" in r.output
    assert not (tmp_path / "x").exists()
    # Fine-tuning settings without a fine-tuned method were recorded and ignored (and then blocked a --resume).
    r = run("compare", "--model", tmp_path / "no-model", "--methods", "w4a4-msfp,w6a6-msfp", "--rank", 8,
            "--finetune-iters", 10, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--finetune-iters, --rank set(s) how methods are fine-tuned; none of --methods is " \
        "fine-tuned" in r.output, r.output
    # A resume repeats the interrupted run's settings, whose method list may have held a fine-tuned method.
    r = run("compare", "--model", tmp_path / "no-model", "--methods", "w4a4-msfp", "--rank", 8, "--resume",
            "--out", tmp_path / "x")
    assert r.exit_code == 1 and "fine-tuned" not in r.output, r.output
    r = run("compare", "--model", tmp_path / "no-model", "--methods", "w4a4-msfp+lora-mse", "--rank", 8,
            "--out", tmp_path / "x")
    assert r.exit_code == 1 and "no-model" in r.output, r.output  # a fine-tuned method uses it: the model is next
    # --num-loras with single-LoRA methods only, --calib-samples with methods that calibrate nothing: also ignored.
    r = run("compare", "--model", tmp_path / "no-model", "--methods", "int4-efficientdm", "--num-loras", 9,
            "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--num-loras sets TALoRA's LoRAs per layer; none of --methods uses TALoRA" in r.output
    r = run("compare", "--model", tmp_path / "no-model", "--methods", "torchao-mxfp4", "--calib-samples", 500,
            "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--calib-samples sets the calibration trajectories; none of --methods calibrates" \
        in r.output, r.output
    for methods, option in (("w4a4-msfp+talora", ["--num-loras", 2]), ("torchao-mxfp4,w4a4-fp", ["--calib-samples", 8]),
                            ("torchao-mxfp4", ["--calib-steps", 8])):  # (the held-out trajectories' steps too)
        r = run("compare", "--model", tmp_path / "no-model", "--methods", methods, *option, "--out", tmp_path / "x")
        assert r.exit_code == 1 and "no-model" in r.output, r.output
    # --data-dir locates the default reference only; it was ignored without a word (msfp eval refuses it).
    np.savez(tmp_path / "ref.npz", mu=np.zeros(128), sigma=np.eye(128))
    for ref in (["--ref", tmp_path / "ref.npz"], ["--ref-images", tmp_path]):
        r = run("compare", "--model", tmp_path / "no-model", *ref, "--data-dir", tmp_path, "--out", tmp_path / "x")
        assert r.exit_code == 2 and "--data-dir locates the default reference; it has no use with --ref" in r.output
        assert not (tmp_path / "x").exists()


def test_a_reference_that_does_not_fit_the_samples_fails_before_any_sampling(tmp_path):
    # Fashion-MNIST's own 28x28 images, or Inception statistics: refused only after the held-out trajectories and the
    # full-precision samples (minutes or hours at real settings).
    from msfp.evaluation import Reference

    ref_28 = Reference("ref28", images=np.zeros((8, 28, 28, 1), np.uint8))
    inception = Reference("inception.npz", stats=(np.zeros(2048), np.eye(2048)))
    for reference, message in ((ref_28, r"reference images \(ref28\) are \(28, 28, 1\) but samples are \(32, 32, 1\)"),
                               (inception, r"statistics \(inception.npz\) are 2048-dimensional, the feature network's "
                                           r"features 128-dimensional")):
        with pytest.raises(ValueError, match=message):
            run_compare(CompareSettings(num_samples=4, steps=2), ["fp"], tmp_path / "r", reference=reference,
                        disable=True)
        assert not (tmp_path / ".r.compare").exists() and not (tmp_path / "r").exists()


def test_list_methods_prints_the_registry():
    from msfp.compare import DEFAULT_METHODS

    r = run("compare", "--list-methods")  # --out is not needed: the flag exits first
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.output.splitlines()}
    assert list(lines) == list(METHODS)
    for name, method in METHODS.items():
        assert method.description in lines[name]
        assert ("[default]" in lines[name]) == (name in DEFAULT_METHODS)


def test_registered_method_and_unavailable_method(tmp_path, tiny_model_dir, monkeypatch):
    def finetuned(ctx):
        built = build_ptq(ctx, "w4a4-msfp")
        built.notes.append("fine-tuned for 0 steps")
        return built

    def diverged(ctx):
        model = copy.deepcopy(ctx.fp_model)
        model.conv_out.bias.data[0] = float("nan")
        return Built(model)

    def fine_tuning_diverges(ctx):
        def diverging(*args, **kwargs):
            raise FinetuneDivergedError("fine-tuning loss became nan at iteration 3", "no checkpoint was written")

        monkeypatch.setattr(msfp.compare, "finetune", diverging)
        return build_finetuned(ctx, "w4a4-int", "single", "mse")

    def eps_diverges_off_the_sampling_trajectory(ctx):
        # Finite images, but NaN noise predictions at the held-out timesteps the 2-step sampler never visits.
        model, sampler = copy.deepcopy(ctx.fp_model), copy.deepcopy(ctx.scheduler)
        sampler.set_timesteps(ctx.settings.steps)
        off = {}

        def timestep(module, args, kwargs):
            t = torch.as_tensor(kwargs["timestep"] if "timestep" in kwargs else args[1]).reshape(-1)
            off["rows"] = ~torch.isin(t, sampler.timesteps)

        model.register_forward_pre_hook(timestep, with_kwargs=True)
        model.conv_out.register_forward_hook(
            lambda module, args, out: out.masked_fill(off["rows"].expand(len(out))[:, None, None, None], float("nan")))
        return Built(model)

    register_method("test-ft", finetuned, "a registered variant")
    register_method("test-missing", finetuned, "never runs", unavailable=lambda: "needs a library that is absent")
    register_method("test-nan", diverged, "draws NaN images")
    register_method("test-ft-nan", fine_tuning_diverges, "fine-tuning diverges")
    register_method("test-eps-nan", eps_diverges_off_the_sampling_trajectory, "NaN noise predictions off trajectory")
    # Its calibration has none of the keys of the report's note on the shared cache: the report used to fail on
    # them after every method had run, and on every --resume.
    register_method("test-timed", lambda ctx: Built(copy.deepcopy(ctx.fp_model), calibration=dict(seconds=0.5)),
                    "times its own calibration")
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_method("test-ft", finetuned, "twice")
        # "../../outside" wrote beside OUT; "con" and "NUL.x" are devices on Windows, which also drops a trailing '.'.
        for bad in ("../../outside", "a/b", "a\\b", "D:x", ".hidden", "a,b", " ", "", "a b", "x?", "con", "NUL.x",
                    "Com1", "lpt9.npz", "fp."):
            with pytest.raises(ValueError, match=r"method names must start with .* got"):
                register_method(bad, finetuned, "a name that is no file name")
        with pytest.raises(ValueError, match="'FP' differs from 'fp' only in case"):
            register_method("FP", finetuned, "would write over fp's samples on macOS and Windows")
        settings = CompareSettings(model=str(tiny_model_dir), num_samples=4, steps=2, calib_samples=2, calib_steps=3,
                                   heldout_samples=1, batch_size=4)
        result = run_compare(settings, parse_methods("test-timed,test-ft,test-nan,test-missing,test-ft-nan,"
                                                     "test-eps-nan"), tmp_path / "r", disable=True)
    finally:
        for name in ("test-ft", "test-missing", "test-nan", "test-timed", "test-ft-nan", "test-eps-nan"):
            METHODS.pop(name)
    assert list(result["methods"]) == ["fp", "test-timed", "test-ft", "test-eps-nan"]
    assert result["methods"]["test-ft"]["notes"] == ["fine-tuned for 0 steps"]
    assert result["skipped_methods"]["test-missing"] == "needs a library that is absent"
    # A method whose images diverge is reported without a result; the other methods keep theirs.
    # Its reason names OUT's sample file, not one in the work directory that is gone at the end.
    assert re.fullmatch(rf"no result: 4 of 4 images have NaN or inf pixels \(seed 0 among them\).*; "
                        rf"{re.escape(str(tmp_path / 'r' / 'samples' / 'test-nan.npz'))} was not written\)",
                        result["skipped_methods"]["test-nan"])
    assert not (tmp_path / "r" / "samples" / "test-nan.npz").exists()
    # Fine-tuning that diverges likewise (it ended the whole run, and --resume met it again).
    # Advice compare's options can follow: it has no learning rates and writes no fine-tuning checkpoint.
    assert result["skipped_methods"]["test-ft-nan"] == (
        "no result: fine-tuning loss became nan at iteration 3; compare fine-tunes at msfp finetune's default "
        "learning rates: try `msfp finetune` with a lower --lr or --act-lr, or fewer --finetune-iters")
    # A non-finite noise prediction error has no mean: JSON held null for it, which reads as "not applicable".
    eps_nan = json.loads((tmp_path / "r" / "results.json").read_text())["methods"]["test-eps-nan"]
    assert eps_nan["eps_mse_mean"] is eps_nan["eps_mse_weighted"] is None
    assert eps_nan["metrics"]["paired_mse"] == 0  # its images are fp's own
    assert re.fullmatch(r"the noise prediction error is not finite at t = 666, 333: the model diverged there .*",
                        eps_nan["skipped_metrics"]["eps_mse_mean, eps_mse_weighted"])
    html = (tmp_path / "r" / "index.html").read_text()
    assert "needs a library that is absent" in html and "4 of 4 images have NaN" in html
    assert "Calibration: 6 trajectory points" in html  # test-ft's


def test_a_resumed_run_publishes_only_the_samples_of_the_methods_it_lists(tmp_path, tiny_model_dir, monkeypatch):
    import msfp.fileio

    register_method("test-broken", lambda ctx: 1 / 0, "always fails")
    finish = msfp.fileio._finish_tree

    def disk_full(tmp):  # the first publishing attempt fails
        monkeypatch.setattr(msfp.fileio, "_finish_tree", finish)
        raise OSError(28, "No space left on device")

    try:
        args = ["compare", "--model", tiny_model_dir, "--out", tmp_path / "r", *TINY]
        r = run(*args, "--methods", "w4a4-int,w4a4-fp,test-broken")
        assert isinstance(r.exception, ZeroDivisionError)
        monkeypatch.setattr(msfp.fileio, "_finish_tree", disk_full)
        r = run(*args, "--methods", "w4a4-fp", "--resume")
        assert r.exit_code == 1 and "No space left on device" in r.output
        # A first fix deleted w4a4-int's samples from the work directory there, so listing it again failed.
        r = run(*args, "--methods", "w4a4-int", "--resume")
        assert r.exit_code == 0, r.output
        # w4a4-fp's samples, finished by the interrupted run, used to be published too, listed nowhere.
        assert sorted(p.name for p in (tmp_path / "r" / "samples").iterdir()) == [
            "fp.npz", "fp.png", "w4a4-int.npz", "w4a4-int.png"]
    finally:
        METHODS.pop("test-broken")


def test_torchao_rows_are_skipped_with_a_reason_when_it_cannot_run(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("msfp.torchao_baselines.importlib.util.find_spec", lambda name: None)
    r = run("compare", "--model", tiny_model_dir, "--methods", "torchao-mxfp4", "--out", tmp_path / "t",
            *TINY_UNCALIBRATED)
    assert r.exit_code == 0, r.output
    assert "skipped torchao-mxfp4: torchao is not installed" in r.output
    result = json.loads((tmp_path / "t" / "results.json").read_text())
    assert list(result["methods"]) == ["fp"] and "torchao-mxfp4" in result["skipped_methods"]


def test_finetuned_methods_run_and_are_reproducible(tmp_path, tiny_model_dir, monkeypatch):
    methods = "fp,w4a4-msfp+talora,int4-efficientdm,w4a4-msfp+talora-tscales"
    extra = ["--finetune-iters", 3, "--finetune-batch", 4, "--rank", 2]
    seeds = []

    def counted(collect):
        def collect_and_count(*args, **kwargs):
            seeds.append(kwargs["seed"] if "seed" in kwargs else args[4])
            return collect(*args, **kwargs)
        return collect_and_count

    with monkeypatch.context() as m:
        for module in (msfp.compare, msfp.calibration):
            m.setattr(module, "collect_trajectories", counted(module.collect_trajectories))
        r = run("compare", "--model", tiny_model_dir, "--methods", methods, "--out", tmp_path / "a", *TINY, *extra)
    assert r.exit_code == 0, r.output
    # The teacher is the calibration's trajectories, read from the shared cache (it sampled them a second time).
    assert sorted(seeds) == [msfp.compare.CALIB_SEED_OFFSET, msfp.compare.HELDOUT_SEED_OFFSET]
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    talora = result["methods"]["w4a4-msfp+talora"]
    assert talora["calibration"]["finetune_seconds"] > 0 and "lora=talora (K=4)" in talora["notes"][0]
    for name in ("int4-efficientdm", "w4a4-msfp+talora-tscales"):
        assert "per-timestep activation scales" in result["methods"][name]["notes"][0]
    assert "per-timestep" not in talora["notes"][0]
    r = run("compare", "--model", tiny_model_dir, "--methods", methods, "--out", tmp_path / "b", *TINY, *extra)
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert without_timings(again) == without_timings(result)


def test_flop_count_includes_attention_matmuls():
    import copy
    from types import SimpleNamespace

    from diffusers.models.attention_processor import Attention
    from torch.utils.flop_counter import FlopCounterMode

    import msfp
    from msfp.calibration import collect_trajectories
    from msfp.compare import _flops_by_layer
    from tiny_models import scheduler, tiny_unet

    fp = tiny_unet()
    points = collect_trajectories(fp, scheduler(), num_samples=1, num_steps=1, disable=True)
    _, total = _flops_by_layer(fp, SimpleNamespace(heldout=points))
    # By hand: torch's counter (it misses the CPU's fused attention) plus QKᵀ and P·V, 2·B·L²·inner FLOPs each.
    queries = []
    hooks = [module.to_q.register_forward_hook(lambda mod, args, out: queries.append(out.shape))
             for module in fp.modules() if isinstance(module, Attention)]
    x, t, _ = next(points.batches(1))
    with FlopCounterMode(display=False) as torch_counter:
        fp(x, t)
    for hook in hooks:
        hook.remove()
    assert len(queries) == 4
    assert total == torch_counter.get_total_flops() + sum(4 * b * length**2 * inner for b, length, inner in queries)
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=1, num_steps=1, disable=True)
    # Calibration counts with explicit attention; the per-layer count of the torchao rows must agree with it.
    assert total == q.msfp_flops["total"]


def test_a_failed_final_swap_keeps_every_sample_for_resume(tmp_path, tiny_model_dir, monkeypatch):
    import msfp.fileio

    finish = msfp.fileio._finish_tree

    def disk_full(tmp):  # e.g. Ctrl-C or ENOSPC while the new report is fsynced, before it replaces the old one
        monkeypatch.setattr(msfp.fileio, "_finish_tree", finish)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(msfp.fileio, "_finish_tree", disk_full)
    args = ["compare", "--model", tiny_model_dir, "--methods", "fp", "--out", tmp_path / "r", *TINY_UNCALIBRATED]
    r = run(*args)
    assert r.exit_code == 1 and "No space left on device" in r.output and not (tmp_path / "r").exists()
    assert "every method finished, and is kept in " in r.output and "--resume to publish the report" in r.output
    # The samples used to be moved into the discarded temporary directory: --resume then found no fp.png.
    assert (tmp_path / ".r.compare" / "samples" / "fp.npz").is_file()
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "samples" / "fp.npz").is_file() and (tmp_path / "r" / "samples" / "fp.png").is_file()
    assert not (tmp_path / ".r.compare").exists()


def test_resume_refuses_a_changed_noise_schedule(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = ["compare", "--model", model, "--methods", "fp,test-broken", "--out", tmp_path / "r", *TINY]
    register_method("test-broken", lambda ctx: 1 / 0, "always fails")
    try:
        assert isinstance(run(*args).exception, ZeroDivisionError)
        config = json.loads((model / "scheduler_config.json").read_text())
        (model / "scheduler_config.json").write_text(json.dumps(dict(config, beta_end=0.03)))
        r = run(*args, "--resume")  # the weights are the same, but fp's samples came from the other schedule
        assert r.exit_code == 1 and (".r.compare holds a run that differs in scheduler (beta_end 0.02 there, 0.03 "
                                     "here): resuming it") in r.output
        progress = tmp_path / ".r.compare" / "progress.json"
        recorded = json.loads(progress.read_text())
        del recorded["fingerprint"]["scheduler"]  # as a run started before the schedule was recorded
        progress.write_text(json.dumps(recorded))
        r = run(*args, "--resume")
        assert r.exit_code == 1 and "holds a run of an earlier msfp, which did not record its scheduler" in r.output
    finally:
        METHODS.pop("test-broken")


@pytest.mark.parametrize("function, part", [("code_digest", "code"), ("model_key", "model"),
                                            ("_reference_digest", "reference"), ("machine_info", "machine")])
def test_resume_refuses_a_run_with_another_code_model_reference_or_machine(tmp_path, tiny_model_dir, monkeypatch,
                                                                          function, part):
    args = ["compare", "--model", tiny_model_dir, "--methods", "fp,test-broken", "--out", tmp_path / "r", *TINY]
    register_method("test-broken", lambda ctx: 1 / 0, "always fails")
    try:
        assert isinstance(run(*args).exception, ZeroDivisionError)
        # e.g. a `git pull` between the two sessions: msfp.__version__ stays the same.
        monkeypatch.setattr(msfp.compare, function, lambda *a, **k: "something else")
        r = run(*args, "--resume")
        assert r.exit_code == 1 and f".r.compare holds a run that differs in {part}: resuming it would mix" in r.output
    finally:
        METHODS.pop("test-broken")


def test_a_refused_resume_names_the_machine_fields_that_differ(tmp_path, tiny_model_dir, monkeypatch):
    # It said "differs in machine" and advised deleting the run, where setting OMP_NUM_THREADS back would do.
    args = ["compare", "--model", tiny_model_dir, "--methods", "fp,test-broken", "--out", tmp_path / "r", *TINY]
    register_method("test-broken", lambda ctx: 1 / 0, "always fails")
    try:
        assert isinstance(run(*args).exception, ZeroDivisionError)
        here = msfp.compare.machine_info
        monkeypatch.setattr(msfp.compare, "machine_info", lambda device: dict(
            here(device), torch_threads=99, versions=dict(here(device)["versions"], diffusers="9.9")))
        r = run(*args, "--resume")
        assert r.exit_code == 1 and (f"differs in machine (torch_threads {torch.get_num_threads()} there, 99 here; "
                                     f"versions.diffusers '{diffusers.__version__}' there, '9.9' here): resuming "
                                     "it would mix results; "
                                     "resume it as it ran, or delete") in r.output, r.output
    finally:
        METHODS.pop("test-broken")


def test_the_code_digest_covers_every_file_of_the_package(tmp_path, monkeypatch):
    from msfp import identity

    package = tmp_path / "msfp"
    (package / "assets").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "assets" / "weights.bin").write_bytes(b"\0")
    monkeypatch.setattr(identity, "__file__", str(package / "identity.py"))
    digests = []
    for edit in (lambda: None, lambda: (package / "a.py").write_text("x = 2\n"),
                 lambda: (package / "assets" / "weights.bin").write_bytes(b"\1"),
                 lambda: (package / "__pycache__").mkdir()):
        edit()
        identity.code_digest.cache_clear()
        digests.append(identity.code_digest())
    identity.code_digest.cache_clear()
    assert len(set(digests[:3])) == 3 and digests[3] == digests[2]  # compiled caches do not count


def test_an_interrupted_run_keeps_the_earlier_report_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    compare(tmp_path, "r", tiny_model_dir, "fp,w4a4-int")  # an earlier, complete run
    report = tmp_path / "r"
    earlier = {p: p.read_bytes() for p in report.rglob("*") if p.is_file() and "cache" not in p.parts}
    failures = []

    def flaky(ctx):  # fails on its first call, like a run killed half-way
        if not failures:
            failures.append(1)
            raise RuntimeError("power cut")
        return build_ptq(ctx, "w4a4-fp")

    register_method("test-flaky", flaky, "fails once")
    register_method("test-broken", lambda ctx: 1 / 0, "always fails")
    try:
        args = ["compare", "--model", tiny_model_dir, "--methods", "w4a4-msfp,test-flaky", "--out", report, *TINY]
        r = run(*args)
        assert isinstance(r.exception, RuntimeError) and "run the same command with --resume" in r.output
        assert {p: p.read_bytes() for p in earlier} == earlier  # the earlier report is untouched
        progress = json.loads((tmp_path / ".r.compare" / "progress.json").read_text())
        assert list(progress["methods"]) == ["fp", "w4a4-msfp"] and progress["seconds"] > 0

        monkeypatch.setattr(sys, "argv", ["msfp", *map(str, args), "--resume"])
        r = run(*args, "--resume")
        assert r.exit_code == 0, r.output
        # Both sessions' time: it used to be the last session's only.
        assert json.loads((report / "results.json").read_text())["wall_seconds"] >= progress["seconds"]
        # The command that reproduces the run (with --resume, it fails: "nothing to resume").
        assert json.loads((report / "results.json").read_text())["command"] == shlex.join(["msfp", *map(str, args)])
        assert "[2/3] w4a4-msfp: finished by the interrupted run, reused" in r.output and "[3/3] test-flaky: " in r.output
        assert not (tmp_path / ".r.compare").exists() and (report / "cache").is_dir()
        # Only this run's samples: w4a4-int's are gone with the earlier results.json that listed them.
        assert sorted(p.stem for p in (report / "samples").glob("*.npz")) == ["fp", "test-flaky", "w4a4-msfp"]
        _, fresh = compare(tmp_path, "fresh", tiny_model_dir, "w4a4-msfp,test-flaky")
        assert without_timings(json.loads((report / "results.json").read_text())) == without_timings(fresh)

        r = run("compare", "--methods", "fp,test-broken", "--out", report, "--model", tiny_model_dir, *TINY)
        assert isinstance(r.exception, ZeroDivisionError)
        # Without --resume, the interrupted run's finished methods used to be deleted first thing.
        r = run("compare", "--methods", "fp,test-broken", "--out", report, "--model", tiny_model_dir, *TINY)
        assert r.exit_code == 1 and (".r.compare holds an interrupted run: continue it with --resume, or delete "
                                     in r.output), r.output
        assert (tmp_path / ".r.compare" / "samples" / "fp.npz").is_file()
        r = run("compare", "--methods", "fp,test-broken", "--out", report, "--model", tiny_model_dir, *TINY[:-2],
                "--batch", 4, "--resume")
        assert r.exit_code == 1 and (".r.compare holds a run that differs in settings (batch_size 8 there, 4 here): "
                                     "resuming it would mix") in r.output, r.output
        shutil.rmtree(tmp_path / ".r.compare")
        r = run(*args, "--resume")
        assert r.exit_code == 1 and "nothing to resume: " in r.output and "progress.json does not exist" in r.output
    finally:
        METHODS.pop("test-flaky")
        METHODS.pop("test-broken")


def test_a_registered_method_changed_since_the_interrupted_run_runs_again(tmp_path, tiny_model_dir):
    # Its code is not in the run's fingerprint: the old method's result was published under the name, silently.
    register_method("test-changing", lambda ctx: Built(copy.deepcopy(ctx.fp_model)), "a copy of fp")
    register_method("test-broken", lambda ctx: 1 / 0, "always fails")
    try:
        args = ["compare", "--model", tiny_model_dir, "--out", tmp_path / "r", *TINY]
        assert isinstance(run(*args, "--methods", "test-changing,test-broken").exception, ZeroDivisionError)
        METHODS.pop("test-changing")
        register_method("test-changing", lambda ctx: build_ptq(ctx, "w4a4-int"), "w4a4-int under another name")
        r = run(*args, "--methods", "test-changing", "--resume")
        assert r.exit_code == 0, r.output
        assert ("test-changing: the interrupted run ran it as 'a copy of fp', it is registered as 'w4a4-int under "
                "another name' now: run again") in r.output
        result = json.loads((tmp_path / "r" / "results.json").read_text())["methods"]["test-changing"]
        assert result["description"] == "w4a4-int under another name" and result["metrics"]["psnr"] < 100
    finally:
        METHODS.pop("test-changing")
        METHODS.pop("test-broken")


def test_a_damaged_interrupted_run_is_named_or_its_methods_run_again(tmp_path, tiny_model_dir):
    register_method("test-broken", lambda ctx: 1 / 0, "always fails")
    try:
        r = run("compare", "--methods", "w4a4-int,test-broken", "--out", tmp_path / "r", "--model", tiny_model_dir,
                *TINY)
        assert isinstance(r.exception, ZeroDivisionError)
    finally:
        METHODS.pop("test-broken")
    args = ["compare", "--methods", "w4a4-int", "--out", tmp_path / "r", "--model", tiny_model_dir, *TINY, "--resume"]
    work = tmp_path / ".r.compare"
    kept = (work / "progress.json").read_text()
    # A JSON error naming no file, and a KeyError traceback.
    for damage, why in ((kept[: len(kept) // 2], "line "), ('{"methods": {}}', "not the record msfp compare writes")):
        (work / "progress.json").write_text(damage)
        r = run(*args)
        assert r.exit_code == 1 and "progress.json is damaged (" in r.output and why in r.output, r.output
        assert f"delete {work} to start over" in r.output.replace("\n", "")
    # Sample files lost or cut short: they failed at the very end ("No such file") or with no advice.
    (work / "progress.json").write_text(kept)
    (work / "samples" / "fp.npz").write_bytes(b"truncated")
    (work / "samples" / "w4a4-int.npz").unlink()
    r = run(*args)
    assert r.exit_code == 0, r.output
    for k, name in ((1, "fp"), (2, "w4a4-int")):
        assert f"[{k}/2] {name}: its files from the interrupted run are missing or damaged: run again" in r.output
    _, fresh = compare(tmp_path, "fresh", tiny_model_dir, "w4a4-int")
    assert without_timings(json.loads((tmp_path / "r" / "results.json").read_text())) == without_timings(fresh)


def test_a_second_compare_on_the_same_output_is_refused(tmp_path, tiny_model_dir):
    # Two runs on one --out deleted each other's work directory and published one's samples with the other's
    # metrics, exiting 0.
    from msfp.fileio import exclusive_run

    with exclusive_run(tmp_path / "r", "msfp compare"):
        r = run("compare", "--methods", "fp", "--out", tmp_path / "r", "--model", tiny_model_dir, *TINY_UNCALIBRATED)
    assert r.exit_code == 1 and (f"{tmp_path / 'r'} is being written by another run (msfp compare, pid "
                                 f"{os.getpid()} on ") in r.output, r.output
    assert not (tmp_path / ".r.compare").exists() and not (tmp_path / ".r.lock").exists()
    (tmp_path / ".r.lock").write_text("msfp compare, pid 1 on a host that crashed")  # a killed run's: no lock held
    compare(tmp_path, "r", tiny_model_dir, "fp")
    assert not (tmp_path / ".r.lock").exists()


def test_identical_images_show_psnr_inf_after_a_json_round_trip():
    from msfp.compare import format_cell, table_rows
    from msfp.fileio import _finite_or_none

    method = dict(metrics=dict(psnr=float("inf"), paired_mse=0.0), eps_mse_mean=0.0, sample_seconds=1.0,
                  calibration=None, low_bit=None)
    for result in ({"methods": {"same": method}}, _finite_or_none({"methods": {"same": method}})):
        # JSON (results.json, and the progress file a resumed row is read from) holds inf as null: "—" used to show.
        assert format_cell("psnr", table_rows(result)[0]["psnr"]) == "inf"


def test_an_output_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match="afile is a file; the output of msfp compare is a directory"):
        run_compare(CompareSettings(), ["fp"], tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "mine"
