"""``msfp.finetune``: data-free distillation of a calibrated quantized model with TALoRA and the DFA loss.

The full-precision teacher samples its own DDIM trajectories once (cached in ``work_dir``); every visited
``(x_t, t, cond, ε_teacher)`` is a training point, and mixed-timestep batches of them train the student's LoRAs
(merged before weight quantization), the shared timestep router and the activation quantizers' scales and zero
points (weight scales optionally). The loss is the MSE between student and teacher noise predictions, weighted per
timestep by the sampler's denoising factor (DFA) or not (plain MSE).

Runs are deterministic for a seed on the CPU, write an atomic checkpoint every ``checkpoint_every`` iterations, and
``resume=True`` continues bit-exactly where the last checkpoint stopped. (On CUDA, whose convolution kernels are not
deterministic by default, two runs may differ: one ulp can move a value across a 4-bit rounding boundary.) A
non-finite loss stops the run with a clear error and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from msfp.attention import attention_quantizers
from msfp.calibration import Trajectories, collect_trajectories, trajectory_key
from msfp.checks import whole_number
from msfp.conditioning import check_conditioning, model_cond, select
from msfp.environment import machine_info
from msfp.fileio import atomic_path
from msfp.fp8 import require_fake_quant
from msfp.identity import differences, model_key, plain_config, weights_digest
from msfp.info import finetune_runs
from msfp.kernels import fused_rounding_exact
from msfp.losses import WEIGHTINGS, dfa_weights, factor_per_timestep, weighted_mse
from msfp.models import SCHEDULE_KEYS, denoise
from msfp.quantizers import MIN_SCALE, named_quantizers
from msfp.surgery import quant_layers, set_fused_rounding
from msfp.talora import add_talora, lora_counts, remove_talora

STATE_NAME = "finetune_state.pt"
TEACHER_NAME = "teacher_trajectories-{key}.safetensors"
TEACHER_BATCH = 64  # trajectories sampled per teacher call: it orders the points, so their file is keyed on it


class FinetuneDivergedError(FloatingPointError):
    """The loss, gradients or trained parameters became non-finite; ``what`` says which, and when."""

    def __init__(self, what: str, kept: str):
        super().__init__(f"{what}; {kept}; lower the learning rates")
        self.what, self.kept = what, kept

    def __reduce__(self):  # rebuilt from its two parts (pickled to another process, copied), not from the message
        return type(self), (self.what, self.kept)


@dataclass
class FinetuneConfig:
    iters: int = 400
    batch_size: int = 16
    #: "talora" (num_loras LoRAs + router), "single" (one LoRA) or "none" (quantizer parameters only)
    lora: str = "talora"
    num_loras: int = 4
    rank: int = 4
    #: "dfa" (loss weighted by the denoising factor) or "mse"
    loss: str = "dfa"
    #: DFA weight: "abs" (|γ_t|) or "square" (γ_t²), normalised to mean 1 over the trajectory
    dfa_weighting: str = "abs"
    #: LoRA learning rate of a layer whose weight step size is the median; scaled by each layer's step size
    lora_lr: float = 1e-3
    act_lr: float = 1e-4
    router_lr: float = 1e-3
    train_weight_scales: bool = False
    grad_clip: float = 1.0
    traj_samples: int = 64
    traj_steps: int = 25
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        if self.lora not in ("talora", "single", "none"):
            raise ValueError(f"FinetuneConfig.lora must be 'talora', 'single' or 'none', got {self.lora!r}")
        if self.loss not in ("dfa", "mse"):
            raise ValueError(f"FinetuneConfig.loss must be 'dfa' or 'mse', got {self.loss!r}")
        if self.dfa_weighting not in WEIGHTINGS or self.dfa_weighting == "none":
            raise ValueError(f"FinetuneConfig.dfa_weighting must be 'abs' or 'square', got {self.dfa_weighting!r}")
        for name in ("iters", "batch_size", "num_loras", "rank", "traj_samples", "traj_steps", "checkpoint_every"):
            setattr(self, name, whole_number(f"FinetuneConfig.{name}", getattr(self, name), 1))
        self.seed = whole_number("FinetuneConfig.seed", self.seed)
        for name in ("lora_lr", "act_lr", "router_lr", "grad_clip"):
            value = getattr(self, name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value >= 0) or (name == "grad_clip" and value == 0):
                raise ValueError(f"FinetuneConfig.{name} must be a finite number "
                                 f"{'> 0' if name == 'grad_clip' else '>= 0'}, got {value}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    iters_done: int
    losses: list[float]
    seconds: float
    stopped_early: bool


def _warn_about_idle_loras(qmodel, timesteps: torch.Tensor) -> None:
    """TALoRA's router starts by splitting [0, num_train_timesteps) into K intervals: a LoRA whose interval holds no
    teacher timestep is not trained at first (few trajectory steps; or a scheduler passing other timesteps, such as
    EDM's or Euler's continuous ones, where every step went to LoRA 0 without a word)."""
    counts = lora_counts(qmodel, timesteps.unique())
    if counts is not None and 0 in counts:
        n = qmodel.msfp_context.num_train_timesteps
        warnings.warn(f"TALoRA: the teacher's timesteps ({timesteps.min().item():g} to {timesteps.max().item():g}) "
                      f"fall in {len(counts) - counts.count(0)} of the router's {len(counts)} initial intervals of "
                      f"[0, {n}): the other LoRAs start untrained; use more trajectory steps, fewer LoRAs, or a "
                      f"scheduler whose timesteps span [0, {n})", stacklevel=3)


def _trainable_groups(qmodel, config: FinetuneConfig) -> list[dict]:
    layers = quant_layers(qmodel)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    groups = []
    quantizers = [layer.act_quantizer for layer in layers.values()]
    quantizers += [q.act_quantizer for q in attention_quantizers(qmodel).values()]  # quantized attention inputs
    act = [p for q in quantizers for p in (q.scale, q.zero_point)]
    groups.append(dict(params=act, lr=config.act_lr, name="act_quantizers"))
    if config.train_weight_scales:
        groups.append(dict(params=[layer.weight_quantizer.scale for layer in layers.values()], lr=config.act_lr,
                           name="weight_scales"))
    if config.lora != "none":
        # Scale-aware LoRA steps (EfficientDM): a layer with a finer weight grid takes proportionally smaller steps.
        # The step measure is the quantizer's scale (the grid's unit), not the spacing of its levels, which differs
        # between formats of one range (E3M0's scale is a quarter of E1M2's): rates are comparable within a format.
        steps = {n: layer.weight_quantizer.scale.detach().abs().mean().item() for n, layer in layers.items()}
        median = sorted(steps.values())[len(steps) // 2] or 1.0
        for name, layer in layers.items():
            groups.append(dict(params=list(layer.lora.parameters()), lr=config.lora_lr * steps[name] / median,
                               name=f"lora:{name}"))
        if qmodel.msfp_router.num_loras > 1:
            groups.append(dict(params=list(qmodel.msfp_router.parameters()), lr=config.router_lr, name="router"))
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def _trainable_state(qmodel) -> dict:
    names = {id(p) for p in qmodel.parameters() if p.requires_grad}
    return {n: p.detach().clone() for n, p in qmodel.named_parameters() if id(p) in names}


def _student_key(qmodel: nn.Module, trained: dict) -> str:
    """What a resumed run must share with the one that wrote the checkpoint: the quantization (config and every
    quantizer's format), the names and shapes of the trained tensors, and the values of everything else. The trained
    values are left out: they come from the checkpoint, and a model interrupted in this process has changed them."""
    settings = dict(config=qmodel.msfp_config.to_dict(),
                    formats={n: q.fmt.name for n, q in named_quantizers(qmodel).items()},
                    trained={n: list(t.shape) for n, t in trained.items()})
    return model_key(qmodel, settings, weights_digest(qmodel, exclude=set(trained)))


def teacher_file_key(request: str, versions: dict) -> str:
    """The key in a teacher file's name: the trajectories asked for (:func:`msfp.calibration.trajectory_key`) and the
    versions that computed them (``machine_info()["versions"]``), so that an upgrade computes them again."""
    return hashlib.sha256(json.dumps([request, versions], sort_keys=True).encode()).hexdigest()[:16]


def _teacher(fp_model, scheduler, config, work_dir, key, cond, class_labels, sample_shape, disable) -> Trajectories:
    # Keyed file name: trajectories of another teacher, scheduler or trajectory setting are never reused.
    path = Path(work_dir) / TEACHER_NAME.format(key=key) if work_dir is not None else None
    if path is not None and path.is_file():
        try:
            return Trajectories.from_tensors(load_file(path))
        except Exception as e:  # a corrupt cache is recomputed, never trusted
            warnings.warn(f"ignoring unreadable teacher trajectories {path} ({type(e).__name__}: {e})", stacklevel=3)
    points = collect_trajectories(fp_model, scheduler, config.traj_samples, config.traj_steps, seed=config.seed,
                                  batch_size=TEACHER_BATCH, cond=cond, class_labels=class_labels,
                                  sample_shape=sample_shape, disable=disable)
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in points.to_tensors().items()}, tmp)
    return points


def _loss_weights(scheduler, config: FinetuneConfig) -> dict[float, float] | None:
    """The DFA loss weight of each timestep a ``traj_steps``-step trajectory visits; None for plain MSE."""
    if config.loss == "mse":
        return None
    timesteps, gammas = factor_per_timestep(scheduler, config.traj_steps, "the DFA loss by; use loss='mse'")
    return dict(zip(timesteps.tolist(), dfa_weights(gammas, config.dfa_weighting).tolist()))


def _point_weights(points: Trajectories, by_t: dict[float, float] | None, scheduler, config: FinetuneConfig
                   ) -> torch.Tensor:
    """Each training point's loss weight from :func:`_loss_weights`' ``by_t``."""
    if by_t is None:
        return torch.ones(len(points))
    visited = set(points.t.tolist())
    missing, unvisited = sorted(visited - set(by_t)), sorted(set(by_t) - visited)
    if missing:
        raise ValueError(f"teacher trajectories visit timesteps {missing[:5]} that a {config.traj_steps}-step "
                         f"{type(scheduler).__name__} trajectory does not")
    if unvisited:  # a shorter teacher's timesteps are among them, but their weights are another step count's
        raise ValueError(f"teacher trajectories never visit timesteps {unvisited[:5]} of a {config.traj_steps}-step "
                         f"{type(scheduler).__name__} trajectory: set traj_steps to the teacher's step count")
    return torch.tensor([by_t[t] for t in points.t.tolist()])


def default_fused_rounding(device: torch.device) -> bool:
    """Fused rounding on CUDA, where it pays for its compilation, if it is exact there with this torch (a warning
    says so when it is not)."""
    if torch.device(device).type != "cuda":
        return False
    exact, why = fused_rounding_exact(device)
    if not exact:
        warnings.warn(f"finetune uses eager rounding: {why}", stacklevel=3)
    return exact


def _restore_full_precision_weights(qmodel: nn.Module, fp_model: nn.Module) -> None:
    """Give every quantized layer ``fp_model``'s weight: LoRAs merge into the full-precision weights (SPEC §2.3), and a
    model from :func:`msfp.load_quantized` holds its dequantized codes instead. A no-op for a model
    :func:`msfp.quantize` returned from ``fp_model``."""
    fp_modules = dict(fp_model.named_modules())
    with torch.no_grad():
        for name, layer in quant_layers(qmodel).items():
            source = getattr(fp_modules.get(name), "weight", None)
            if not isinstance(source, torch.Tensor) or source.shape != layer.weight.shape:
                raise ValueError(f"{name}: fp_model has no weight of shape {tuple(layer.weight.shape)} there; pass the "
                                 "full-precision model the quantized model was made from")
            layer.weight.copy_(source)


def _check_noise_schedule(qmodel: nn.Module, scheduler) -> None:
    """Refuse a teacher scheduler on another noise schedule than the model was calibrated with (and samples with,
    from its checkpoint): its trajectories and DFA weights would be of another process."""
    recorded = getattr(qmodel, "msfp_scheduler_config", None)
    if recorded is None:
        return
    there, here = plain_config(recorded), plain_config(scheduler.config)
    changed = differences(there, here, [k for k in SCHEDULE_KEYS if k in there and k in here])
    if changed:
        raise ValueError(f"the scheduler has another noise schedule than the model was calibrated with "
                         f"({'; '.join(changed)}): fine-tune with the schedule it was calibrated and samples with "
                         "(or quantize again from this model)")


def _read_state(state_path: Path, config: FinetuneConfig) -> dict:
    """The state file a resumed run continues from, checked to be written with ``config``."""
    try:
        # On the CPU first: a state a GPU run wrote resumes anywhere (each tensor then goes to its parameter).
        state = torch.load(state_path, map_location="cpu", weights_only=True)  # no code runs from a file
    except Exception as e:
        # torch's refusal of a global is a page of advice on loading the file anyway, which is not ours to give.
        why = ("it holds objects other than tensors and plain data, which msfp never writes (loading them could run "
               "code)") if "Weights only load failed" in str(e) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{state_path}: cannot read the checkpoint ({why}); delete {state_path.parent} to start "
                         "over") from e
    wanted = config.to_dict()
    if state["config"] != wanted:
        changed = "; ".join(differences(state["config"], wanted, state["config"]))
        raise ValueError(f"{state_path} was written with another FinetuneConfig ({changed}); resume with the same "
                         "settings")
    return state


@torch.enable_grad()  # training, also when called under a caller's torch.no_grad()
def finetune(qmodel: nn.Module, fp_model: nn.Module, scheduler, config: FinetuneConfig | None = None,
             work_dir: str | os.PathLike | None = None, resume: bool = False, max_minutes: float | None = None,
             cond: dict | None = None, class_labels=None, sample_shape=None, teacher: Trajectories | None = None,
             fused_rounding: bool | None = None, disable: bool = False) -> FinetuneResult:
    """Fine-tune a calibrated quantized model in place (see the module docstring); returns losses and timing.

    ``teacher`` passes precomputed teacher trajectories (``traj_steps``-step trajectories of ``fp_model`` with this
    scheduler, e.g. shared by several runs); by default they are sampled here (and cached in ``work_dir``).
    ``fused_rounding`` runs the quantizers' rounding as fused compiled kernels (same values, see
    :func:`msfp.surgery.set_fused_rounding`); by default on CUDA only, where it pays for its compilation, and only
    where it is exact (:func:`default_fused_rounding`). ``max_minutes`` counts from the call, the teacher's sampling
    included, and a positive one trains at least one iteration; a run stopped by it is checkpointed (with the teacher
    cached) and continues with ``resume=True``. A call without ``resume`` starts afresh: its first checkpoint replaces
    an earlier run's in ``work_dir`` (``msfp finetune`` refuses to, without ``--resume``), whose teacher file it reuses.
    """
    began = time.monotonic()
    config = config or FinetuneConfig()
    if getattr(qmodel, "msfp_config", None) is None:
        raise ValueError("finetune() needs a model returned by msfp.quantize and msfp.calibrate")
    if fp_model is qmodel:
        raise ValueError("finetune() distils the quantized model from the full-precision one: pass the model it was "
                         "quantized from as fp_model, not the quantized model itself")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("finetune() trains, which torch.inference_mode() forbids: call it outside that block")
    if max_minutes is not None and (isinstance(max_minutes, bool) or not isinstance(max_minutes, numbers.Real)
                                    or not max_minutes >= 0):
        raise ValueError(f"max_minutes must be a number ≥ 0 (None: no limit), got {max_minutes!r}")  # NaN: no limit
    # Frozen E4M3 codes: only the few layers left fake-quant would be trained.
    require_fake_quant(qmodel, "finetune()", "the FP8 backend is for inference; fine-tune the fake-quant model "
                       "(msfp.load_quantized(directory), backend 'fake') and convert it afterwards")
    if any("weight_format" not in layer.info for layer in quant_layers(qmodel).values()):
        raise ValueError("finetune() needs a calibrated model: run msfp.calibrate first")
    fp_weights = weights_digest(fp_model)  # once: the teacher's trajectory key is made from it too
    recorded = getattr(qmodel, "msfp_base_weights", None)  # set by calibrate, saved in checkpoints
    if recorded is not None and fp_weights != recorded:
        raise ValueError(f"fp_model has other weights (digest {fp_weights}, dtypes included) than the model was "
                         f"calibrated from ({recorded}): distil from the full-precision model it was quantized from, "
                         "in the dtype it had then")
    state_path = Path(work_dir) / STATE_NAME if work_dir is not None else None
    if resume and (state_path is None or not state_path.is_file()):
        raise FileNotFoundError(f"nothing to resume: {state_path or 'no work_dir given'} does not exist")
    # What can be checked before the model is changed (LoRAs added, weights restored) is checked here, so that a
    # refused call leaves it as it was and a corrected call can follow.
    _check_noise_schedule(qmodel, scheduler)
    by_t = _loss_weights(scheduler, config)
    if config.train_weight_scales and any(layer.weight_sets is not None for layer in quant_layers(qmodel).values()):
        raise ValueError("train_weight_scales: a loaded routed TALoRA checkpoint holds its weight sets already "
                         "quantized, so its weight scales would not be trained; fine-tune without them")
    state = _read_state(state_path, config) if resume else None
    versions = machine_info()["versions"]  # of what computes the teacher's points and trains
    if state is not None:
        was = state.get("identity", {}).get("versions") or {}
        if was != versions:  # half a run trained by other code would be reported as one run of this code
            changed = "; ".join(differences(was, versions, sorted(set(was) | set(versions))))
            raise ValueError(f"{state_path} was written by other versions ({changed}); finish the run with those, or "
                             f"delete {state_path.parent} to start afresh")
    # The runs the model had before this one (a loaded checkpoint, say), for its record; a resumed run takes them from
    # its state file, where the model may already tell of this run (stopped by its time budget) or of none.
    earlier_runs = finetune_runs(getattr(qmodel, "msfp_finetune", None))
    router = getattr(qmodel, "msfp_router", None)
    # A loaded fine-tuned checkpoint: a router, but its LoRAs are merged into the (packed) weights.
    merged = None if router is None else next((n for n, layer in quant_layers(qmodel).items() if layer.lora is None),
                                              None)
    added = config.lora != "none" and router is None
    if router is not None and config.lora != "none":
        has = dict(qmodel.msfp_talora)
        wanted = dict(num_loras=config.num_loras if config.lora == "talora" else 1, rank=config.rank)
        if any(has[k] != v for k, v in wanted.items()):  # they would be trained, and the new settings recorded
            raise ValueError(f"the model already has LoRAs ({has['num_loras']} of rank {has['rank']}); fine-tune them "
                             f"with those settings or lora='none', not {wanted['num_loras']} of rank {config.rank}")
        if merged is not None:
            raise ValueError(f"{merged}: its LoRAs are merged into packed weights (a loaded fine-tuned checkpoint), so "
                             "there are none to train; use lora='none', or fine-tune the model msfp.quantize returned")
    trained = {}  # the trainable values before this call, put back when it fails

    def roll_back():  # a failed or interrupted call leaves the model as it was: a corrected call starts afresh
        try:
            with torch.no_grad():
                for name, p in qmodel.named_parameters():
                    if name in trained:
                        p.copy_(trained[name])
            if added and getattr(qmodel, "msfp_router", None) is not None:  # (add_talora itself may have failed)
                remove_talora(qmodel)
        except Exception as e:  # (a failed GPU, say) never in place of the error that stopped the run
            warnings.warn(f"finetune could not put the model back as it was ({type(e).__name__}: {e}): it is left "
                          "changed", stacklevel=3)

    try:
        if added:
            add_talora(qmodel, config.num_loras if config.lora == "talora" else 1, config.rank, config.seed)
        if merged is None:  # (merged LoRAs live in the weights themselves)
            _restore_full_precision_weights(qmodel, fp_model)
        qmodel.msfp_context.num_train_timesteps = scheduler.config.num_train_timesteps

        # What a work dir's files belong to: this teacher's trajectories, and this student's state that training does
        # not change (so a model interrupted in this process resumes too).
        if teacher is not None:
            teacher.check("finetune(teacher=...)")
            check_conditioning(qmodel, teacher.cond)
            teacher_key = f"given-{teacher.digest()}"
        else:
            teacher_key = teacher_file_key(
                trajectory_key(fp_model, scheduler, config.traj_samples, config.traj_steps, config.seed, cond,
                               class_labels, sample_shape, batch_size=TEACHER_BATCH, weights=fp_weights), versions)
        points = teacher if teacher is not None else _teacher(fp_model, scheduler, config, work_dir, teacher_key, cond,
                                                              class_labels, sample_shape, disable)
        if added:
            _warn_about_idle_loras(qmodel, points.t)
        weights = _point_weights(points, by_t, scheduler, config)
        groups = _trainable_groups(qmodel, config)
        trained = _trainable_state(qmodel)
        identity = None if work_dir is None else dict(versions=versions, teacher=teacher_key,
                                                      student=_student_key(qmodel, trained))
        params = [p for g in groups for p in g["params"]]
        trained_scales = [q.scale for q in named_quantizers(qmodel).values() if q.scale.requires_grad]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1 - i / config.iters))
        gen = torch.Generator().manual_seed(config.seed)
        it, losses = 0, []
        if state is not None:
            for what in ("teacher", "student"):
                if state.get("identity", {}).get(what) != identity[what]:
                    raise ValueError(f"{state_path} was written for another {what} model (or calibration); resume with "
                                     f"the model and teacher it started from, or delete {state_path.parent}")
            missing = set(trained) ^ set(state["trainable"])
            if missing:
                raise ValueError(f"{state_path} does not match this model's trainable parameters: "
                                 f"{sorted(missing)[:3]}")
            with torch.no_grad():
                for name, p in qmodel.named_parameters():
                    if name in state["trainable"]:
                        p.copy_(state["trainable"][name])
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_schedule"])
            gen.set_state(state["generator"])
            it, losses = state["iter"], state["losses"]
            earlier_runs = state.get("earlier_runs", earlier_runs)  # absent in state files written before it was kept
    except BaseException:
        roll_back()
        for p in qmodel.parameters():
            p.requires_grad_(False)
        raise

    def check_finite():
        bad = [n for n, p in qmodel.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:  # never checkpointed or returned: the run stops here instead
            raise FinetuneDivergedError(f"fine-tuning made {len(bad)} parameter(s) non-finite by iteration {it} "
                                        f"(e.g. {bad[0]})", kept())

    # Whether the state file is this run's: the one it resumed from, or one it wrote (another run's, left in the
    # work dir by a call without resume, would be refused by a resume of this one).
    checkpointed = state is not None

    def kept() -> str:
        if checkpointed and state_path.is_file():
            return f"the last good checkpoint {state_path} is kept"
        return "no checkpoint was written"

    def save_state():
        nonlocal checkpointed
        check_finite()
        if state_path is None:
            return
        with atomic_path(state_path) as tmp:
            torch.save(dict(config=config.to_dict(), identity=identity, trainable=_trainable_state(qmodel), iter=it,
                            losses=losses, optimizer=optimizer.state_dict(), lr_schedule=lr_schedule.state_dict(),
                            generator=gen.get_state(), earlier_runs=earlier_runs), tmp)
        checkpointed = True

    first = next(qmodel.parameters())
    device, dtype = first.device, first.dtype  # the inputs in the model's dtype, as sample() gives them
    fused = default_fused_rounding(device) if fused_rounding is None else fused_rounding
    set_fused_rounding(qmodel, fused)
    channels = points.eps.shape[1]
    start, stopped_early, first_iter = time.monotonic(), False, it
    bar = tqdm(total=config.iters, initial=it, desc="finetune", disable=disable)
    if fused:  # so that a silent first step is not mistaken for a hang (over 90 s on an H200)
        bar.set_postfix_str("compiling the fused rounding kernels (minutes with a cold Inductor cache)")
    qmodel.eval()  # no dropout; the quantized model has no batch statistics to update
    try:
        while it < config.iters:
            # A positive budget trains at least one iteration a call: a resumed run whose set-up alone outlasted it
            # would otherwise stop at its checkpoint every time.
            if (max_minutes is not None and (it > first_iter or max_minutes == 0)
                    and time.monotonic() - began >= 60 * max_minutes):
                stopped_early = True
                break
            idx = torch.randint(0, len(points), (config.batch_size,), generator=gen)
            x, t, eps = points.x[idx].to(device, dtype), points.t[idx].to(device), points.eps[idx].to(device)
            # Conditioning in the student's dtype too (the teacher's may differ: a bfloat16 student of a float32 one).
            batch_cond = model_cond(select(points.cond, idx), device, dtype)
            out = denoise(qmodel, x, t, **batch_cond)[:, :channels]
            loss = weighted_mse(out.float(), eps, weights[idx])
            if not torch.isfinite(loss):
                raise FinetuneDivergedError(f"fine-tuning loss became {loss.item()} at iteration {it} (timesteps "
                                            f"{sorted(set(t.tolist()))})", kept())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            if not torch.isfinite(grad_norm):  # a step would make the parameters NaN
                raise FinetuneDivergedError(f"fine-tuning gradients became non-finite at iteration {it} (timesteps "
                                            f"{sorted(set(t.tolist()))})", kept())
            optimizer.step()
            with torch.no_grad():  # the forward uses max(scale, MIN_SCALE); below it no gradient moves a scale back
                for scale in trained_scales:
                    scale.clamp_(min=MIN_SCALE)
            lr_schedule.step()
            it += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4g}")
            if it % config.checkpoint_every == 0:
                save_state()
        save_state()
    except BaseException:  # diverged ("lower the learning rates": the retry must not start from the diverged values)
        roll_back()  # or interrupted: resume=True continues from the last checkpoint
        raise
    finally:  # an inference model again
        bar.close()
        set_fused_rounding(qmodel, False)
        for p in qmodel.parameters():
            p.requires_grad_(False)
    record = dict(config.to_dict(), iters_done=it)
    qmodel.msfp_finetune = dict(record, earlier=earlier_runs) if earlier_runs else record
    return FinetuneResult(it, losses, time.monotonic() - start, stopped_early)
