"""Sampling with any diffusers scheduler and per-sample seeded noise, and a PNG grid writer.

Every sample ``i`` owns a generator seeded with ``seed + i`` (NVlabs EDM style): its initial noise and the noise of
stochastic steps come from that generator only, so image ``i`` gets the same noise whatever ``batch_size`` is. The
denoiser's float results can still change in the last bits with the batch size (convolution algorithms are chosen per
shape): a full-precision model's 8-bit images mostly absorb that (rarely a pixel moves by one level), but in a
quantized model such an ulp can flip a 4-bit rounding, and most images then differ slightly, a few visibly (README,
"Same seeds, same images?"). The scheduler is copied per batch, so no state leaks between batches or calls.
``callback`` is called after every denoiser call (k-diffusion style) with ``i`` (step index), ``t`` (timesteps, shape
(B,)), ``x`` (the denoiser's input), ``eps`` (its output) and ``start`` (index of the batch's first sample):
calibration and evaluation hook in there.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from msfp.checks import whole_number
from msfp.conditioning import check_conditioning, check_per_sample, model_cond, select
from msfp.cuda_graphs import GraphedDenoiser
from msfp.fileio import atomic_path
from msfp.models import class_info, denoise, model_config


# Schedulers whose step uses a learned variance. DPM-Solver and SA-Solver only cut the noise off the model's output, as
# its first three channels (RGB's), which is wrong for other channel counts: they get the noise channels instead, with
# variance_type=None (:func:`_without_learned_variance`). The rest keep variance_type in their config but ignore it.
_USE_LEARNED_VARIANCE = ("DDPMScheduler", "DDPMParallelScheduler", "UnCLIPScheduler")


def _learned_variance_config(scheduler) -> bool:
    return scheduler.config.get("variance_type") in ("learned", "learned_range")


def reads_learned_variance(scheduler) -> bool:
    """Whether ``scheduler.step`` reads the model's variance channels: DDPM with a learned variance (DiT's training
    scheduler)."""
    return (_learned_variance_config(scheduler)
            and any(cls.__name__ in _USE_LEARNED_VARIANCE for cls in type(scheduler).__mro__))


def _without_learned_variance(scheduler) -> dict:
    """The scheduler's config, with ``variance_type=None`` where it would otherwise take channels 0–2 as the noise."""
    config = dict(scheduler.config)
    if _learned_variance_config(scheduler) and not reads_learned_variance(scheduler):
        config["variance_type"] = None
    return config


class NonFiniteSamplesWarning(UserWarning):
    """:func:`sample` returned images with NaN or inf values: the model or the sampler diverged."""


def sample_shape_of(model, sample_shape=None) -> tuple:
    """(C, H, W) of the model's samples: ``sample_shape`` if given, else from its diffusers config."""
    if sample_shape is not None:
        return tuple(sample_shape)
    config = model_config(model)
    if "sample_size" not in config or "in_channels" not in config:
        raise ValueError("pass sample_shape=(C, H, W): the model has no diffusers config with sample_size/in_channels")
    size = config["sample_size"]
    if size is None or config["in_channels"] is None:  # UNet2DConditionModel's default sample_size is None
        raise ValueError(f"pass sample_shape=(C, H, W): {type(model).__name__}'s config gives no sample shape "
                         f"(sample_size={size!r}, in_channels={config['in_channels']!r})")
    return (config["in_channels"], *((size, size) if isinstance(size, int) else size))


def _first_parameter(model) -> torch.nn.Parameter | None:
    return next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None


def model_device(model, device=None) -> torch.device:
    """``device`` if given, else the device of the model's parameters (the CPU for a callable without any)."""
    if device is not None:
        return torch.device(device)
    params = _first_parameter(model)
    return params.device if params is not None else torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's parameters (float32 for a callable without any)."""
    params = _first_parameter(model)
    return params.dtype if params is not None else torch.float32


def integer_labels(class_labels, num_samples: int) -> torch.Tensor:
    """``class_labels`` as one int64 label per sample; floats are refused (0.7 was read as class 0)."""
    labels = torch.as_tensor(class_labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be integers, got {labels.dtype} (0.7 was read as class 0)")
    if labels.shape != (num_samples,):
        raise ValueError(f"class_labels must have shape ({num_samples},), got {tuple(labels.shape)}")
    return labels.long()


def _check_class_labels(model, labels: torch.Tensor) -> None:
    """Refuse labels outside the model's classes (a DiT-style null label allowed) before any work: the class
    embedding failed on them with a bare "index out of range in self"."""
    num_classes, null_label = class_info(model)
    if num_classes is None or model_config(model).get("class_embed_type") is not None:
        return  # (a "timestep"/"identity"/"projection" class embedding takes any value, not a table's rows)
    bad = labels[((labels < 0) | (labels >= num_classes)) & (labels != null_label)]
    if bad.numel():
        null = f", or {null_label} (its null label)" if null_label is not None else ""
        raise ValueError(f"class label {int(bad[0])} is out of range: {type(model).__name__} has {num_classes} "
                         f"classes, labels 0..{num_classes - 1}{null}")


@torch.no_grad()
def sample(model, scheduler, num_samples: int, num_inference_steps: int = 100, seed: int = 0, batch_size: int = 64,
           eta: float = 0.0, class_labels=None, callback=None, disable: bool = False, device=None,
           sample_shape=None, cond: dict | None = None, cuda_graphs: bool = False, postprocess=None) -> torch.Tensor:
    """Draw ``num_samples`` images; returns float32 (N, C, H, W) on the CPU, in the model's data range.

    ``postprocess``, when given, is applied to each batch's images (float32 on the CPU) as the batch completes, and its
    results (tensors) are concatenated instead: e.g. a conversion to uint8, so that a large run never holds every
    image in float32.

    ``model(x, t, **kwargs)`` (``timestep=t`` by name where forward has that parameter: :func:`msfp.models.denoise`)
    may return a diffusers output (``.sample``) or a tensor; ``kwargs`` holds ``class_labels`` (one label per sample)
    when given and the entries of ``cond`` (per-sample tensors with first dimension ``num_samples``, e.g.
    ``encoder_hidden_states``, or dicts of them: :mod:`msfp.conditioning`), sliced per batch; an input the model needs
    and ``cond`` lacks is named before any work. ``eta`` is passed to schedulers whose ``step`` accepts it (DDIM). ``sample_shape`` (C, H, W) is read from the model's config unless given.
    ``cuda_graphs`` replays the model's calls from CUDA graphs (:class:`msfp.cuda_graphs.GraphedDenoiser`; a model on
    a CUDA device only): the same kernels without the host's per-launch work.
    """
    num_samples = whole_number("num_samples", num_samples, 1)
    num_inference_steps = whole_number("num_inference_steps", num_inference_steps, 1)
    batch_size = whole_number("batch_size", batch_size, 1)
    seed = whole_number("seed", seed)
    device = model_device(model, device)
    # (A model whose weights sit elsewhere may be moved by hooks, as accelerate's offloading does: not refused.)
    if device.type == "meta":  # else "Tensor.item() cannot be called on meta tensors" deep in the first step
        raise ValueError("cannot sample on the meta device, which holds no values: load the model's weights (or pass "
                         "device=) first")
    dtype = model_dtype(model)
    shape = sample_shape_of(model, sample_shape)
    denoiser = GraphedDenoiser(model) if cuda_graphs else model
    step_kwargs = {}
    accepts = inspect.signature(scheduler.step).parameters
    takes_generator = "generator" in accepts  # PNDM, LMS, Heun… do not
    if "eta" in accepts:
        if not 0.0 <= eta <= 1.0:  # above 1 DDIM's noise variance exceeds 1 - ᾱ_prev: NaN images
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        step_kwargs["eta"] = eta
    elif eta != 0.0:
        raise ValueError(f"{type(scheduler).__name__}.step takes no eta; use eta=0.0 with this scheduler")
    learned_variance = reads_learned_variance(scheduler)
    if class_labels is not None:
        class_labels = integer_labels(class_labels, num_samples)
    cond = dict(cond or {})
    check_per_sample(cond, num_samples)
    if class_labels is not None:
        cond["class_labels"] = class_labels
    if "class_labels" in cond:
        _check_class_labels(model, cond["class_labels"])
    check_conditioning(model, cond)

    config = _without_learned_variance(scheduler)

    def fresh_scheduler(start=0, stop=1, steps=num_inference_steps):
        # DPMSolverSDEScheduler's step takes no generator: its Brownian noise comes from noise_sampler_seed, one tree
        # for the batch (or one seeded from the global RNG); one seed per sample makes it the sample's own.
        # (its Brownian tree takes no negative seed; torch's generators wrap them modulo 2**64 anyway)
        per_sample = {"noise_sampler_seed": [(seed + i) % 2**63 for i in range(start, stop)]} \
            if "noise_sampler_seed" in config else {}
        sched = type(scheduler).from_config(config, **per_sample)
        sched.set_timesteps(steps, device=device)
        return sched

    def stepped_on(sched):
        # What a step moves between: the sigmas where the scheduler has them (Karras or exponential sigmas stay
        # distinct, and the steps finite, where their rounded timesteps repeat), else the timesteps.
        sigmas = getattr(sched, "sigmas", None)
        return (sched.timesteps if sigmas is None else sigmas).tolist()

    first = fresh_scheduler()
    timesteps, levels = first.timesteps, stepped_on(first)
    # Rounded onto the training steps, too many steps repeat a timestep, and with it the sigma DPM-Solver and UniPC
    # step to: a zero-length step and NaN images (said to be the model diverging); Heun and PNDM repeat them by
    # design, at any step count.
    if len(set(levels)) < len(levels) and num_inference_steps > 10:
        by_design = stepped_on(fresh_scheduler(steps=10))  # (PNDM cannot set 2)
        if len(set(by_design)) == len(by_design):
            raise ValueError(f"{type(scheduler).__name__} repeats timesteps at {num_inference_steps} steps (rounded "
                             f"onto its {config.get('num_train_timesteps')} training steps); use fewer steps")
    out, diverged = [], 0
    calls = len(timesteps)  # Heun, PNDM… call the model more often than once per step
    bar = tqdm(total=math.ceil(num_samples / batch_size) * calls, desc="sample", disable=disable)
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        # Per-sample CPU generators: identical noise on every device and for every batch split.
        # Modulo 2**64, as torch reads the seeds it takes (-1 is 2**64 - 1): larger ones overflowed in manual_seed.
        gens = [torch.Generator().manual_seed((seed + i) % 2**64) for i in range(start, stop)]
        sched = fresh_scheduler(start, stop)
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) * sched.init_noise_sigma
        batch_cond = model_cond(select(cond, slice(start, stop)), device, dtype)
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            t_batch = t.to(device).expand(stop - start)
            prediction = denoise(denoiser, x_in.to(dtype), t_batch, **batch_cond).float()
            if learned_variance and prediction.shape[1] != 2 * shape[0]:
                raise ValueError(f"{type(scheduler).__name__} has variance_type={scheduler.config.variance_type!r}, "
                                 f"which needs the model to output {2 * shape[0]} channels (noise and variance); "
                                 f"it outputs {prediction.shape[1]}")
            eps = prediction[:, : shape[0]]  # learned-variance models (DiT) also output the variance
            if callback is not None:
                callback(dict(i=i, t=t_batch, x=x_in, eps=eps, start=start, cond=batch_cond))
            generator = {"generator": gens} if takes_generator else {}
            x = sched.step(prediction if learned_variance else eps, t, x, **generator, **step_kwargs).prev_sample
            bar.update(1)
        x = x.float().cpu()
        diverged += int((~torch.isfinite(x)).flatten(1).any(1).sum())
        out.append(x if postprocess is None else postprocess(x))
    bar.close()
    if diverged:  # returned all the same: the caller decides (msfp.samples.generate refuses to write them)
        warnings.warn(f"{diverged} of {num_samples} images have NaN or inf values: the model or the sampler diverged",
                      NonFiniteSamplesWarning, stacklevel=2)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 2) -> None:
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as a PNG grid of ``nrow`` columns, atomically."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y: y + h, x: x + w] = pixels[k].transpose(1, 2, 0)
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")
