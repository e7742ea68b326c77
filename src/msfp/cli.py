"""The ``msfp`` command line."""

from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from msfp import __version__
from msfp.checkpoint import BACKENDS
from msfp.samples import CALIB_SEED_OFFSET, HELDOUT_SEED_OFFSET, SCHEDULERS


@click.group(context_settings=dict(help_option_names=["-h", "--help"], show_default=True))
@click.version_option(__version__, prog_name="msfp")
def main() -> None:
    """msfp: 4-bit floating-point (W4A4) quantization of diffusion models."""


@contextmanager
def _user_errors():
    """Bad input is reported as one clear line (click prints it and exits 1), not as a traceback."""
    try:
        yield
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        raise click.ClickException(str(e)) from e


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_config(path: str):
    from msfp.config import QuantConfig

    try:
        return QuantConfig.from_json(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _device_unavailable(device: torch.device) -> str | None:
    """Why this machine cannot put tensors on ``device`` (None if it can)."""
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "no CUDA GPU is visible"
        if device.index is not None and device.index >= count:
            return "this machine has only cuda:0" if count == 1 else f"this machine has cuda:0 to cuda:{count - 1}"
        return None
    backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu…
    if callable(getattr(backend, "is_available", None)) and not backend.is_available():
        return f"no {device.type} device is available"
    return None


class _DeviceType(click.ParamType):
    """``--device``: checked up front, so a device this machine lacks is one clear line rather than a traceback from
    the first tensor moved there."""

    name = "device"

    def convert(self, value, param, ctx):
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            self.fail(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)", param, ctx)
        if device.type == "meta":
            self.fail(f"{value}: meta tensors hold no data to compute with", param, ctx)
        why = _device_unavailable(device)
        if why:
            self.fail(f"{value}: {why}", param, ctx)
        try:  # device types this torch names but cannot use (xla, vulkan, hpu… without their packages)
            torch.empty(0, device=device)
        except (RuntimeError, ImportError, AttributeError) as e:  # torch's message lists every dispatch key
            self.fail(f"{value}: this torch ({torch.__version__}) cannot create tensors on {device.type} "
                      f"({type(e).__name__})", param, ctx)
        return value


_DEVICE = _DeviceType()
# Counts and rates are checked by click, so that an error names the flag (the configs name their fields).
_COUNT = click.IntRange(min=1)
#: seeds apart of image i, calibration trajectory i and held-out trajectory i: each set holds at most this many
_SPAN = HELDOUT_SEED_OFFSET - CALIB_SEED_OFFSET
# Seeds plus their offsets (CALIB_SEED_OFFSET, HELDOUT_SEED_OFFSET) and image indices stay within int64, which
# sample files store them in.
_SEED = click.IntRange(min=0, max=2**62)
_RATE = click.FloatRange(min=0)


def _given(*names: str) -> list[str]:
    """The flags of those parameters ``names`` that the command line set (not left at their defaults)."""
    ctx = click.get_current_context()
    return [p.opts[0] for p in ctx.command.params
            if p.name in names and ctx.get_parameter_source(p.name).name != "DEFAULT"]


def _refuse_unused(names: tuple[str, ...], why: str) -> None:
    """Refuse options that were set but do nothing in this run (``why``): ignoring them would hide a mistake."""
    given = _given(*names)
    if given:
        raise click.UsageError(f"{', '.join(given)} {why}")


_DATA_DIR_HELP = ("Fashion-MNIST IDX files: the default reference is their test split (t10k), every metric, FD "
                  "included, from its images (default: Debian's dataset-fashion-mnist, FD from the shipped statistics)")


def _check_data_dir(data_dir, ref, ref_images) -> None:
    if data_dir is not None and (ref is not None or ref_images is not None):
        raise click.UsageError("--data-dir locates the default reference; it has no use with --ref or --ref-images")


def _check_trajectory_seeds(seed: int, count: int, count_option: str) -> None:
    """Refuse calibration/teacher trajectories (seeds ``seed + CALIB_SEED_OFFSET + i``, ``i < count``) that overlap
    ``msfp eval --model``'s held-out ones (``HELDOUT_SEED_OFFSET + i``, ``i < _SPAN``): its error would be measured on
    them."""
    first, last = seed + CALIB_SEED_OFFSET, seed + CALIB_SEED_OFFSET + count - 1
    if first < HELDOUT_SEED_OFFSET + _SPAN and last >= HELDOUT_SEED_OFFSET:
        raise click.UsageError(f"--seed {seed} with {count_option} {count} draws trajectories from seeds {first}.."
                               f"{last}, which overlap msfp eval's held-out trajectories (seeds {HELDOUT_SEED_OFFSET}.."
                               f"{HELDOUT_SEED_OFFSET + _SPAN - 1}): --seed + {count_option} must be at most {_SPAN}, "
                               f"or --seed at least {HELDOUT_SEED_OFFSET + _SPAN - CALIB_SEED_OFFSET}")


@main.command()
@click.option("--model", "model_spec", default="default", help="'default', a save_pretrained directory or a Hub id")
@click.option("--preset", default="w4a4-msfp", help="QuantConfig preset (w4a4-msfp, w4a4-fp, w4a4-int, w4a8-msfp, "
              "w6a6-msfp, w8a8-fp)")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="QuantConfig JSON file (instead of --preset)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--calib-samples", type=_COUNT, default=64, help="trajectories (images) sampled for calibration")
@click.option("--calib-steps", type=_COUNT, default=25, help="DDIM steps per calibration trajectory")
@click.option("--seed", type=_SEED, default=0,
              help=f"calibration trajectory i starts from noise seed + {CALIB_SEED_OFFSET} + i, as in msfp compare: "
              "not from the noise of the images msfp sample --seed draws (seed + i); they must not overlap msfp "
              f"eval's held-out trajectories (seeds {HELDOUT_SEED_OFFSET}..{HELDOUT_SEED_OFFSET + _SPAN - 1})")
@click.option("--batch", type=_COUNT, default=64, help="calibration points per denoiser call")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="reuse calibration trajectories and layer inputs across runs (of the same model, settings, "
              "batch, machine (CPU or GPU model, thread count), versions and msfp code)")
@click.option("--device", type=_DEVICE, default=None, help="default: cuda if available, else cpu")
def quantize(model_spec, preset, config_path, out, calib_samples, calib_steps, seed, batch, cache_dir, device):
    """Quantize and calibrate a model; write a directory that msfp.load_quantized reads."""
    device = device or _default_device()
    from msfp.calibration import calibrate
    from msfp.checkpoint import check_output_directory, read_quant_meta, save_quantized
    from msfp.config import QuantConfig
    from msfp.fileio import exclusive_run
    from msfp.info import describe
    from msfp.surgery import quantize as quantize_model

    if config_path and click.get_current_context().get_parameter_source("preset").name != "DEFAULT":
        raise click.UsageError("give --preset or --config, not both")
    _check_trajectory_seeds(seed, calib_samples, "--calib-samples")
    with _user_errors(), exclusive_run(Path(out).resolve(), "msfp quantize"):
        config = _read_config(config_path) if config_path else QuantConfig.preset(preset)
        check_output_directory(out)  # before the work, which may take long
        cache = Path(cache_dir).resolve() if cache_dir is not None else None
        if cache is not None and Path(out).resolve() in (cache, *cache.parents):
            raise click.UsageError(f"--cache-dir {cache_dir} is inside --out {out}, which the checkpoint replaces "
                                   "as a whole: put the cache elsewhere")
        fp_model, scheduler = _load_fp_model(model_spec)
        fp_model.to(device)
        qmodel = quantize_model(copy.deepcopy(fp_model), config)
        first = seed + CALIB_SEED_OFFSET
        report = calibrate(qmodel, fp_model, scheduler, num_samples=calib_samples, num_steps=calib_steps, seed=first,
                           batch_size=batch, cache_dir=cache_dir)
        save_quantized(qmodel, out)
    click.echo(describe(read_quant_meta(out)))
    click.echo(f"calibration: {report.num_points} points from the trajectories of seeds {first}.."
               f"{first + calib_samples - 1}; trajectories {report.trajectory_seconds:.1f} s, layer inputs "
               f"{report.record_seconds:.1f} s, search {report.search_seconds:.1f} s"
               f"{' (from cache)' if report.cached else ''}")
    click.echo(f"wrote {out}")


@main.command()
# Not exists=True: for a save interrupted between its renames, read_quant_meta says where the earlier version is.
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the saved metadata as JSON")
def info(directory, as_json):
    """Per-layer formats, AALs and quantization MSE of a quantized model directory (whose files are checked as
    loading checks them)."""
    from msfp.checkpoint import read_quant_meta, verify_files
    from msfp.info import describe

    with _user_errors():
        meta = read_quant_meta(directory)
        verify_files(directory, meta)  # a checkpoint that would not load must not look fine
        text = json.dumps(meta, indent=2) if as_json else describe(meta)
    click.echo(text)


def _load_any_model(spec: str, backend: str = "fake"):
    """``(denoiser, scheduler)`` for a ``--model`` spec: 'default', a save_pretrained directory, a Hub id, or a
    quantized directory written by msfp (sampled with the scheduler it was calibrated with, on ``backend``)."""
    from diffusers import DDIMScheduler

    from msfp.conditioning import require_unconditional
    from msfp.checkpoint import CONFIG_NAME, load_quantized, read_quant_meta
    from msfp.fileio import unfinished_save
    from msfp.models import recorded_schedule

    if (Path(spec) / CONFIG_NAME).is_file() or unfinished_save(spec) is not None:
        scheduler_config = read_quant_meta(spec).get("scheduler_config")  # the latter: says where its save went
        if scheduler_config is None:
            raise ValueError(f"{spec} records no scheduler (saved by an older msfp); re-run msfp quantize")
        model = load_quantized(spec, backend=backend)
        require_unconditional(model, spec)  # the checkpoint's base model needs what the model did
        # (Checkpoints before recorded_schedule listed the schedule's own keys: DDIM's defaults would replace them.)
        return model, DDIMScheduler.from_config(recorded_schedule(scheduler_config))
    if backend != "fake":
        raise ValueError(f"--backend {backend} needs a quantized directory (msfp quantize); {spec} is not one")
    return _load_fp_model(spec)


def _load_fp_model(spec: str):
    """:func:`msfp.load_model`, refusing a model that needs conditioning the command line cannot give."""
    from msfp.conditioning import require_unconditional
    from msfp.models import load_model

    model, scheduler = load_model(spec)
    require_unconditional(model, spec)
    return model, scheduler


@main.command()
@click.option("--model", "model_spec", default="default",
              help="'default', a save_pretrained directory, a Hub id or a quantized directory (msfp quantize)")
@click.option("--num", "-n", "num_samples", type=_COUNT, default=64,
              help="number of images (under torchrun write -n: torchrun reads --num as its own --numa-binding)")
@click.option("--steps", type=_COUNT, default=50, help="sampling steps")
@click.option("--scheduler", "scheduler_name", type=click.Choice(list(SCHEDULERS)), default="ddim")
@click.option("--eta", default=0.0, help="DDIM eta (0: deterministic)")
@click.option("--guidance", default=1.0, help="classifier-free guidance scale for class-conditional DiTs (1: off)")
@click.option("--seed", type=_SEED, default=0, help="image i is drawn with a generator seeded with seed + i")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="sample file (.npz); a PNG grid of the "
              "first 64 images goes beside it")
@click.option("--batch", type=_COUNT, default=64,
              help="images per denoiser call (same noise per image whatever it is; a "
              "quantized model's images can still change slightly with it: README, 'Same seeds, same images?')")
@click.option("--device", type=_DEVICE, default=None,
              help="default: cuda if available (one GPU per rank under torchrun), else cpu")
@click.option("--backend", type=click.Choice(BACKENDS), default="fake", show_default=True,
              help="quantized models: fake-quant reference, or W4A4 on FP8 codes (Triton kernels on FP8 GPUs, "
              "emulated elsewhere)")
@click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
              help="replay each denoiser call from a CUDA graph (CUDA only): the same kernels without the host's "
              "per-launch work, which dominates eager FP8 inference")
def sample(model_spec, num_samples, steps, scheduler_name, eta, guidance, seed, out, batch, device, backend,
           cuda_graphs):
    """Draw seeded samples into an .npz file; run under torchrun to shard them across processes:

    torchrun --nproc_per_node 4 -m msfp.cli sample -n 50000 --out samples.npz
    """
    from msfp.samples import generate, get_scheduler, grid_path

    if device is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = _default_device()  # under torchrun, generate gives each rank its own GPU
    with _user_errors():
        model, base = _load_any_model(model_spec, backend)
        if backend == "fp8" and int(os.environ.get("RANK", "0")) == 0:
            from msfp.fp8 import backend_summary

            click.echo(backend_summary(model, device or _default_device()))
        result = generate(model, get_scheduler(scheduler_name, base), out, num_samples, steps, seed=seed,
                          batch_size=batch, eta=eta, guidance=guidance, meta=dict(model=model_spec), device=device,
                          cuda_graphs=cuda_graphs)
    if result is not None:  # rank 0
        click.echo(f"wrote {out} ({num_samples} images, seeds {seed}..{seed + num_samples - 1}) and {grid_path(out)}")


def _check_json_output(json_path: str, inputs: dict, input_dirs: dict) -> None:
    """Refuse a ``--json`` that would replace an input file of the command, a file inside a model directory (a
    checkpoint's ``msfp_quant.json``), or a file that is not the results of an earlier ``msfp eval`` (a typo's
    victim); those are replaced, as an output is."""
    target = Path(json_path).resolve()
    for option, path in inputs.items():
        if path is not None and Path(path).resolve() == target:
            raise click.UsageError(f"--json {json_path} is the {option} file too: writing the results would replace "
                                   "it; choose another path")
    for option, path in input_dirs.items():
        if path is not None and Path(path).is_dir() and Path(path).resolve() in target.parents:
            raise click.UsageError(f"--json {json_path} is inside the {option} directory {path}: writing the results "
                                   "there could replace one of its files; choose another path")
    if target.is_file():
        try:
            earlier = json.loads(target.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and {"samples", "metrics"} <= earlier.keys()):
            raise click.UsageError(f"--json {json_path} exists and is not the results of an earlier msfp eval: "
                                   "refusing to replace it; choose another path")


@main.command("eval")
@click.argument("samples_path", metavar="SAMPLES", type=click.Path(dir_okay=False))
@click.option("--ref", type=click.Path(dir_okay=False), default=None,
              help=".npz with reference images (arr_0) or feature-net statistics (mu, sigma); default: the "
              "Fashion-MNIST test split")
@click.option("--ref-images", type=click.Path(file_okay=False), default=None, help="directory of reference images")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None, help=_DATA_DIR_HELP)
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth: adds FID, sFID, IS, precision/recall")
@click.option("--paired", "paired_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="samples from the same seeds (e.g. the full-precision model's): adds PSNR")
@click.option("--model", "model_spec", default=None,
              help="the model that drew SAMPLES (e.g. a quantized directory): adds its per-timestep noise-prediction "
              "MSE against --fp-model on held-out trajectories")
@click.option("--fp-model", default="default", help="the full-precision model --model is compared with")
@click.option("--heldout-samples", type=click.IntRange(1, _SPAN), default=16,
              help=f"held-out trajectories (DDIM, --heldout-steps steps; seeds {HELDOUT_SEED_OFFSET} + i)")
@click.option("--heldout-steps", type=_COUNT, default=25, help="DDIM steps per held-out trajectory")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="also write the results here")
@click.option("--device", type=_DEVICE, default=None, help="default: cuda if available, else cpu")
def eval_(samples_path, ref, ref_images, data_dir, inception_weights, paired_path, model_spec, fp_model,
          heldout_samples, heldout_steps, json_path, device):
    """Quality metrics of a sample file (FD, KID, classifier score, precision/recall; FID/sFID/IS; PSNR; ε MSE)."""
    from msfp.calibration import collect_trajectories
    from msfp.checkpoint import CONFIG_NAME, read_quant_meta, require_base_weights
    from msfp.evaluation import eps_mse_means, evaluate, format_table, load_reference, per_timestep_eps_mse
    from msfp.fileio import check_writable, write_json

    if model_spec is None:
        _refuse_unused(("fp_model", "heldout_samples", "heldout_steps"),
                       "set(s) how --model is measured; without --model nothing uses it")
    _check_data_dir(data_dir, ref, ref_images)
    with _user_errors():
        if json_path is not None:  # an unwritable --json fails before the metrics, not after them
            _check_json_output(json_path, {"SAMPLES": samples_path, "--paired": paired_path, "--ref": ref,
                                           "--inception-weights": inception_weights},
                               {"--model": model_spec, "--fp-model": fp_model})
            check_writable(json_path)
        if model_spec is not None:  # checked before the image metrics, which take a while
            model, scheduler = _load_any_model(model_spec)
            teacher, _ = _load_fp_model(fp_model)
            if (Path(model_spec) / CONFIG_NAME).is_file():  # its error would be measured against another model
                require_base_weights(read_quant_meta(model_spec), teacher, model_spec, f"--fp-model {fp_model!r}")
        reference = load_reference(ref, ref_images, data_dir)
        result = evaluate(samples_path, reference, inception_weights, paired_path, device)
        if model_spec is not None:
            device = device or _default_device()
            model.to(device)
            teacher.to(device)
            # Held-out seeds as in msfp compare: never the calibration or fine-tuning trajectories.
            points = collect_trajectories(teacher, scheduler, heldout_samples, heldout_steps, seed=HELDOUT_SEED_OFFSET,
                                          disable=True)
            eps = per_timestep_eps_mse(model, points)
            mean, weighted, why_not = eps_mse_means(eps, scheduler)
            if why_not is None:
                result["metrics"].update(eps_mse=mean, eps_mse_weighted=weighted)
            else:
                result["skipped"]["eps_mse, eps_mse_weighted"] = why_not
            result["eps_mse_per_timestep"] = eps
        else:
            result["skipped"]["eps_mse, eps_mse_weighted"] = "no --model given"
        if not result["metrics"]:  # an empty table and exit status 0 read as success
            reasons = "; ".join(f"{names}: {why}" for names, why in result["skipped"].items())
            raise ValueError(f"no metric could be computed for {samples_path} ({reasons})")
        if json_path is not None:
            write_json(json_path, result)
    click.echo(format_table(result))
    if json_path is not None:
        click.echo(f"wrote {json_path}")


def _list_methods(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from msfp.compare import DEFAULT_METHODS, METHODS

    width = max(map(len, METHODS))
    for name, method in METHODS.items():
        why = method.unavailable()
        marks = (" [default]" if name in DEFAULT_METHODS else "") + (f" [unavailable: {why}]" if why else "")
        click.echo(f"{name:<{width}}  {method.description}{marks}")
    ctx.exit()


@main.command()
@click.option("--model", "model_spec", default="default", help="'default', a save_pretrained directory or a Hub id")
@click.option("--methods", default=None, help="comma-separated method names (fp is always run: it is the "
              "reference); default: those marked [default] by --list-methods")
@click.option("--list-methods", is_flag=True, expose_value=False, is_eager=True, callback=_list_methods,
              help="print every method name with what it runs, and exit")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="report directory: index.html, results.json, samples/, cache/")
@click.option("--num", "-n", "num_samples", type=click.IntRange(1, CALIB_SEED_OFFSET), default=160,
              help=f"images per method (FD at this N is biased: compare rows with the fp row); at most "
              f"{CALIB_SEED_OFFSET}, as calibration trajectory i has seed + {CALIB_SEED_OFFSET} + i")
@click.option("--steps", type=_COUNT, default=20, help="DDIM sampling steps")
@click.option("--calib-samples", type=click.IntRange(1, _SPAN), default=64,
              help=f"calibration trajectories (images); at most {_SPAN}, as "
              f"held-out trajectory i has seed + {HELDOUT_SEED_OFFSET} + i")
@click.option("--calib-steps", type=_COUNT, default=25, help="DDIM steps per calibration (and held-out) trajectory")
@click.option("--heldout-samples", type=_COUNT, default=16, help="held-out trajectories for the per-timestep noise MSE")
@click.option("--finetune-iters", type=_COUNT, default=160,
              help="fine-tuned methods (…+lora…, …+talora…, int4-efficientdm): "
              "iterations")
@click.option("--finetune-batch", type=_COUNT, default=8, help="fine-tuned methods: batch size")
@click.option("--num-loras", type=_COUNT, default=4, help="TALoRA: LoRAs per layer")
@click.option("--rank", type=_COUNT, default=4, help="LoRA rank (the paper: 32 for large models)")
@click.option("--seed", type=_SEED, default=0, help="image i of every method is drawn with seed + i")
@click.option("--batch", type=_COUNT, default=128, help="images per denoiser call")
@click.option("--ref", type=click.Path(dir_okay=False), default=None,
              help="reference .npz (images or feature-net statistics), as for msfp eval; default: Fashion-MNIST test")
@click.option("--ref-images", type=click.Path(file_okay=False), default=None, help="directory of reference images")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None, help=_DATA_DIR_HELP)
@click.option("--device", type=_DEVICE, default=None, help="default: cuda if available, else cpu")
@click.option("--resume", is_flag=True, help="continue an interrupted run (same command): reuse the methods it "
              "finished, kept in .OUT.compare/ beside OUT")
def compare(model_spec, methods, out, num_samples, steps, calib_samples, calib_steps, heldout_samples, finetune_iters,
            finetune_batch, num_loras, rank, seed, batch, ref, ref_images, data_dir, device, resume):
    """Run several methods on one model with the same seeds; write OUT/index.html and OUT/results.json.

    OUT's earlier results are replaced only when the run completes; each finished method is kept beside it
    (.OUT.compare/), so an interrupted run continues with --resume.
    """
    import shlex
    import sys

    from msfp.compare import (UNCALIBRATED_METHODS, UNROUTED_METHODS, UNTUNED_METHODS, CompareSettings,
                              metrics_table, parse_methods, run_compare, skipped_metrics)
    from msfp.evaluation import load_reference

    _check_data_dir(data_dir, ref, ref_images)
    with _user_errors():
        names = parse_methods(methods)
        if not resume:  # a resume repeats the interrupted run's settings
            if set(names) <= UNTUNED_METHODS:
                _refuse_unused(("finetune_iters", "finetune_batch", "num_loras", "rank"),
                               "set(s) how methods are fine-tuned; none of --methods is fine-tuned")
            if set(names) <= UNROUTED_METHODS:
                _refuse_unused(("num_loras",), "sets TALoRA's LoRAs per layer; none of --methods uses TALoRA")
            if set(names) <= UNCALIBRATED_METHODS:  # (--calib-steps also sets the held-out trajectories)
                _refuse_unused(("calib_samples",), "sets the calibration trajectories; none of --methods calibrates")
        reference = load_reference(ref, ref_images, data_dir)
        settings = CompareSettings(model=model_spec, num_samples=num_samples, steps=steps, calib_samples=calib_samples,
                                   calib_steps=calib_steps, heldout_samples=heldout_samples,
                                   finetune_iters=finetune_iters, finetune_batch=finetune_batch, num_loras=num_loras,
                                   rank=rank, seed=seed, batch_size=batch, device=device)
        # What reproduces the run: a resumed run's command without --resume (which needs an interrupted run).
        command = shlex.join(["msfp", *(arg for arg in sys.argv[1:] if arg != "--resume")])
        result = run_compare(settings, names, out, command=command, reference=reference, resume=resume)
    click.echo(metrics_table(result))
    for keys, who, why in skipped_metrics(result):
        click.echo(f"not computed: {keys} ({who}): {why}")
    for name, why in result["skipped_methods"].items():
        click.echo(f"skipped {name}: {why}")
    click.echo(f"report: {Path(out) / 'index.html'} (open it in a browser); results: {Path(out) / 'results.json'}; "
               f"wall time {result['wall_seconds']:.0f} s")


@main.command("finetune")
# Not exists=True: for a save interrupted between its renames, read_quant_meta says where the earlier version is.
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--model", "model_spec", default="default", help="the full-precision teacher: the model DIRECTORY was "
              "quantized from")
@click.option("--iters", type=_COUNT, default=400, help="optimizer steps")
@click.option("--batch", type=_COUNT, default=16, help="trajectory points per step (mixed timesteps)")
@click.option("--lora", type=click.Choice(["talora", "single", "none"]), default="talora",
              help="TALoRA (--num-loras LoRAs, one chosen per timestep by a router), one LoRA, or none "
                   "(quantizer parameters only)")
@click.option("--num-loras", type=_COUNT, default=4, help="TALoRA: LoRAs per layer")
@click.option("--rank", type=_COUNT, default=4,
              help="LoRA rank, capped by each layer's shape (the paper: 32 for large models)")
@click.option("--loss", type=click.Choice(["dfa", "mse"]), default="dfa",
              help="distillation loss: MSE weighted by the denoising factor (DFA), or plain MSE")
@click.option("--dfa-weighting", type=click.Choice(["abs", "square"]), default="abs", help="|γ_t| or γ_t²")
@click.option("--lr", "lora_lr", type=_RATE, default=1e-3,
              help="LoRA learning rate (scaled per layer by its weight step size)")
@click.option("--act-lr", type=_RATE, default=1e-4, help="activation scales and zero points")
@click.option("--router-lr", type=_RATE, default=1e-3, help="TALoRA router")
@click.option("--train-weight-scales", is_flag=True,
              help="also train the per-channel weight scales (at --act-lr)")
@click.option("--traj-samples", type=_COUNT, default=64, help="teacher trajectories (images)")
@click.option("--traj-steps", type=_COUNT, default=25,
              help="DDIM steps per teacher trajectory (the sampler DFA aligns to)")
@click.option("--seed", type=_SEED, default=0,
              help=f"teacher trajectory i starts from noise seed + {CALIB_SEED_OFFSET} + i, as in msfp compare (not "
              f"from the noise of msfp sample --seed's images); seed + {CALIB_SEED_OFFSET} also seeds the LoRAs and "
              f"batches; they must not overlap msfp eval's held-out trajectories (seeds {HELDOUT_SEED_OFFSET}.."
              f"{HELDOUT_SEED_OFFSET + _SPAN - 1})")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last checkpoint")
@click.option("--max-minutes", type=click.FloatRange(min=0), default=None,
              help="stop after this long (the teacher's sampling included); continue later with --resume")
@click.option("--device", type=_DEVICE, default=None, help="default: cuda if available, else cpu")
def finetune_cmd(directory, model_spec, iters, batch, lora, num_loras, rank, loss, dfa_weighting, lora_lr, act_lr,
                 router_lr, train_weight_scales, traj_samples, traj_steps, seed, resume, max_minutes, device):
    """Fine-tune a quantized model directory (TALoRA + DFA) and write it back to DIRECTORY.

    Progress is checkpointed beside it (.DIRECTORY.finetune/, removed at the end); DIRECTORY is replaced only when
    the run completes.
    """
    from msfp.checkpoint import load_quantized, read_quant_meta, require_base_weights, save_quantized
    from msfp.fileio import check_replaceable, exclusive_run
    from msfp.finetune import STATE_NAME, FinetuneConfig, finetune
    from msfp.info import describe

    if loss == "mse":
        _refuse_unused(("dfa_weighting",), "set(s) how the DFA loss is weighted; --loss mse is not weighted")
    if lora == "none":
        _refuse_unused(("num_loras", "rank", "lora_lr", "router_lr"), "set(s) the LoRAs; --lora none trains none")
    elif lora == "single":
        _refuse_unused(("num_loras", "router_lr"), "set(s) TALoRA's LoRAs per layer and router; --lora single trains "
                       "one LoRA per layer, without a router")
    _check_trajectory_seeds(seed, traj_samples, "--traj-samples")
    device = device or _default_device()
    path = Path(directory).resolve()  # "." has no name to put the work directory beside
    work_dir = path.parent / f".{path.name}.finetune"
    with _user_errors():
        meta = read_quant_meta(path)  # first: a mistyped DIRECTORY gets no lock file created beside it
    with _user_errors(), exclusive_run(path, "msfp finetune"):  # a second run would share the work directory
        check_replaceable(path)  # before the work, which may take long
        if not resume and (work_dir / STATE_NAME).is_file():
            raise click.UsageError(f"{work_dir} holds an interrupted fine-tuning run of {path}: continue it with "
                                   f"--resume, or delete {work_dir} to start over")
        config = FinetuneConfig(iters=iters, batch_size=batch, lora=lora, num_loras=num_loras, rank=rank, loss=loss,
                                dfa_weighting=dfa_weighting, lora_lr=lora_lr, act_lr=act_lr, router_lr=router_lr,
                                train_weight_scales=train_weight_scales, traj_samples=traj_samples,
                                traj_steps=traj_steps, seed=seed + CALIB_SEED_OFFSET)
        record = meta.get("finetune") or {}
        if meta.get("talora") or record:  # after lora 'none' too: the record would say only the second run
            how = (f" ({record['iters_done']} iterations, lora {record['lora']!r})"
                   if {"iters_done", "lora"} <= record.keys() else "")
            raise ValueError(f"{path} is already fine-tuned{how}; fine-tune the output of msfp quantize instead")
        fp_model, scheduler = _load_fp_model(model_spec)
        require_base_weights(meta, fp_model, path, f"--model {model_spec!r}")
        fp_model.to(device)
        qmodel = load_quantized(path, freeze=False).to(device)  # finetune() puts the full-precision weights back
        try:
            result = finetune(qmodel, fp_model, scheduler, config, work_dir=work_dir, resume=resume,
                              max_minutes=max_minutes)
        except KeyboardInterrupt:  # on a line of its own: the progress bar leaves the cursor mid-line
            kept = "run the same command with --resume to continue from its last checkpoint" if (
                work_dir / STATE_NAME).is_file() else "it had written no checkpoint yet"
            click.echo(f"\ninterrupted: {path} is unchanged; {kept}", err=True)
            raise
        if result.stopped_early:
            click.echo(f"stopped at iteration {result.iters_done}/{iters} (time budget); {path} is unchanged; "
                       "run the same command with --resume to continue")
            return
        save_quantized(qmodel, path)
        shutil.rmtree(work_dir)  # the run is complete: nothing in it is left to resume
    click.echo(describe(read_quant_meta(path)))
    tail = result.losses[-20:]
    click.echo(f"fine-tuned {result.iters_done} iterations in {result.seconds:.0f} s, final loss "
               f"{sum(tail) / len(tail):.4g}; wrote {path}")


if __name__ == "__main__":
    main()
