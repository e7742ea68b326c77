"""``msfp.calibrate``: initialise every quantizer of a quantized model from the full-precision model's trajectories.

1. **Trajectories.** The full-precision model samples ``num_samples`` images with ``num_steps`` DDIM steps (or the
   given scheduler); every denoiser call's ``(x_t, t, cond)`` and output ``eps`` is a calibration point.
2. **Layer inputs.** The quantized model, quantizers off (so it equals the full-precision model), runs over all
   points; each layer keeps a bounded, uniform random sample of its input elements across all timesteps
   (``QuantConfig.act_samples_per_layer``), its range, and whether its input tensor *is* the output of a
   SiLU/GELU/Mish/ReLU module (traced AAL detection that works on unknown graphs).
3. **Search.** Weights: format among the weight candidates and per-channel clipping by MSE. Activations: format
   among the signed candidates for normal layers, and signed plus unsigned-with-zero-point candidates for AALs,
   clipping and zero point by MSE. AALs are found structurally (known diffusers blocks; traced), or statistically
   (``min >= -aal_threshold * max|x|``); the reason is recorded in ``layer.info``. Attention matmul inputs
   (``quantize_attention``) are recorded and searched the same way: Q, K and V as activations of a layer, the softmax
   probabilities (in [0, 1]) always as an AAL.

With ``cache_dir``, steps 1 and 2 are stored as safetensors keyed by the model's weights and the settings, so
calibrating the same model with another preset skips them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from msfp.attention import attention_quantizers, counting_flops
from msfp.conditioning import concat, flatten, map_tensors, model_cond, select, unflatten
from msfp.fileio import atomic_path, check_writable
from msfp.fp8 import require_fake_quant
from msfp.environment import machine_info
from msfp.identity import model_key, plain_config, tensor_digest, weights_digest
from msfp.layers import QuantLayer
from msfp.models import class_info, denoise, evaluating, recorded_schedule
from msfp.quantizers import quantizer_keys
from msfp.sampling import integer_labels, model_device, sample
from msfp.surgery import quant_layers, quantizers_disabled

# Activation modules whose outputs are one-sided: a layer reading one directly is an AAL.
_ONE_SIDED_ACTIVATIONS = ("SiLU", "GELU", "ApproximateGELU", "Mish", "ReLU", "ReLU6", "Softplus")


@dataclass
class Trajectories:
    """Calibration points: denoiser inputs ``x`` (P, ...), timesteps ``t`` (P,: integers, or float32 where the
    scheduler calls the model between them, as Euler-type schedulers do), per-point conditioning and the
    full-precision output ``eps``."""

    x: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    cond: dict

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            yield self.x[sl], self.t[sl], select(self.cond, sl)

    def to_tensors(self) -> dict:
        return {"x": self.x, "t": self.t, "eps": self.eps, **{f"cond.{k}": v for k, v in flatten(self.cond).items()}}

    @classmethod
    def from_tensors(cls, tensors: dict) -> Trajectories:
        cond = unflatten({k[5:]: v for k, v in tensors.items() if k.startswith("cond.")})
        return cls(tensors["x"], tensors["t"], tensors["eps"], cond)

    def check(self, what: str) -> None:
        """Raise unless there are points and every tensor has one row per point (``what`` names them)."""
        if len(self) == 0:
            raise ValueError(f"{what}: no trajectory points")
        rows = {name: t.shape[0] if t.ndim else None for name, t in self.to_tensors().items()}
        wrong = {name: n for name, n in rows.items() if n != len(self)}
        if wrong:
            raise ValueError(f"{what}: every tensor needs one row per point ({len(self)}, as x has), got {wrong}")

    def digest(self) -> str:
        """A digest of every tensor: equal digests, equal points."""
        parts = {name: tensor_digest(t) for name, t in self.to_tensors().items()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def collect_trajectories(fp_model: nn.Module, scheduler, num_samples: int = 64, num_steps: int = 25, seed: int = 0,
                         batch_size: int = 64, cond: dict | None = None, class_labels=None, eta: float = 0.0,
                         sample_shape=None, disable: bool = False) -> Trajectories:
    """Run the full-precision model along its own sampling trajectories and keep every denoiser call."""
    if num_samples < 1 or num_steps < 1:
        raise ValueError(f"calibration needs at least one sample and one step, got num_samples={num_samples}, "
                         f"num_steps={num_steps} (empty calibration set)")
    cond = dict(cond or {})
    num_classes, _ = class_info(fp_model)
    if class_labels is None and "class_labels" not in cond and num_classes:
        gen = torch.Generator().manual_seed(seed)
        class_labels = torch.randint(0, num_classes, (num_samples,), generator=gen)
    if class_labels is not None:
        cond["class_labels"] = integer_labels(class_labels, num_samples)
    xs, ts, epss, conds = [], [], [], []

    def keep(step):
        bad = ~torch.isfinite(step["eps"].flatten(1)).all(1)
        if bad.any():
            first = seed + step["start"] + int(bad.nonzero()[0])
            raise FloatingPointError(f"calibration: the full-precision model predicted NaN/inf noise at timestep "
                                     f"{float(step['t'].flatten()[0]):g} for {int(bad.sum())} of {len(bad)} samples "
                                     f"(the trajectory of seed {first} among them): its trajectories cannot calibrate "
                                     "anything (check the model and its scheduler)")
        xs.append(step["x"].float().cpu())
        ts.append(step["t"].cpu())
        epss.append(step["eps"].float().cpu())
        conds.append(map_tensors(torch.Tensor.cpu, step["cond"]))

    with evaluating(fp_model):
        sample(fp_model, scheduler, num_samples, num_inference_steps=num_steps, seed=seed, batch_size=batch_size,
               eta=eta, cond=cond, callback=keep, disable=disable, sample_shape=sample_shape)
    t = torch.cat(ts)
    if not t.is_floating_point() or torch.equal(t, t.round()):
        t = t.long()  # kept as called otherwise: a truncated t gives inputs the sampler never feeds the model
    return Trajectories(torch.cat(xs), t, torch.cat(epss), concat(conds))


# Attribute naming the activation module that produced a tensor, for tracing a layer's input to it. A tag on the
# output itself, not a list of outputs: the list kept every activation of a forward alive (8 GiB for SD-1.5 at
# batch 64).
_ACTIVATION_TAG = "_msfp_activation"


# Attribute naming the quantized layer that produced a tensor, to find the layer whose output is the model's.
_LAYER_TAG = "_msfp_layer"


class OutputLayerWarning(UserWarning):
    """The traced output layer is not the one the ``@last`` role kept at 8 bits."""


def _tag(out, attribute: str, name: str) -> None:
    if isinstance(out, torch.Tensor):
        setattr(out, attribute, name)


def _rows_not_samples(name: str, what: str) -> ValueError:
    return ValueError(f"calibration: {name!r} gets {what} (tokens folded into the batch?), so its per-timestep "
                      "activation scales cannot tell the samples' timesteps apart; use act_timestep_groups=1 or keep "
                      "it full precision")


class _LayerRecorder:
    """Bounded sample of one layer's (or attention matmul input's) elements across all calibration points, plus range
    and tracing. Attention quantizers pass the MACs of their matmul; layers compute theirs from the input shape."""

    def __init__(self, per_point: int, seed: int, context):
        self.per_point = per_point
        self.gen = torch.Generator().manual_seed(seed)
        self.context = context
        self.values, self.timesteps = [], []
        self.min, self.max = math.inf, -math.inf
        self.traced_from = None
        self.mac_sum = 0  # over every call: a layer called twice per forward does its work twice
        self.per_sample = True  # every input had one row per sample, so the recorded timesteps are the rows'

    def __call__(self, layer, x, macs=None):
        flat = x.detach().float()
        flat = flat.reshape(1, -1) if flat.dim() < 2 else flat.flatten(1)  # nn.Linear takes one unbatched vector
        t = self.context.timesteps
        samples = flat.shape[0] if t is None else len(t)
        draws = self.per_point
        if flat.shape[0] != samples:  # not one row per sample: tokens folded into the batch, or an unbatched input
            self.per_sample = False
            if layer.act_quantizer.num_groups > 1:  # at once, not after recording every layer
                raise _rows_not_samples(layer.name, f"inputs of {flat.shape[0]} rows for a batch of {len(t)} samples")
            t = None  # one scale for all timesteps: which row had which timestep does not matter
            # As many draws as from one row per sample: per row, (B·H·W, C) inputs gave H·W times the bound.
            flat, draws = flat.reshape(1, -1), self.per_point * samples
        finite = torch.isfinite(flat).all(1)
        if not finite.all():
            where = "" if t is None else f" at timestep(s) {sorted(set(t[~finite].tolist()))}"
            what = "layer" if isinstance(layer, QuantLayer) else f"attention {layer.kind} input"
            raise FloatingPointError(f"calibration: {what} {layer.name!r} received NaN/inf inputs{where}")
        self.mac_sum += layer.macs(x.shape) if macs is None else macs * x.shape[0]
        self.min = min(self.min, flat.min().item())
        self.max = max(self.max, flat.max().item())
        idx = torch.randint(0, flat.shape[1], (flat.shape[0], draws), generator=self.gen)
        self.values.append(flat.gather(1, idx.to(flat.device)).flatten().cpu())  # the draws cross, not the input
        self.timesteps.append((t.cpu() if t is not None else torch.zeros(flat.shape[0], dtype=torch.long))
                              .repeat_interleave(draws))
        if self.traced_from is None:
            self.traced_from = getattr(x, _ACTIVATION_TAG, None)

    def result(self, model_samples: int) -> dict:
        """``model_samples``: how many samples the model ran on, to turn the MACs into MACs per model sample."""
        return dict(values=torch.cat(self.values), timesteps=torch.cat(self.timesteps), min=self.min, max=self.max,
                    traced_from=self.traced_from, macs=round(self.mac_sum / model_samples), per_sample=self.per_sample)


def recorded_inputs(qmodel: nn.Module) -> dict:
    """What :func:`record_layer_inputs` records, by name, in order: quantized layers, then attention matmul inputs.
    Each one's random subsample is seeded by its position here."""
    return {**quant_layers(qmodel), **attention_quantizers(qmodel)}


@torch.no_grad()
def trajectory_key(fp_model: nn.Module, scheduler, num_samples: int, num_steps: int, seed: int, cond=None,
                   class_labels=None, sample_shape=None, *, batch_size: int, weights: str | None = None) -> str:
    """What :func:`collect_trajectories` is asked for: the model (its weights' digest ``weights``, if the caller has
    it), the scheduler and the trajectory settings, the batch size included (it orders the points, and batched
    kernels round differently). Fine-tuning's teacher files and resume checks use it; where the trajectories were
    computed (device, code) is left to the caller: a run resumes on another device."""
    return model_key(fp_model, dict(
        num_samples=num_samples, num_steps=num_steps, seed=seed, batch_size=batch_size,
        scheduler=type(scheduler).__name__,
        scheduler_config=plain_config(scheduler.config), sample_shape=sample_shape,
        cond={k: tensor_digest(v) for k, v in flatten(cond or {}).items()},
        class_labels=None if class_labels is None else tensor_digest(torch.as_tensor(class_labels))), weights)


def record_layer_inputs(qmodel: nn.Module, points: Trajectories, samples_per_layer: int, batch_size: int = 64,
                        seed: int = 0, disable: bool = False) -> dict[str, dict]:
    """Run the quantized model with quantizers off over ``points``; per layer (and attention matmul input), a bounded
    sample of its inputs."""
    if len(points) == 0:
        raise ValueError("empty calibration set: no trajectory points to record")
    layers = recorded_inputs(qmodel)
    per_point = max(1, math.ceil(samples_per_layer / len(points)))
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: _tag(out, _ACTIVATION_TAG, name))
             for name, module in qmodel.named_modules() if type(module).__name__ in _ONE_SIDED_ACTIVATIONS]
    hooks += [layer.register_forward_hook(lambda m, a, out, name=name: _tag(out, _LAYER_TAG, name))
              for name, layer in quant_layers(qmodel).items()]
    output_layers = set()
    recorders = {}
    for i, (name, layer) in enumerate(layers.items()):
        recorders[name] = layer.observer = _LayerRecorder(per_point, seed + i, qmodel.msfp_context)
    first = next(qmodel.parameters())
    try:
        with quantizers_disabled(qmodel), evaluating(qmodel):
            for x, t, cond in tqdm(points.batches(batch_size), total=math.ceil(len(points) / batch_size),
                                   desc="calibrate: layer inputs", disable=disable):
                cond = model_cond(cond, first.device, first.dtype)  # a half-precision teacher's is in its dtype
                out = denoise(qmodel, x.to(first.device), t.to(first.device), **cond)
                output_layers.add(getattr(out, _LAYER_TAG, None))
    finally:
        for layer in layers.values():
            layer.observer = None
        for h in hooks:
            h.remove()
    silent = [name for name, rec in recorders.items() if not rec.values]
    if silent:  # e.g. nn.MultiheadAttention reads its out_proj.weight directly: the layer would stay full precision
        raise ValueError(f"{len(silent)} quantized layer(s) never ran during calibration (e.g. {silent[0]!r}): their "
                         "parent module bypasses them or they are unused; keep them full precision with "
                         "QuantConfig.full_precision_layers")
    # Recorded with the inputs, so that a calibration from the cache checks it too; none where the output is not one
    # layer's own tensor (reshaped, added to, ...).
    return {name: dict(rec.result(len(points)), made_output=output_layers == {name})
            for name, rec in recorders.items()}


def _check_output_layer(qmodel: nn.Module, records: dict[str, dict]) -> None:
    """Warn when the model's output came from a 4-bit layer while the ``@last`` role kept another at 8 bits (a plain
    wrapper's head after a whole diffusers denoiser): registration order could not tell them apart."""
    chosen = getattr(qmodel, "msfp_output_layer", None)
    name = next((n for n, rec in records.items() if rec["made_output"]), None)
    if "@last" not in qmodel.msfp_config.eight_bit_layers or name is None:
        return
    if name != chosen and quant_layers(qmodel)[name].precision == "4bit":
        warnings.warn(f"the model's output comes from {name!r}, which is at 4 bits, while @last kept {chosen!r} at 8 "
                      f"bits; keep the output layer at 8 bits by naming it: QuantConfig.eight_bit_layers += "
                      f"[{name!r}]", OutputLayerWarning, stacklevel=3)


def _is_aal(layer, rec: dict, config) -> tuple[bool, str]:
    if config.aal_structural and layer.info.get("aal_reason", "").startswith("structural"):
        return True, layer.info["aal_reason"]
    if config.aal_structural and rec["traced_from"]:
        return True, f"traced: input is the output of activation module {rec['traced_from']!r}"
    absmax = max(abs(rec["min"]), abs(rec["max"]))
    if config.aal_statistical and absmax > 0 and rec["min"] >= -config.aal_threshold * absmax:
        return True, f"statistical: min {rec['min']:.4g} >= -{config.aal_threshold} * max|x| ({absmax:.4g})"
    return False, ""


def _search_activations(layer, rec: dict, config, aal: bool):
    """Format (signed candidates; plus unsigned ones for an AAL), clipping and zero point of ``layer.act_quantizer``
    by MSE on the recorded sample; then one scale/zero point per timestep group, if there are several."""
    eight = layer.precision == "8bit"
    candidates = list(config.eight_bit_act_formats if eight else config.act_formats)
    if aal and not eight:
        candidates += config.aal_act_formats
    values = rec["values"]
    search = dict(num_clip=config.search_clip_points, num_zero=config.search_zero_points, max_samples=values.numel())
    result = layer.act_quantizer.initialize(values, candidates, **search)
    groups = layer.act_quantizer.num_groups
    if groups > 1:
        group_of = layer.context.groups_of(rec["timesteps"], groups)
        for g in range(groups):
            if (group_of == g).any():
                layer.act_quantizer.initialize(values[group_of == g], group=g, **search)
    return result


def _search_layer(layer, rec: dict, config) -> None:
    eight = layer.precision == "8bit"
    aal, reason = _is_aal(layer, rec, config)
    weight_candidates = config.eight_bit_weight_formats if eight else config.weight_formats
    w = layer.effective_weight().detach()
    search = dict(num_clip=config.search_clip_points, num_zero=config.search_zero_points)
    if config.weight_granularity == "channel":
        wres = layer.weight_quantizer.initialize(w, weight_candidates, **search)
    else:
        wres = layer.weight_quantizer.initialize_per_tensor(w, weight_candidates, **search)
    ares = _search_activations(layer, rec, config, aal)
    layer.info.update(
        name=layer.name, kind=layer.kind, precision=layer.precision, aal=aal, aal_reason=reason,
        weight_format=wres.fmt.name, act_format=ares.fmt.name, weight_mse=wres.mse, act_mse=ares.mse,
        act_mse_by_format=ares.mse_by_format, act_min=rec["min"], act_max=rec["max"], macs=rec["macs"],
        weights=layer.weight.numel())


def _search_attention_input(quantizer, rec: dict, config) -> None:
    if quantizer.tensor == "probs":
        aal, reason = True, "structural: softmax probabilities lie in [0, 1]"
    else:
        aal, reason = _is_aal(quantizer, rec, config)
    ares = _search_activations(quantizer, rec, config, aal)
    quantizer.info.update(
        name=quantizer.name, kind=quantizer.kind, precision=quantizer.precision, aal=aal, aal_reason=reason,
        act_format=ares.fmt.name, act_mse=ares.mse, act_mse_by_format=ares.mse_by_format, act_min=rec["min"],
        act_max=rec["max"], macs=rec["macs"])


def _cached(path: Path | None, compute, to_tensors, from_tensors):
    """``(value, whether it came from the cache file)``."""
    if path is not None and path.is_file():
        try:
            return from_tensors(load_file(path)), True
        except Exception as e:  # a corrupt cache is recomputed, never trusted
            print(f"msfp: ignoring unreadable calibration cache {path} ({type(e).__name__}: {e})")
    value = compute()
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in to_tensors(value).items()}, tmp)
    return value, False


def _check_cache_file(cache_dir, path: Path) -> None:
    """Refuse, before the work, a cache file that could not be written (``cache_dir`` a file, an unwritable folder);
    an existing one is only read."""
    try:
        if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise NotADirectoryError("it is a file, not a folder")
        if not path.is_file():
            check_writable(path)
    except OSError as e:
        raise type(e)(f"cache_dir {os.fspath(cache_dir)!r}: {e}; pass a folder msfp can write to") from None


def _trajectory_file_key(fp_model, scheduler, num_samples, num_steps, seed, batch_size, cond, class_labels,
                         sample_shape, weights) -> str:
    # The same request (batch size included) on the same machine (CPU or GPU model, and thread count: float sums
    # differ with it), versions and msfp code.
    request = trajectory_key(fp_model, scheduler, num_samples, num_steps, seed, cond, class_labels, sample_shape,
                             batch_size=batch_size, weights=weights)
    where = json.dumps(machine_info(model_device(fp_model)), sort_keys=True)
    return hashlib.sha256("\n".join([request, where]).encode()).hexdigest()[:16]


def cached_trajectories(fp_model: nn.Module, scheduler, num_samples: int, num_steps: int, seed: int = 0,
                        batch_size: int = 64, cond: dict | None = None, class_labels=None, sample_shape=None, *,
                        cache_dir: str | os.PathLike | None = None, disable: bool = False,
                        weights: str | None = None) -> tuple[Trajectories, bool]:
    """:func:`collect_trajectories` through :func:`calibrate`'s cache in ``cache_dir`` (none: computed), and whether
    they came from it: the same call finds the trajectories a calibration computed. ``weights``: ``fp_model``'s
    :func:`msfp.identity.weights_digest`, if the caller has it."""
    path = None
    if cache_dir is not None:
        key = _trajectory_file_key(fp_model, scheduler, num_samples, num_steps, seed, batch_size, cond, class_labels,
                                   sample_shape, weights)
        path = Path(cache_dir) / f"trajectories-{key}.safetensors"
        _check_cache_file(cache_dir, path)
    collect = lambda: collect_trajectories(fp_model, scheduler, num_samples, num_steps, seed,  # noqa: E731
                                           batch_size, cond, class_labels, sample_shape=sample_shape, disable=disable)
    return _cached(path, collect, Trajectories.to_tensors, Trajectories.from_tensors)


def _records_to_tensors(records: dict) -> dict:
    out = {}
    for name, r in records.items():
        out[f"{name}/values"] = r["values"]
        out[f"{name}/timesteps"] = r["timesteps"]
        out[f"{name}/stats"] = torch.tensor([r["min"], r["max"], float(r["macs"]), float(r["per_sample"]),
                                             float(r["made_output"])], dtype=torch.float64)
        traced = (r["traced_from"] or "").encode()
        out[f"{name}/traced_from"] = torch.tensor(list(traced), dtype=torch.uint8)
    return out


def _records_from_tensors(tensors: dict, expected: list[str]) -> dict:
    names = {k.rsplit("/", 1)[0] for k in tensors}
    if names != set(expected):
        raise ValueError(f"it records {len(names)} tensors, not the {len(expected)} this model quantizes")
    records = {}
    for name in names:
        lo, hi, macs, per_sample, made_output = tensors[f"{name}/stats"].tolist()
        traced = bytes(tensors[f"{name}/traced_from"].tolist()).decode() or None
        records[name] = dict(values=tensors[f"{name}/values"], timesteps=tensors[f"{name}/timesteps"], min=lo,
                             max=hi, macs=int(macs), traced_from=traced, per_sample=bool(per_sample),
                             made_output=bool(made_output))
    return records


@dataclass
class CalibrationReport:
    num_points: int
    trajectory_seconds: float
    record_seconds: float
    search_seconds: float
    cached: bool


def _warn_about_empty_groups(context, timesteps: torch.Tensor, groups: int) -> None:
    if groups < 2:
        return
    empty = sorted(set(range(groups)) - set(context.groups_of(timesteps, groups).tolist()))
    if empty:
        width = context.num_train_timesteps / groups
        spans = ", ".join(f"{g} (t {g * width:g}–{(g + 1) * width:g})" for g in empty)
        warnings.warn(f"act_timestep_groups={groups}: no calibration step falls in group(s) {spans}; they keep the "
                      "scale searched over all timesteps (sample with more steps, or use fewer groups)", stacklevel=3)


def calibrate(qmodel: nn.Module, fp_model: nn.Module, scheduler, num_samples: int = 64, num_steps: int = 25,
              seed: int = 0, batch_size: int = 64, cond: dict | None = None, class_labels=None,
              cache_dir: str | os.PathLike | None = None, sample_shape=None,
              disable: bool = False) -> CalibrationReport:
    """Initialise all quantizers of ``qmodel`` (from :func:`msfp.quantize`) by the MSFP search; see the module doc.

    ``cond`` holds per-sample conditioning tensors (one row per calibration sample, e.g. ``encoder_hidden_states``),
    or dicts of them as the model takes them (SDXL's ``added_cond_kwargs``: :mod:`msfp.conditioning`);
    class-conditional models without ``class_labels`` get labels drawn uniformly with ``seed``. ``sample_shape``
    (C, H, W) is needed for models without a diffusers config.
    """
    config = getattr(qmodel, "msfp_config", None)
    if config is None:
        raise ValueError("calibrate() needs a model returned by msfp.quantize(model, config)")
    if getattr(fp_model, "msfp_config", None) is not None:  # quantize() works in place: the caller's model is q too
        raise ValueError("calibrate() samples the full-precision model's trajectories, but fp_model is quantized"
                         f"{' (it is qmodel itself)' if fp_model is qmodel else ''}: quantize a copy "
                         "(msfp.quantize(copy.deepcopy(model), ...)) and pass the original as fp_model")
    require_fake_quant(qmodel, "calibrate()", "calibrate before msfp.fp8.convert_to_fp8")
    steps = scheduler.config.num_train_timesteps
    if config.act_timestep_groups > steps:  # before the trajectories: the extra groups could never hold a step
        raise ValueError(f"QuantConfig.act_timestep_groups is {config.act_timestep_groups}, more than the scheduler's "
                         f"{steps} training timesteps (one group per timestep at most): use at most {steps}")
    layers = quant_layers(qmodel)
    half = next((n for n, layer in layers.items() if layer.weight.dtype != torch.float32), None)
    if half is not None:  # the quantizers' scales are float32: the fake-quant forward would fail on a raw dtype error
        raise ValueError(f"{half}: weights are {layers[half].weight.dtype}; the fake-quant reference calibrates "
                         "float32 models: quantize the model in float32 (model.float()); the FP8 backend converts "
                         "to bfloat16 afterwards")
    for name, layer in layers.items():  # the weight search would fail late, naming neither layer nor weights
        bad = int((~torch.isfinite(layer.weight)).sum())
        if bad:
            raise ValueError(f"{name}: its weight holds {bad} non-finite values (NaN or inf); calibrate a model whose "
                             "weights are finite")
    attention = attention_quantizers(qmodel)
    base_weights = weights_digest(fp_model)
    recorded = list(recorded_inputs(qmodel))
    request = (fp_model, scheduler, num_samples, num_steps, seed, batch_size, cond, class_labels, sample_shape)
    rec_path = None
    if cache_dir is not None:  # a hit must equal computing afresh
        key = _trajectory_file_key(*request, weights=base_weights)
        # Layer inputs: those trajectories at that batch size (the subsample is drawn batch by batch), this ordered
        # list (it seeds each subsample), the quantized model's own full-precision weights (LoRAs included; they
        # may differ from fp_model's) and the machine that runs it (fp_model may run elsewhere).
        own_weights = weights_digest(qmodel, exclude=quantizer_keys(qmodel))
        runs_on = json.dumps(machine_info(model_device(qmodel)), sort_keys=True)
        recorded_key = hashlib.sha256("\n".join([*recorded, own_weights, runs_on]).encode()).hexdigest()[:12]
        rec_path = Path(cache_dir) / f"layer-inputs-{key}-{config.act_samples_per_layer}-{recorded_key}.safetensors"
        _check_cache_file(cache_dir, rec_path)

    start = time.time()
    points, points_cached = cached_trajectories(*request, cache_dir=cache_dir, disable=disable, weights=base_weights)
    traj_time = time.time() - start
    start = time.time()
    record = lambda: record_layer_inputs(qmodel, points, config.act_samples_per_layer,  # noqa: E731
                                         batch_size, seed, disable)
    records, records_cached = _cached(rec_path, record, _records_to_tensors,
                                      lambda tensors: _records_from_tensors(tensors, recorded))
    record_time = time.time() - start
    _check_output_layer(qmodel, records)
    for name, module in recorded_inputs(qmodel).items():  # cached records were not checked as they were recorded
        if module.act_quantizer.num_groups > 1 and not records[name]["per_sample"]:
            raise _rows_not_samples(name, "inputs whose rows are not the batch's samples")
    # What the model records of its calibration is set once nothing but the search is left: a refused call must not
    # leave another teacher's digest behind, which fine-tuning trusts.
    qmodel.msfp_context.num_train_timesteps = scheduler.config.num_train_timesteps  # the timestep groups' range
    _warn_about_empty_groups(qmodel.msfp_context, points.t, config.act_timestep_groups)
    qmodel.msfp_scheduler_config = recorded_schedule(scheduler.config)  # saved: `--model DIR` samples with it
    qmodel.msfp_base_weights = base_weights  # saved too: fine-tuning must distil from these weights
    start = time.time()
    for name, layer in tqdm(layers.items(), desc="calibrate: search", disable=disable):
        _search_layer(layer, records[name], config)
    for name, quantizer in attention.items():
        _search_attention_input(quantizer, records[name], config)
    qmodel.msfp_flops = _model_flops(qmodel, points)
    return CalibrationReport(len(points), traj_time, record_time, time.time() - start,
                             points_cached and records_cached)


@torch.no_grad()
def _model_flops(qmodel: nn.Module, points: Trajectories) -> dict:
    """FLOPs of one sample's forward: every op FlopCounterMode counts (convs, matmuls, attention matmuls)."""
    first = next(qmodel.parameters())
    x, t, cond = next(points.batches(1))
    with quantizers_disabled(qmodel), counting_flops(qmodel) as counter:
        denoise(qmodel, x.to(first.device), t.to(first.device), **model_cond(cond, first.device, first.dtype))
    return dict(total=int(counter.get_total_flops()))
