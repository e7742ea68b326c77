"""The benchmark scripts that need no GPU, run end to end on the shipped default model with tiny settings."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msfp.compare import CompareSettings, run_compare
from msfp.evaluation import eps_mse_weighted
from msfp.models import load_model

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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
    assert printed["command"].startswith("python benchmarks/ablation.py --model default --rows ")
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


def test_fp8_quality_compares_both_backends_and_the_batch_control_with_compare_rows(tmp_path, capsys):
    out = tmp_path / "fp8_quality"
    settings = ["--num", "6", "--steps", "2", "--calib-samples", "3", "--calib-steps", "2", "--batch", "4"]
    load_script("fp8_quality").main(["--methods", "w4a4-msfp", "--out", str(out), *settings])
    printed = json.loads(capsys.readouterr().out)
    # What reproduces the figures: the command as typed from the repository root, the machine and the code.
    assert printed["command"] == f"python benchmarks/fp8_quality.py --methods w4a4-msfp --out {out} " + " ".join(settings)
    assert printed["machine"]["cpu"] and printed["machine"]["versions"]["msfp_code"]
    assert printed["fp8_kernels"]["used"] is False  # no GPU here: the emulated path
    row = printed["methods"]["w4a4-msfp"]
    # Only the 8-bit edge layers stay fake-quant (their INT8/UINT8 grids are not E4M3 values).
    assert set(row["fp8"]["fake_quant_layers"]) == {"conv_in", "conv_out", "time_embedding.linear_1",
                                                   "time_embedding.linear_2"}
    for label, versus in (("fp8", "fp8_vs_fake_quant"), ("fake_quant_control_batch", "control_batch_vs_fake_quant")):
        diff = row[versus]
        assert diff["fd_difference"] == pytest.approx(row[label]["metrics"]["fd"] - row["fake_quant"]["metrics"]["fd"])
        lo, hi = diff["fd_difference_interval"]
        assert lo <= hi and 0 <= diff["identical_pixels"] <= 1 and 0 <= diff["max_abs_diff"] <= 255
        # Flipped roundings change some pixels, but the sets stay far closer to each other than to full precision.
        assert diff["psnr"] > row["fake_quant"]["metrics"]["psnr"]
    # The images per call each run actually drew (--control-batch 1 is the default).
    assert [row[label]["batch_size"] for label in ("fake_quant", "fake_quant_control_batch", "fp8")] == [4, 1, 4]
    # The fake-quant run is compare's row: same build, seeds and sampling settings give the same images.
    run_compare(CompareSettings(num_samples=6, steps=2, calib_samples=3, calib_steps=2, heldout_samples=2,
                                batch_size=4), ["fp", "w4a4-msfp"], tmp_path / "compare", disable=True)
    same = [np.load(d / "samples" / "w4a4-msfp.npz")["arr_0"] for d in (out, tmp_path / "compare")]
    assert np.array_equal(*same)


def test_fp8_quality_precompiles_every_batch_split_of_the_sampling_run():
    # On a GPU the script compiles the kernels of one sampling step before timing it; here the launches are recorded
    # for Hopper (count_only: nothing compiled) from the default model with its layers set to the kernels.
    import copy

    import msfp
    from msfp.fp8 import Fp8Layer, convert_to_fp8
    from msfp.models import load_model

    fp, scheduler = load_model("default")
    model = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(model, fp, scheduler, num_samples=2, num_steps=2, disable=True)
    convert_to_fp8(model)
    layers = [m for m in model.modules() if isinstance(m, Fp8Layer)]
    for layer in layers:
        layer.use_kernels = True
    counted = load_script("fp8_quality").precompile_sampling(model, scheduler, 6, 4, "cpu", arch=90, count_only=True)
    # Two calls (4 + 2 images), each launching every FP8 layer's activation kernel and GEMM once.
    assert counted["launches"] == 2 * 2 * len(layers) and len(layers) == 90
    assert counted["distinct"] > 0 and counted["kernels"] > 0 and counted["errors"] == []


@pytest.mark.parametrize("args, message", [
    (["--methods", "torchao-mxfp4"], "msfp methods only"),
    (["--methods", "w4a4-msfp,nonsense"], "unknown method(s) 'nonsense'"),
    (["--batch", "8", "--control-batch", "8"], "--control-batch 8 and --batch 8 both draw 8 images per call"),
    # Each run draws at most --num images per call: this compared batch 4 with batch 4, and reported the identical
    # images as what the batch size changes.
    (["--model", "no-such-model", "--num", "4", "--batch", "128", "--control-batch", "8"],
     "--control-batch 8 and --batch 128 both draw 4 images per call at --num 4"),
])
def test_fp8_quality_refuses_what_it_cannot_measure(args, message, capsys):
    with pytest.raises(SystemExit):
        load_script("fp8_quality").main(args)
    assert message in capsys.readouterr().err


def test_gpu_w4a4_smoke_runs_every_layer_and_denoiser_on_the_fp8_path(capsys):
    # The GPU benchmark's whole flow on the emulated path, so a GPU session does not find it broken (timings unused).
    load_script("gpu_w4a4").main(["--smoke"])
    report = json.loads(capsys.readouterr().out)
    layers = report["layers"]
    assert [(row["kind"], row["shapes_of"]) for row in layers] == ([("conv3x3", "sd15")] * 5 + [("linear", "sd15")] * 5
                                                                   + [("linear", "dit-xl/2")] * 2)
    for row in layers:  # FLOPs by hand: 2 per multiply-accumulate of a 3×3 conv (padding 1) or a linear
        if row["kind"] == "conv3x3":
            out = (row["hw"] + 2 - 3) // row["stride"] + 1
            assert row["flops"] == 2 * row["batch"] * out * out * row["c_in"] * row["c_out"] * 9
        else:
            assert row["flops"] == 2 * row["batch"] * row["tokens"] * row["k"] * row["n"]
        for side in ("bf16", "fp8_gemm_only", "fp8_layer"):
            assert row[side]["ms"] > 0 and row[side]["tflops"] == pytest.approx(row["flops"] / row[side]["ms"] / 1e9)
        assert row["speedup_layer"]["eager"] == pytest.approx(row["bf16"]["ms"] / row["fp8_layer"]["ms"])
        assert ("scaled_mm_layer" in row) == (row["kind"] == "linear")  # linears: also the torch._scaled_mm GEMM
        # TMA loads: stride-1 layers only; 3×3 convolutions with both tilings, linears as flat rows
        assert ("fp8_gemm_only_tma_rows" in row) == (row.get("stride", 1) == 1)
        assert ("fp8_gemm_only_tma_boxes" in row) == (row["kind"] == "conv3x3" and row["stride"] == 1)
        # The emulated GEMM (fp32 whatever precise_acc says) within the fp32 summation bound of float64: checks
        # that the error fields compare like with like (layout, geometry, scales, zero point's share).
        errors = row["accumulation_error"]
        assert errors["fp32"] == errors["fast"] and 0 < errors["fp32"]["max_over_fp32_bound"] <= 1
        assert errors["fp32"]["rel_l2"] < 1e-6
        if row["kind"] == "conv3x3":  # the activation pass alone, from channels_last and NCHW inputs
            moved = 3 * row["batch"] * row["c_in"] * row["hw"] ** 2  # bf16 in, one-byte codes out
            for timing in (row["act_codes"]["channels_last"], row["act_codes"]["nchw"]):
                assert timing["gb_per_s"] == pytest.approx(moved / timing["ms"] / 1e6)
    # The large UNet at the batch and, with fp32 and fast accumulation only, at the large batch; the default model.
    all_variants = ["fast_accum", "scaled_mm", "tma_boxes", "tma_rows", "split_k_auto"]
    assert [(d["model"].split()[0], d["batch"]) for d in report["denoisers"]] == [("sd15-like", 1), ("sd15-like", 2),
                                                                                 ("default", 1)]
    for denoiser, variants in zip(report["denoisers"], (all_variants, ["fast_accum"], all_variants)):
        # Every 4-bit layer converted; 1 byte per weight code halves the BF16 model's bytes or better.
        assert denoiser["fake_quant_layers"] == {} and denoiser["fp8_layers"] > 0
        fp8_variants = [label for label in denoiser if label.startswith("fp8_w4a4")]
        assert fp8_variants == ["fp8_w4a4"] + [f"fp8_w4a4_{v}" for v in variants]
        for variant in variants:
            variant_bytes = denoiser[f"fp8_w4a4_{variant}"]["model_tensor_bytes"]
            assert variant_bytes == denoiser["fp8_w4a4"]["model_tensor_bytes"]
            assert f"speedup_{variant}" in denoiser
        assert denoiser["fp8_w4a4"]["model_tensor_bytes"] < 0.6 * denoiser["bf16"]["model_tensor_bytes"]
        # On the emulated path every FP8 variant computes exactly what the reference does; BF16 is unquantized.
        assert all(denoiser[v]["output_rel_l2_vs_emulated"] == 0 for v in fp8_variants)
        assert denoiser["bf16"]["output_rel_l2_vs_emulated"] > 0.01
        for label in ("bf16", "fp8_w4a4"):  # where the step's time goes (CPU operators here, GPU kernels on a GPU)
            spent = denoiser[label]["time_by_kernel"]
            kernels = spent["kernels"]
            assert 0 < len(kernels) <= 12 and all(k["ms"] > 0 and k["calls"] > 0 for k in kernels)
            assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
            assert sum(k["ms"] for k in kernels) + spent["other_ms"] == pytest.approx(spent["total_ms"])
        assert "time_by_kernel" not in denoiser["fp8_w4a4_fast_accum"]


HOST_OVERHEAD_CASES = {"linear_64x64_tokens16", "linear_64x64_tokens16_tma_rows", "conv3x3_16x16_8x8",
                       "conv3x3_16x16_8x8_tma_boxes", "conv3x3_16x16_8x8_tma_rows"}


def test_fp8_host_overhead_times_pointer_and_tma_launch_preparation(capsys, monkeypatch):
    pytest.importorskip("triton")
    from msfp import triton_kernels

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    prepared = []
    prepare = triton_kernels._prepare_conv2d_fp8
    monkeypatch.setattr(triton_kernels, "_prepare_conv2d_fp8",
                        lambda *a, **k: prepared.append((k["tma"], k.get("zero_bordered"))) or prepare(*a, **k))
    # This process's kernels are interpreted (tests/test_triton_kernels.py): Triton's dispatch is timed below.
    load_script("fp8_host_overhead").main(["--calls", "3", "--rounds", "1", "--no-triton-dispatch"])
    results = json.loads(capsys.readouterr().out)["results"]
    assert set(results) == HOST_OVERHEAD_CASES
    assert all(r["host_us_per_forward"] > 0 for r in results.values())
    # pointer loads, TMA boxes, TMA flat rows over zero-bordered codes: all really prepared
    assert {(False, False), (True, False), (True, True)} <= set(prepared)


def test_fp8_host_overhead_times_triton_dispatch_through_a_stand_in_gpu(tmp_path):
    pytest.importorskip("triton")
    # Triton's real JIT (not its interpreter) compiles for sm_90 and dispatches; the stand-in driver counts launches.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "fp8_host_overhead.py"), "--calls", "3", "--rounds", "2",
                           "--compile-workers", "2"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed["precompiled"]["errors"] == [] and printed["precompiled"]["arch"] == 90
    results = printed["results"]
    assert set(results) == HOST_OVERHEAD_CASES
    for r in results.values():
        assert r["launches_per_forward"] == 2  # activation codes, then the GEMM
        assert r["with_triton_dispatch_us_per_forward"] > 0 and r["host_us_per_forward"] > 0
        assert len(r["rounds"]) == len(r["with_triton_dispatch_rounds"]) == 2


def test_gemm_registers_compiles_every_option_and_the_register_cap(capsys):
    pytest.importorskip("triton")
    load_script("gemm_registers").main([])
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    variants = {(k["layer"], k["precise_acc"], k["loads"], k["zero_point"], k["maxnreg"]) for k in kernels}
    assert len(kernels) == len(variants) == 2 * 2 * 2 * 2 * 2
    for k in kernels:
        if k["maxnreg"] is not None:  # the cap reaches ptxas, and two 8-warp blocks then fit
            assert k["registers"] <= k["maxnreg"] == 128 and k["ctas_per_sm"] == 2, k
        else:
            assert k["spill_store_bytes"] == 0, k


def test_kernel_compile_counts_tiles_waves_and_padded_work(monkeypatch):
    pytest.importorskip("triton")
    import torch

    from msfp import triton_kernels as tk

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its sibling scripts
    kernel_compile = load_script("kernel_compile")
    fp8 = torch.float8_e4m3fn
    # 320→320 3×3 convolution on 8 × 64×64: 128×128×128 blocks cover 320 output channels and each tap's 320 input
    # channels with 384, so (5/6)² of what they compute is asked for; 256 row blocks × 3 column blocks.
    conv = (torch.zeros(8, 64, 64, 320, dtype=fp8), torch.zeros(320, 3, 3, 320, dtype=fp8), torch.ones(8),
            torch.ones(320))
    macs, blocks = 8 * 64 * 64 * 320 * 9 * 320, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)
    row = kernel_compile.with_tiles(dict(config=blocks, ctas_per_sm=1), tk._prepare("conv2d_fp8", *conv, padding=1),
                                    90, macs, 9, 320)
    assert (row["tiles"], row["waves"], row["useful_mac_fraction"]) == (768, round(768 / 132, 2), round(25 / 36, 3))
    # Flat TMA rows compute the zero border too: 8 × 66 × 66 positions in 273 row blocks.
    bordered = torch.zeros(8, 66, 66, 320, dtype=fp8)[:, 1:-1, 1:-1]
    row = kernel_compile.with_tiles(dict(config=blocks, ctas_per_sm=2),
                                    tk._prepare("conv2d_fp8", bordered, *conv[1:], padding=1, tma=True,
                                                zero_bordered=True), 90, macs, 9, 320)
    assert (row["tiles"], row["waves"]) == (273 * 3, round(273 * 3 / 264, 2))
    assert row["useful_mac_fraction"] == round(macs / (273 * 128 * 384 * 9 * 384), 3)
    # Split-K launches a block per share; fixed blocks come from the launch's flags; no SM count for sm_89.
    linear = tk._prepare("linear_fp8", torch.zeros(100, 1280, dtype=fp8), torch.zeros(64, 1280, dtype=fp8),
                         torch.ones(100), torch.ones(64), split_k=4, block_m=64, block_n=64, block_k=128)
    row = kernel_compile.with_tiles(dict(config={}, ctas_per_sm=3), linear, 89, 100 * 64 * 1280, 1, 1280)
    assert row["tiles"] == 2 * 4 and "waves" not in row
    assert row["useful_mac_fraction"] == round(100 / 128, 3)


def test_step_kernels_smoke_counts_a_narrow_unets_kernels(monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its sibling gpu_w4a4
    load_script("step_kernels").main(["--batch", "1", "--channels", "32", "32", "64", "64"])
    result = json.loads(capsys.readouterr().out)
    steps = result["steps"]
    assert list(steps) == ["pointers", "boxes", "rows"] and result["machine"]["versions"]["triton"]
    # The same layers launch as many kernels however the tiles load, and many launches share a kernel.
    assert len({s["launches"] for s in steps.values()}) == 1, steps
    for s in steps.values():
        assert s["errors"] == [] and 0 < s["distinct"] < s["launches"] and s["kernels"] > 0, steps


@pytest.mark.parametrize("model", ["default", "sd15"])
def test_sample_speed_smoke_samples_both_backends(monkeypatch, capsys, model):
    # The GPU benchmark's flow, eagerly on the CPU (its CUDA graph runs are tests/test_cuda_graphs.py's subject).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    load_script("sample_speed").main(["--smoke", "--model", model])
    report = json.loads(capsys.readouterr().out)
    assert set(report["runs"]) == {"fake_eager", "fp8_eager"} and report["kept_fake_quant"] == {}
    assert all(r["ms_per_step"] > 0 and r["first_run_s"] > 0 for r in report["runs"].values())


def test_checkpoint_size_measures_a_packed_checkpoint_that_reloads_exactly(capsys):
    result = load_script("checkpoint_size").main(["--calib-samples", "1", "--calib-steps", "1"])
    assert result["command"] == "python benchmarks/checkpoint_size.py --calib-samples 1 --calib-steps 1"
    assert result["machine"]["versions"]["msfp_code"] and result["loaded_outputs_bit_identical"] is True
    # 4-bit codes plus scales: about a quarter of the fp16 file, whatever the calibration (the README's 0.269×), within
    # SPEC §5's 0.27.
    assert 0.2 < result["ratio_packed_to_fp16"] <= 0.27 and result["talora"]["ratio_to_fp16"] > 1


def test_batch_invariance_counts_pixels_that_move_with_the_batch_size(capsys):
    result = load_script("batch_invariance").main(["--num", "2", "--steps", "1", "--calib-samples", "1",
                                                   "--calib-steps", "1"])
    assert result["command"].startswith("python benchmarks/batch_invariance.py --num 2")
    assert list(result["models"]) == ["fp", "w4a4-msfp"] and result["batch_sizes"] == [1, 2]
    for model, samplers in result["models"].items():
        assert list(samplers) == ["ddim", "ddim-eta0.7", "dpm", "euler", "euler-a"]
        for row in samplers.values():
            assert row["pixels"] == 2 * 32 * 32 and 0 <= row["differing_pixels"] <= row["pixels"]
            assert row["control_differing_pixels"] == 0, (model, row)  # the same batch twice: the same images
            assert (row["max_levels"] == 0) == (row["differing_pixels"] == 0)
    with pytest.raises(SystemExit):
        load_script("batch_invariance").main(["--num", "1"])
    assert "--num must be >= 2" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["ptq", "batch_invariance"])
def test_preset_lists_are_checked_before_any_work(script, tmp_path, capsys):
    # A typo'd preset failed after the model was loaded and the presets before it were calibrated, writing nothing.
    # (The missing model is never reached: the presets are checked first.)
    with pytest.raises(SystemExit):
        load_script(script).main(["--model", str(tmp_path / "no-model"), "--presets", "w4a4-msfp,W6A6-MSFP,w4a4-msf",
                                  "--out", str(tmp_path / "r.json")])
    assert "--presets: unknown preset(s) 'w4a4-msf'; choose from w4a4-msfp, " in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_preset_lists_name_each_preset_once():
    import argparse

    from msfp.environment import preset_names

    # "W4A4-MSFP, w4a4-msfp" ran the same preset twice, under two names.
    names = preset_names(argparse.ArgumentParser(), " W4A4-MSFP, w4a4-msfp,,w6a6-msfp ,W4A4-msfp")
    assert names == ["w4a4-msfp", "w6a6-msfp"]


def test_cpu_inference_compares_every_variant_on_the_same_samples(capsys):
    result = load_script("cpu_inference").main(["--images", "1", "--steps", "1", "--repeats", "1",
                                                "--calib-samples", "1", "--calib-steps", "1"])
    assert result["command"].startswith("python benchmarks/cpu_inference.py --images 1")
    variants = result["variants"]
    assert {"full_precision", "packed_cached", "packed_uncached", "in_memory_cached"} <= variants.keys()
    # Every quantized variant draws the very samples of the packed, cached model: the timings compare like with like.
    assert all(v["samples_equal_packed_cached"] for name, v in variants.items()
               if name in ("packed_uncached", "in_memory_cached"))
    assert all(v["ms_per_image_step"] > 0 and v["peak_rss_mib"] > 0 for v in variants.values())


def test_ptq_scores_each_preset_against_full_precision_on_held_out_points(tmp_path, capsys):
    out = tmp_path / "ptq.json"
    load_script("ptq").main(["--presets", "w4a4-msfp,w6a6-msfp", "--calib-samples", "2", "--calib-steps", "2",
                             "--heldout-samples", "2", "--eval-samples", "8", "--eval-steps", "2", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed and printed["command"].startswith("python benchmarks/ptq.py ")
    results = printed["results"]
    assert list(results) == ["fp", "w4a4-msfp", "w6a6-msfp"]
    for preset in ("w4a4-msfp", "w6a6-msfp"):
        row = results[preset]
        assert row["calibration_points"] == 2 * 2
        assert list(row["eps_mse_per_timestep"]) == ["500", "0"]  # the 2-step trajectory, sampling order
        assert row["eps_mse_mean"] == pytest.approx(sum(row["eps_mse_per_timestep"].values()) / 2)
        assert row["eps_mse_weighted"] == eps_mse_weighted(row["eps_mse_per_timestep"], load_model("default")[1])
        assert row["paired_mse_vs_fp"] > 0 and row["fd"] > 0
    # Two more bits per value bring the noise predictions and the samples closer to full precision.
    assert results["w6a6-msfp"]["eps_mse_mean"] < results["w4a4-msfp"]["eps_mse_mean"]
    assert results["w6a6-msfp"]["paired_mse_vs_fp"] < results["w4a4-msfp"]["paired_mse_vs_fp"]
    # Mixup-sign: the 4-bit preset gives the post-SiLU inputs (and some others) unsigned grids.
    assert 0 < results["w4a4-msfp"]["aals"] <= results["w4a4-msfp"]["unsigned_act_layers"]


def test_fake_quant_times_each_path_against_a_copy(tmp_path, capsys):
    out = tmp_path / "fake_quant.json"
    report = load_script("fake_quant").main(["--repeats", "1", "--no-compile", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text()) == report
    assert report["command"] == f"python benchmarks/fake_quant.py --repeats 1 --no-compile --out {out}"
    cases = report["results"]["cpu"]
    assert set(cases) == {"activation_16x320x32x32_ufp4_e2m2", "weight_1280x1280x3x3_fp4_e2m1"}
    for row in cases.values():
        assert row.keys() == {"copy", "eager"} and row["copy"]["x_copy_time"] == 1
        assert all(r["first_call_s"] > 0 for r in row.values())  # was total minus the timed calls: negative
        # from unrounded times: the rounded medians' ratio differs by their rounding (0.5 µs of a ~50 µs copy)
        assert row["eager"]["x_copy_time"] == pytest.approx(row["eager"]["median_ms"] / row["copy"]["median_ms"],
                                                             rel=0.03, abs=0.01)


def test_finetune_step_times_the_step_with_and_without_quantizers():
    # As a user runs it: its variants run in spawned processes, which must import the script by its path.
    done = subprocess.run([sys.executable, str(BENCHMARKS / "finetune_step.py"), "--batch", "2", "--iters", "1",
                           "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    results = printed["results"]
    assert printed["command"] == "python benchmarks/finetune_step.py --batch 2 --iters 1 --device cpu"
    for variant in ("quantizers_off", "quantized_eager"):  # each in its own process, so RSS is its own
        r = results[variant]
        assert r["step_seconds"] > 0 and r["peak_memory_bytes"] > 0
        if Path("/proc/self/clear_refs").exists():  # the peak of the steps, not calibration's before them
            assert r["peak_memory_kind"] == "process_peak_rss_during_the_timed_steps"
            assert r["peak_memory_bytes"] >= r["rss_before_steps_bytes"] > 0
    assert results["throughput_ratio"] == {"quantized_eager": pytest.approx(
        results["quantized_eager"]["steps_per_second"] / results["quantizers_off"]["steps_per_second"])}
