"""``msfp compare``: every method on one model, the same seeds, one report (``results.json`` and ``index.html``).

A *method* is a name in :data:`METHODS` mapping to a function that builds the model to evaluate from the
full-precision one (:func:`register_method` adds more, e.g. fine-tuned variants). For each method the run

1. builds the model (PTQ presets: :func:`msfp.quantize` + :func:`msfp.calibrate`; the calibration trajectories and
   layer inputs are cached in ``OUT/cache`` and shared by all presets);
2. measures the noise-prediction MSE against the full-precision model on held-out trajectory points, per timestep;
3. samples ``num_samples`` images (image ``i`` from seed ``seed + i``, identical for every method) into
   ``OUT/samples/NAME.npz`` and a PNG grid, and evaluates them as ``msfp eval`` does, paired with the
   full-precision samples.

Seeds (``msfp.samples.CALIB_SEED_OFFSET``, ``HELDOUT_SEED_OFFSET``): samples ``seed + i``; calibration trajectories
``seed + 10000 + i``; held-out points ``seed + 20000 + i``, so
no method is evaluated on the trajectories it was calibrated on (hence at most 10000 images and calibration
trajectories).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from msfp.attention import counting_flops
from msfp.calibration import Trajectories, cached_trajectories, calibrate, collect_trajectories
from msfp.checkpoint import freeze_weights, quant_meta
from msfp.checks import whole_number
from msfp.conditioning import model_cond, require_unconditional
from msfp.config import PRESETS, QuantConfig
from msfp.environment import machine_info
from msfp.evaluation import (INCEPTION_METRICS, check_reference, eps_mse_means, evaluate, load_reference,
                             per_timestep_eps_mse)
from msfp.fileio import atomic_directory, check_replaceable, exclusive_run, link_entry, write_json
from msfp.finetune import FinetuneConfig, FinetuneDivergedError, finetune
from msfp.identity import code_digest, differences, model_key, plain_config
from msfp.info import format_table, layer_rows, low_bit_fractions
from msfp.models import denoise, load_model
from msfp.samples import (CALIB_SEED_OFFSET, HELDOUT_SEED_OFFSET, NonFiniteSamplesError, generate, grid_path,
                          load_samples)
from msfp.sampling import sample_shape_of
from msfp.surgery import quant_layers, quantize
from msfp.torchao_baselines import RECIPES, quantize_torchao, unavailable_reason

REFERENCE_METHOD = "fp"
PROGRESS_NAME = "progress.json"
DEFAULT_METHODS = ("fp", "w4a4-int", "w4a4-fp", "w4a4-msfp", "w4a4-msfp+talora", "w6a6-msfp", "torchao-mxfp4",
                   "torchao-nvfp4")


@dataclass
class CompareSettings:
    model: str = "default"
    num_samples: int = 160
    steps: int = 20
    calib_samples: int = 64
    calib_steps: int = 25
    heldout_samples: int = 16
    #: fine-tuned methods: iterations, batch, LoRAs (TALoRA) and rank; teacher = the calibration trajectories
    finetune_iters: int = 160
    finetune_batch: int = 8
    num_loras: int = 4
    rank: int = 4
    seed: int = 0
    batch_size: int = 128
    device: str | None = None

    def __post_init__(self):
        # Checked before any work: a bad fine-tuning batch would otherwise fail only after the PTQ methods ran.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                setattr(self, f.name, whole_number(f"CompareSettings.{f.name}", value, None if f.name == "seed" else 1))
        # Image i has seed + i, calibration trajectory i seed + CALIB_SEED_OFFSET + i, held-out trajectory i
        # seed + HELDOUT_SEED_OFFSET + i: more would evaluate on (or calibrate with) another range's noise.
        limits = dict(num_samples=(CALIB_SEED_OFFSET, " (for larger sample sets, use msfp sample and msfp eval)"),
                      calib_samples=(HELDOUT_SEED_OFFSET - CALIB_SEED_OFFSET, ""))
        for name, (limit, instead) in limits.items():
            if getattr(self, name) > limit:
                raise ValueError(f"CompareSettings.{name} must be <= {limit}, got {getattr(self, name)}: the images, "
                                 "calibration and held-out trajectories draw their noise from seeds "
                                 f"{CALIB_SEED_OFFSET} apart, so more would share the next range's noise{instead}")


@dataclass
class Context:
    """What a method's build function gets: the full-precision model and scheduler, the settings, the shared
    calibration cache, the held-out trajectory points (for evaluation only: never train or calibrate on them) and
    whether to show progress bars."""

    fp_model: nn.Module
    scheduler: object
    settings: CompareSettings
    cache_dir: Path
    heldout: Trajectories
    disable: bool = False
    #: the full-precision trajectories fine-tuned methods distil from: the calibration's (read by the first)
    teacher: Trajectories | None = None


@dataclass
class Built:
    """A method's model and what is known about it: calibration time and breakdown (``seconds`` and
    ``finetune_seconds`` fill the table; ``points``, ``trajectory_seconds`` and ``record_seconds`` the report's note
    on the shared cache), the per-layer table (:func:`msfp.info.layer_rows` rows), the AALs (name and reason; None
    where the method detects none), the fractions of weights and FLOPs at 4 bits (:func:`msfp.info.low_bit_fractions`)
    and free-form notes."""

    model: nn.Module
    calibration: dict | None = None
    layers: list[dict] | None = None
    aals: list[dict] | None = None
    low_bit: dict | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Method:
    name: str
    description: str
    build: Callable[[Context], Built]
    #: returns why the method cannot run here (the report lists it as skipped), or None
    unavailable: Callable[[], str | None] = lambda: None


METHODS: dict[str, Method] = {}


_METHOD_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._+-]*[A-Za-z0-9_+-])?")
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"{port}{n}" for port in ("com", "lpt") for n in range(10))}


def register_method(name: str, build: Callable[[Context], Built], description: str,
                    unavailable: Callable[[], str | None] | None = None) -> Method:
    """Make ``name`` usable in ``msfp compare --methods``; ``build(context) -> Built``.

    A resumed compare reuses the result an interrupted run had for ``name`` only if ``description`` is the same:
    describe what the method does (its settings), so that a changed method is run again."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    # The name is a file name too (OUT/samples/NAME.npz), so only characters that are safe in file names on every
    # system: "../../x" would write beside OUT, "a/b" into a subfolder, "D:x" on Windows onto another drive, and
    # "con" or "NUL.x" on Windows opens a device instead of a file, and Windows drops a trailing '.'.
    if not _METHOD_NAME.fullmatch(name) or name.split(".")[0].casefold() in _WINDOWS_DEVICES:
        raise ValueError(f"method names must start with a letter or digit, hold only letters, digits, '.', '_', '+' "
                         f"and '-', not end with '.', and not be a Windows device name such as 'con' or 'nul' (they "
                         f"name the files OUT/samples/NAME.npz), got {name!r}")
    # "FP" would write over fp's samples where file names ignore case.
    same_file = next((m for m in METHODS if m.casefold() == name.casefold()), None)
    if same_file is not None:
        raise ValueError(f"method {name!r} differs from {same_file!r} only in case: where file names ignore case, "
                         "their samples would be one file")
    METHODS[name] = Method(name, description, build, unavailable or (lambda: None))
    return METHODS[name]


def summarize_quantized(qmodel: nn.Module) -> dict:
    """``layers``, ``aals`` and ``low_bit`` of a calibrated msfp model, from the metadata :func:`msfp.save_quantized`
    writes (so the report shows exactly what ``msfp info`` would)."""
    meta = quant_meta(qmodel)
    aals = [dict(name=name, reason=info["aal_reason"]) for name, info in meta["layers"].items() if info.get("aal")]
    return dict(layers=layer_rows(meta), aals=aals, low_bit=low_bit_fractions(meta))


def build_ptq(ctx: Context, preset: str | QuantConfig) -> Built:
    """Quantize a copy of the full-precision model with ``preset`` and calibrate it (shared cache)."""
    s = ctx.settings
    qmodel = quantize(copy.deepcopy(ctx.fp_model), preset)
    start = time.time()
    report = calibrate(qmodel, ctx.fp_model, ctx.scheduler, num_samples=s.calib_samples, num_steps=s.calib_steps,
                       seed=s.seed + CALIB_SEED_OFFSET, batch_size=s.batch_size, cache_dir=ctx.cache_dir,
                       disable=ctx.disable)
    calibration = dict(seconds=time.time() - start, points=report.num_points,
                       trajectory_seconds=report.trajectory_seconds, record_seconds=report.record_seconds,
                       search_seconds=report.search_seconds, cached=report.cached)
    return Built(qmodel, calibration=calibration, **summarize_quantized(qmodel))


def four_bit_layers(fp_model: nn.Module) -> list[str]:
    """The layers msfp's default policy puts at 4 bits (all but the first/last conv and the timestep MLP)."""
    return [name for name, layer in quant_layers(quantize(copy.deepcopy(fp_model), "w4a4-msfp")).items()
            if layer.precision == "4bit"]


@torch.no_grad()
def _flops_by_layer(model: nn.Module, ctx: Context) -> tuple[dict[str, int], int]:
    """FLOPs of one sample's forward per module name, and in total (convs, matmuls, attention)."""
    x, t, cond = next(ctx.heldout.batches(1))
    first = next(model.parameters())
    with counting_flops(model) as counter:
        denoise(model, x.to(first.device, first.dtype), t.to(first.device),
                **model_cond(cond, first.device, first.dtype))
    prefix = type(model).__name__ + "."
    per = {k[len(prefix):]: sum(v.values()) for k, v in counter.get_flop_counts().items() if k.startswith(prefix)}
    return per, int(counter.get_total_flops())


def build_torchao(ctx: Context, recipe: str) -> Built:
    """torchao's emulated W4A4 ``recipe`` on the layers msfp puts at 4 bits; the other layers stay full precision."""
    names = four_bit_layers(ctx.fp_model)
    model, skipped = quantize_torchao(copy.deepcopy(ctx.fp_model), recipe, names)
    done = [n for n in names if n not in skipped]
    flops, total = _flops_by_layer(model, ctx)
    modules = dict(model.named_modules())
    layers = [dict(name=n, kind=type(modules[n].module).__name__.lower(), bits="4bit", weight=recipe, act=recipe,
                   aal="n/a") for n in done]
    low_bit = dict(layers=len(names), layers_4bit=len(done),
                   weights_4bit=sum(modules[n].module.weight.numel() for n in done)
                   / sum(p.numel() for p in ctx.fp_model.parameters()),
                   flops_4bit=sum(flops.get(n, 0) for n in done) / total)
    notes = [f"{RECIPES[recipe]}, torchao's emulated path (dequantize, then a full-precision conv/matmul); dynamic "
             "activation scales, no calibration. First/last conv and timestep MLP stay full precision (msfp keeps "
             "them at 8 bits)."]
    if recipe == "nvfp4":
        notes.append("msfp takes NVFP4's per-tensor activation scale per sample, so that an image does not depend on "
                     "the others in its batch; torchao's dynamic recipe takes it over the whole batch.")
    notes += [f"{n} stays full precision: {why}" for n, why in skipped.items()]
    return Built(model, layers=layers, low_bit=low_bit, notes=notes)  # (no AALs detected: aals None)


def build_finetuned(ctx: Context, preset: str, lora: str, loss: str, dfa_weighting: str = "abs",
                    per_timestep_scales: bool = False) -> Built:
    """PTQ with ``preset``, then :func:`msfp.finetune` distilling from the calibration trajectories."""
    s = ctx.settings
    config = QuantConfig.preset(preset)
    if per_timestep_scales:
        config.act_timestep_groups = s.steps  # one activation scale per sampling step (uniform DDIM spacing)
    built = build_ptq(ctx, config)
    ft_config = FinetuneConfig(iters=s.finetune_iters, batch_size=s.finetune_batch, lora=lora,
                               num_loras=s.num_loras, rank=s.rank, loss=loss, dfa_weighting=dfa_weighting,
                               traj_samples=s.calib_samples, traj_steps=s.calib_steps,
                               seed=s.seed + CALIB_SEED_OFFSET)
    if ctx.teacher is None:  # the calibration's own trajectories (the same call): read from the shared cache
        ctx.teacher, _ = cached_trajectories(ctx.fp_model, ctx.scheduler, s.calib_samples, s.calib_steps,
                                             seed=ft_config.seed, batch_size=s.batch_size, cache_dir=ctx.cache_dir,
                                             disable=ctx.disable)
    try:
        result = finetune(built.model, ctx.fp_model, ctx.scheduler, ft_config, teacher=ctx.teacher,
                          disable=ctx.disable)
    except FinetuneDivergedError as e:  # its advice (learning rates, checkpoints) is for msfp finetune's options
        raise FloatingPointError(f"{e.what}; compare fine-tunes at msfp finetune's default learning rates: try "
                                 "`msfp finetune` with a lower --lr or --act-lr, or fewer --finetune-iters") from e
    calibration = dict(built.calibration, finetune_seconds=result.seconds,
                       finetune_final_loss=sum(result.losses[-20:]) / len(result.losses[-20:]))
    note = (f"fine-tuned {result.iters_done} iterations × batch {s.finetune_batch}: lora={lora}"
            + (f" (K={s.num_loras})" if lora == "talora" else "") + f", rank {s.rank}, loss={loss}"
            + (f" ({dfa_weighting})" if loss == "dfa" else "")
            + (", per-timestep activation scales" if per_timestep_scales else ""))
    return Built(built.model, calibration=calibration, notes=[note], **summarize_quantized(built.model))


# The fine-tuned rows of the paper's ablation (SPEC §3), named after what they add to a PTQ preset.
FINETUNED = {
    "int4-efficientdm": (dict(preset="w4a4-int", lora="single", loss="mse", per_timestep_scales=True),
                         "EfficientDM-style: INT4 + one LoRA + per-timestep activation scales + MSE"),
    "w4a4-fp+lora-mse": (dict(preset="w4a4-fp", lora="single", loss="mse"), "signed FP4 + one LoRA + MSE"),
    "w4a4-msfp+lora-mse": (dict(preset="w4a4-msfp", lora="single", loss="mse"), "MSFP + one LoRA + MSE"),
    "w4a4-msfp+talora-mse": (dict(preset="w4a4-msfp", lora="talora", loss="mse"), "MSFP + TALoRA + MSE"),
    "w4a4-msfp+talora": (dict(preset="w4a4-msfp", lora="talora", loss="dfa"), "MSFP + TALoRA + DFA |γ| (the method)"),
    "w4a4-msfp+talora-dfa2": (dict(preset="w4a4-msfp", lora="talora", loss="dfa", dfa_weighting="square"),
                              "MSFP + TALoRA + DFA γ²"),
    "w4a4-msfp+talora-tscales": (dict(preset="w4a4-msfp", lora="talora", loss="dfa", per_timestep_scales=True),
                                 "MSFP + TALoRA + DFA |γ| + per-timestep activation scales"),
}

register_method(REFERENCE_METHOD, lambda ctx: Built(ctx.fp_model), "full precision (the reference)")
for _preset in PRESETS:
    register_method(_preset, lambda ctx, p=_preset: build_ptq(ctx, p), f"msfp PTQ, preset {_preset}")
for _recipe in RECIPES:
    register_method(f"torchao-{_recipe}", lambda ctx, r=_recipe: build_torchao(ctx, r),
                    f"torchao {RECIPES[_recipe]} W4A4, emulated", lambda r=_recipe: unavailable_reason(r))
for _name, (_kwargs, _description) in FINETUNED.items():
    register_method(_name, lambda ctx, kw=_kwargs: build_finetuned(ctx, **kw), _description)
#: the built-in methods that fine-tune nothing (a registered method may read the fine-tuning settings)
UNTUNED_METHODS = frozenset(METHODS) - frozenset(FINETUNED)
#: the built-in methods without TALoRA's LoRAs (num_loras), and those that calibrate nothing (calib_samples)
UNROUTED_METHODS = UNTUNED_METHODS | {name for name, (kwargs, _) in FINETUNED.items() if kwargs["lora"] != "talora"}
UNCALIBRATED_METHODS = frozenset({REFERENCE_METHOD, *(f"torchao-{recipe}" for recipe in RECIPES)})


def parse_methods(text: str | None) -> list[str]:
    """Method names from ``"a,b,c"`` (None: :data:`DEFAULT_METHODS`), the reference ``fp`` first; clear errors."""
    names = list(DEFAULT_METHODS) if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if not names:  # "" ran the reference alone
        raise ValueError(f"no method names in {text!r}: list them separated by commas, or leave the list out for the "
                         "defaults")
    return check_methods(names)


def check_methods(names) -> list[str]:
    """``names``, registered methods each listed once, with the reference ``fp`` first; clear errors."""
    if isinstance(names, str) or not names:
        raise ValueError(f"expected a non-empty list of method names, got {names!r} (parse_methods('a,b') makes one)")
    # Case ignored, as for presets and format names; register_method keeps names unique regardless of case.
    spelled = {m.casefold(): m for m in METHODS}
    names = [spelled.get(n.strip().casefold(), n) if isinstance(n, str) else n for n in names]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid methods: {', '.join(METHODS)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"method(s) listed twice: {', '.join(duplicates)}")
    # Paired metrics compare every method with the full-precision samples, so those are always drawn.
    return [REFERENCE_METHOD] + [n for n in names if n != REFERENCE_METHOD]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _reference_digest(reference) -> str:
    h = hashlib.sha256(reference.name.encode())
    for array in (reference.images, *(reference.stats or ())):
        if array is not None:
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def _is_compare_report(out: Path) -> bool:
    """Whether ``out`` holds what :func:`run_compare` writes (``msfp eval --json`` also writes a results.json)."""
    try:
        result = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and {"settings", "seeds", "methods"} <= result.keys()


def _progress(work: Path, fingerprint: dict, resume: bool) -> dict:
    """The methods an interrupted run finished (``resume``), or a fresh start."""
    path = work / PROGRESS_NAME
    if not resume:
        if path.is_file():  # hours of finished methods, perhaps: never discarded without being asked
            raise FileExistsError(f"{work} holds an interrupted run: continue it with --resume, or delete {work} to "
                                  "start over")
        shutil.rmtree(work, ignore_errors=True)  # a run interrupted before its first method finished
        return dict(fingerprint=fingerprint, methods={}, skipped={}, descriptions={})
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); delete {work} to start over") from e
    if not (isinstance(progress, dict) and all(isinstance(progress.get(k), dict)
                                               for k in ("fingerprint", "methods", "skipped"))):
        raise ValueError(f"{path} is damaged (not the record msfp compare writes); delete {work} to start over")
    fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as JSON reads it back
    unrecorded = [k for k in fingerprint if k not in progress["fingerprint"]]
    if unrecorded:
        raise ValueError(f"{work} holds a run of an earlier msfp, which did not record its {', '.join(unrecorded)}: "
                         f"resuming it could mix results; delete {work} to start over")
    recorded = progress["fingerprint"]
    differ = [k for k in fingerprint if recorded.get(k) != fingerprint[k]]
    if differ:
        # Which fields: an option, a thread count (OMP_NUM_THREADS) or an installed package can be put back to resume,
        # where "delete" would throw away hours of finished methods.
        for i, k in enumerate(differ):
            if isinstance(recorded[k], dict) and isinstance(fingerprint[k], dict):
                was, now = _flat(recorded[k]), _flat(fingerprint[k])
                differ[i] = f"{k} ({'; '.join(differences(was, now, sorted(was.keys() | now.keys())))})"
        raise ValueError(f"{work} holds a run that differs in {', '.join(differ)}: resuming it would mix results; "
                         f"resume it as it ran, or delete {work} to start over")
    if not isinstance(progress.setdefault("descriptions", {}), dict):
        raise ValueError(f"{path} is damaged (not the record msfp compare writes); delete {work} to start over")
    return progress


def _flat(record: dict, prefix: str = "") -> dict:
    """``{"versions": {"torch": v}}`` as ``{"versions.torch": v}``."""
    flat = {}
    for k, v in record.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _kept_files(work: Path, result: dict) -> bool:
    """Whether a finished method's sample file and grid are still in ``work``, readable."""
    try:
        load_samples(work / result["samples"])
    except (OSError, ValueError):
        return False
    return (work / result["grid"]).is_file()


def _samples_path(work: Path, method: str) -> Path:
    return work / "samples" / f"{method}.npz"


def _run_method(ctx: Context, method: Method, work: Path, reference, device: torch.device) -> dict:
    """Build, sample and evaluate one method; its samples go to ``work/samples/``."""
    s, name = ctx.settings, method.name
    built = method.build(ctx)
    if getattr(built.model, "msfp_config", None) is not None:
        # Evaluation only runs the model: quantize its weights once instead of on every call (same outputs).
        freeze_weights(built.model)
    eps = None if name == REFERENCE_METHOD else per_timestep_eps_mse(built.model, ctx.heldout, device, s.batch_size)
    path = _samples_path(work, name)
    samples = generate(built.model, ctx.scheduler, path, s.num_samples, s.steps, seed=s.seed, batch_size=s.batch_size,
                       meta=dict(model=s.model, method=name), disable=ctx.disable, device=device)
    fp_samples = _samples_path(work, REFERENCE_METHOD)
    evaluation = evaluate(path, reference, paired_path=None if name == REFERENCE_METHOD else fp_samples,
                          device=device)
    # Not "no --paired samples given" / "no --inception-weights given": compare has neither option.
    if name == REFERENCE_METHOD:
        evaluation["skipped"]["psnr, paired_mse"] = "the reference the other methods are paired with"
    evaluation["skipped"][INCEPTION_METRICS] = ("msfp compare computes none; `msfp eval OUT/samples/METHOD.npz "
                                                "--inception-weights FILE`, with compare's --ref/--ref-images, "
                                                "adds them")
    mean, weighted, why_not = (None, None, None) if eps is None else eps_mse_means(eps, ctx.scheduler)
    if why_not is not None:
        evaluation["skipped"]["eps_mse_mean, eps_mse_weighted"] = why_not
    return dict(
        description=method.description, metrics=evaluation["metrics"], skipped_metrics=evaluation["skipped"],
        eps_mse_mean=mean, eps_mse_weighted=weighted, eps_mse_per_timestep=eps,
        fd_bootstrap=evaluation["fd_bootstrap"],
        calibration=built.calibration, sample_seconds=samples["meta"]["sample_time_s"], low_bit=built.low_bit,
        layers=built.layers, aals=built.aals, notes=built.notes,
        samples=str(path.relative_to(work)), grid=str(grid_path(path).relative_to(work)))


def run_compare(settings: CompareSettings, methods: list[str], out, command: str | None = None, reference=None,
                disable: bool = False, resume: bool = False) -> dict:
    """Run ``methods`` (see :func:`parse_methods`) and write ``out/results.json``, ``out/index.html`` and
    ``out/samples/``; returns the results. ``reference`` is a :class:`msfp.evaluation.Reference` (default:
    Fashion-MNIST test split).

    The run works beside ``out`` (``.OUT.compare/``), recording each finished method, and replaces ``out``'s results
    only when every method is done (``out/cache/`` and other files there are kept). ``resume`` continues an
    interrupted run: the methods it finished are reused if the settings, model, reference and machine are the same.
    Another compare writing the same ``out`` at the same time is refused.
    """
    methods = check_methods(methods)  # before any work: an unknown name used to stop the run after the reference
    out = Path(out).resolve()  # "." has no name to put the work directory beside
    with exclusive_run(out, "msfp compare"):
        return _run_compare(settings, methods, out, command, reference, disable, resume)


def _run_compare(settings: CompareSettings, methods: list[str], out: Path, command: str | None, reference,
                 disable: bool, resume: bool) -> dict:
    from msfp.report import write_report

    began = time.time()
    # OUT is replaced as a whole at the end: never a directory that holds something else (its cache may be there).
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the output of msfp compare is a directory: choose another --out")
    if out.exists() and not _is_compare_report(out) and any(p.name != "cache" for p in out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a msfp compare report (it has no results.json written by msfp "
                              "compare); refusing to replace it: choose another --out")
    check_replaceable(out)  # before the work, which may take long
    work = out.parent / f".{out.name}.compare"
    s = settings
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fp_model, scheduler = load_model(s.model)
    require_unconditional(fp_model, s.model)  # compare draws unconditional samples
    fp_model.to(device)
    reference = reference if reference is not None else load_reference()
    channels, *size = sample_shape_of(fp_model)
    check_reference(reference, (*size, channels))  # before the sampling, which may take hours
    fingerprint = dict(settings=dataclasses.asdict(s), model=model_key(fp_model, {}),
                       scheduler=plain_config(scheduler.config),
                       reference=_reference_digest(reference), machine=machine_info(device), code=code_digest())
    progress = _progress(work, fingerprint, resume)
    earlier = progress.get("seconds", 0.0)  # spent by the sessions an interrupted run had before this one
    work.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails here, not after the first method
    _log(f"held-out points: {s.heldout_samples} full-precision trajectories x {s.calib_steps} steps")
    heldout = collect_trajectories(fp_model, scheduler, s.heldout_samples, s.calib_steps,
                                   seed=s.seed + HELDOUT_SEED_OFFSET, batch_size=s.batch_size, disable=disable)
    ctx = Context(fp_model, scheduler, s, out / "cache", heldout, disable)
    results, skipped = {}, {}
    try:
        for k, name in enumerate(methods, 1):
            method = METHODS[name]
            stale = None
            if name in progress["methods"] and not _kept_files(work, progress["methods"][name]):
                stale = "its files from the interrupted run are missing or damaged"
            elif ((name in progress["methods"] or name in progress["skipped"])
                  and progress["descriptions"].get(name) != method.description):
                # msfp's own methods are in the code digest; a registered one is known by its description only.
                stale = (f"the interrupted run ran it as {progress['descriptions'].get(name)!r}, it is registered as "
                         f"{method.description!r} now")
            if stale is not None:
                _log(f"[{k}/{len(methods)}] {name}: {stale}: run again")
                path = _samples_path(work, name)  # generate() replaces a sample file, never a damaged one
                for damaged in (path, grid_path(path)):
                    damaged.unlink(missing_ok=True)
                progress["methods"].pop(name, None)
                progress["skipped"].pop(name, None)
            reason = method.unavailable()
            if reason is not None:
                _log(f"[{k}/{len(methods)}] {name}: skipped ({reason})")
                skipped[name] = reason
            elif name in progress["methods"] or name in progress["skipped"]:
                _log(f"[{k}/{len(methods)}] {name}: finished by the interrupted run, reused")
                if name in progress["methods"]:
                    results[name] = progress["methods"][name]
                else:
                    skipped[name] = progress["skipped"][name]
            else:
                _log(f"[{k}/{len(methods)}] {name}: {method.description}")
                try:
                    results[name] = progress["methods"][name] = _run_method(ctx, method, work, reference, device)
                except (NonFiniteSamplesError, FloatingPointError) as e:  # samples, or fine-tuning
                    if name == REFERENCE_METHOD:
                        raise
                    # A diverged method is a finding, not a reason to lose the other methods' results. The reason is
                    # published: it names OUT, not the work directory that is removed at the end.
                    reason = f"no result: {e}".replace(str(work), str(out))
                    _log(f"[{k}/{len(methods)}] {name}: {reason}")
                    skipped[name] = progress["skipped"][name] = reason
                progress["descriptions"][name] = method.description
                progress["seconds"] = round(earlier + time.time() - began, 1)
                write_json(work / PROGRESS_NAME, progress)
    except BaseException:
        if progress["methods"]:
            # On a line of its own: an interrupted progress bar leaves the cursor mid-line.
            _log(f"\nthe methods finished so far are kept in {work}: run the same command with --resume to continue")
        raise
    result = dict(
        command=command, settings=dataclasses.asdict(s), device=str(device),
        seeds=dict(samples=f"{s.seed}..{s.seed + s.num_samples - 1}",
                   calibration=f"{s.seed + CALIB_SEED_OFFSET}..{s.seed + CALIB_SEED_OFFSET + s.calib_samples - 1}",
                   heldout=f"{s.seed + HELDOUT_SEED_OFFSET}..{s.seed + HELDOUT_SEED_OFFSET + s.heldout_samples - 1}"),
        reference=reference.name, machine=fingerprint["machine"], methods=results, skipped_methods=skipped,
        wall_seconds=None)
    result["wall_seconds"] = round(earlier + time.time() - began, 1)  # the sessions of a resumed run together
    try:
        write_json(work / "results.json", result)
        write_report(result, work)
        with atomic_directory(out) as tmp:
            # Not moved: if the swap fails, --resume still finds every sample. Only the listed methods' samples: an
            # interrupted run may have finished methods this command does not list.
            for rel in ("results.json", "index.html",
                        *(r[key] for r in results.values() for key in ("samples", "grid"))):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                link_entry(work / rel, tmp / rel)
    except BaseException:
        _log(f"\nevery method finished, and is kept in {work}: run the same command with --resume to publish the "
             "report without running them again")
        raise
    # The record first: a kill during the removal leaves no run to resume, only files the next run clears.
    (work / PROGRESS_NAME).unlink()
    shutil.rmtree(work)
    return result


# (key, header, format) of the metrics table, in column order.
TABLE_COLUMNS = (
    ("fd", "FD↓", "{:.1f}"), ("kid", "KID↓", "{:.0f}"), ("classifier_score", "cls score↑", "{:.2f}"),
    ("precision", "prec.↑", "{:.2f}"), ("recall", "recall↑", "{:.2f}"), ("psnr", "PSNR vs fp↑", "{:.1f}"),
    ("eps_mse_mean", "eps MSE vs fp↓", "{:.2e}"), ("eps_mse_weighted", "γ²-wtd eps MSE↓", "{:.2e}"),
    ("calibration_seconds", "calib. s", "{:.1f}"),
    ("finetune_seconds", "finetune s", "{:.0f}"),
    ("sample_seconds", "sample s", "{:.1f}"), ("weights_4bit", "W 4-bit %", "{:.1%}"),
    ("flops_4bit", "FLOPs 4-bit %", "{:.1%}"),
)


def table_rows(result: dict) -> list[dict]:
    """One dict per method: the values of :data:`TABLE_COLUMNS` (None where not applicable)."""
    rows = []
    for name, r in result["methods"].items():
        values = dict(r["metrics"], eps_mse_mean=r["eps_mse_mean"], eps_mse_weighted=r.get("eps_mse_weighted"),
                      sample_seconds=r["sample_seconds"],
                      calibration_seconds=(r["calibration"] or {}).get("seconds"),
                      finetune_seconds=(r["calibration"] or {}).get("finetune_seconds"), **(r["low_bit"] or {}))
        if values.get("paired_mse") == 0:  # identical images: PSNR inf, which JSON (results, a resumed row) holds as null
            values["psnr"] = math.inf
        rows.append(dict(method=name, **{key: values.get(key) for key, _, _ in TABLE_COLUMNS}))
    return rows


def format_cell(key: str, value) -> str:
    fmt = {k: f for k, _, f in TABLE_COLUMNS}[key]
    return "—" if value is None else fmt.format(value).replace("%", "")


def skipped_metrics(result: dict) -> list[tuple[str, str, str]]:
    """``(metrics, methods, why)`` for each metric not computed, listed once for all methods it applies to (e.g. no
    Inception weights)."""
    skipped: dict[tuple[str, str], list[str]] = {}
    for name, r in result["methods"].items():
        for keys, why in r["skipped_metrics"].items():
            skipped.setdefault((keys, why), []).append(name)
    return [(keys, "all methods" if len(names) == len(result["methods"]) else ", ".join(names), why)
            for (keys, why), names in skipped.items()]


def metrics_table(result: dict) -> str:
    """The metrics table as aligned text (what ``msfp compare`` prints)."""
    headers = ["method"] + [h for _, h, _ in TABLE_COLUMNS]
    rows = [{"method": r["method"], **{h: format_cell(k, r[k]) for k, h, _ in TABLE_COLUMNS}}
            for r in table_rows(result)]
    return format_table(rows, headers)
