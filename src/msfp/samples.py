"""Sample files: seeded generation, optionally sharded across processes, stored as ``.npz``.

A sample file holds ``arr_0``: uint8 images (N, H, W, C) — the layout of the guided-diffusion evaluator's batches, so
its tools read our files and ours read theirs —, ``seeds`` int64 (N,): image ``i`` was drawn by a generator seeded with
``seeds[i]`` (its label too, for class-conditional models: ``labels`` int64 (N,)), and ``meta``: a JSON string with
the settings.

Sharding: under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) rank ``r`` draws a contiguous slice of the
indices and writes it beside the output; rank 0 merges the slices (so the output folder must be shared by the ranks,
as it is on one machine). Every image has its own generator, so the merged file equals a single-process run.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
import warnings
import zipfile
from pathlib import Path

import diffusers
import numpy as np
import torch
from torch import nn

from msfp.checks import whole_number
from msfp.cuda_graphs import GraphedDenoiser
from msfp.fileio import atomic_path, check_writable, resolved_parent
from msfp.models import class_info, denoise, model_config
from msfp.sampling import NonFiniteSamplesWarning, model_device, sample, save_grid

# Schedulers whose ``step`` takes the per-sample generators that make sampling noise batch-size invariant.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
}
GRID_COUNT = 64
# Seed ranges of msfp compare, quantize and finetune: image i is drawn from seed + i, calibration (and teacher)
# trajectory i from seed + CALIB_SEED_OFFSET + i, held-out trajectory i from seed + HELDOUT_SEED_OFFSET + i, so no
# method is evaluated on the noise it was calibrated on.
CALIB_SEED_OFFSET = 10_000
HELDOUT_SEED_OFFSET = 20_000


def get_scheduler(name: str, base):
    """The scheduler ``name`` (a key of :data:`SCHEDULERS`) built from ``base``'s config (the model's training betas)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base.config)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] → uint8 (N, H, W, C), rounded as :func:`msfp.sampling.save_grid` does."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(images) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, C, H, W) in [-1, 1]."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def sample_labels(num_classes: int, seeds) -> torch.Tensor:
    """One label per image, drawn from the image's own seed (as NVlabs EDM does): independent of batching and
    sharding, and redrawing one image with its seed (``--seed s -n 1``) gives it the same label."""
    # numpy's seed sequences take non-negative entries only; torch's generators take any int64 seed.
    return torch.tensor([int(np.random.default_rng(int(s) % 2**64).integers(num_classes)) for s in seeds],
                        dtype=torch.long)


class Guided(nn.Module):
    """Classifier-free guidance: ``ε_u + w·(ε_c − ε_u)``, with ``ε_u`` the prediction for ``null_label``."""

    def __init__(self, model: nn.Module, scale: float, null_label: int):
        super().__init__()
        self.model, self.scale, self.null_label = model, scale, null_label

    @property
    def config(self):  # the sample shape and class count are the wrapped model's
        return self.model.config

    def forward(self, x, t, class_labels):
        out = denoise(self.model, torch.cat([x, x]), torch.cat([t, t]),
                      class_labels=torch.cat([class_labels, torch.full_like(class_labels, self.null_label)]))
        cond, uncond = out.chunk(2)
        # A learned variance (the channels after x's) is the conditional branch's, not extrapolated (as DiT does).
        c = x.shape[1]
        guided = uncond[:, :c] + self.scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)


def _check_arrays(arrays: dict, where) -> None:
    """A sample file's arrays: uint8 images (``arr_0``) and one seed (and label) per image, when present."""
    images = arrays["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape:
        raise ValueError(f"{where}: expected arr_0 = uint8 images (N, H, W, 1 or 3) with N, H, W >= 1 as written by "
                         f"`msfp sample`; got {images.dtype} {images.shape}")
    for key in ("seeds", "labels"):
        if key in arrays and arrays[key].shape != (len(images),):
            raise ValueError(f"{where}: {key} has shape {arrays[key].shape}, expected ({len(images)},)")


def save_samples(path, images: np.ndarray, seeds, labels=None, meta: dict | None = None) -> None:
    """Write a sample file atomically; ``images`` uint8 (N, H, W, C) (see :func:`to_uint8`), one seed (and label)
    per image."""
    arrays = dict(arr_0=np.asarray(images), seeds=np.asarray(seeds, dtype=np.int64),
                  meta=np.array(json.dumps(meta or {})))
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    _check_arrays(arrays, path)  # a cast to uint8 would silently turn floats in [-1, 1] into 0s and 1s
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)


def read_npz(path, what: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path`` (a ``what``), with one clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and talk about pickled data
        raise ValueError(f"{path}: not a .npz {what} (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zip, pickle and format errors (and a plain .npy: no .files) all mean "not an .npz"
        raise ValueError(f"{path}: not a readable .npz {what} ({type(e).__name__}: {e})") from e


def load_samples(path) -> dict:
    """``dict(images=uint8 (N, H, W, C), seeds=(N,) or None, labels=(N,) or None, meta=dict)``."""
    path = Path(path)
    data = read_npz(path, "sample file")
    if "arr_0" not in data:
        raise ValueError(f"{path}: expected arr_0 = uint8 images (N, H, W, 1 or 3) as written by `msfp sample`; "
                         f"got keys {sorted(data)}")
    _check_arrays(data, path)
    try:
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: meta is not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: meta is JSON {type(meta).__name__}, expected an object of sampling settings")
    return dict(images=data["arr_0"], seeds=data.get("seeds"), labels=data.get("labels"), meta=meta)


def grid_path(path) -> Path:
    """Where the PNG grid of a sample file goes: beside it, same name, ``.png``."""
    return Path(path).with_suffix(".png")


def _check_grid_path(out: Path) -> None:
    """Refuse, before sampling, a grid path that is a directory or a file other than a PNG image (an earlier grid is
    replaced, as the sample file is): the sample file would be written and the grid then fail, or replace that."""
    grid = grid_path(out)
    if grid.is_dir():
        raise ValueError(f"{grid} is a directory; the PNG grid of {out.name} is written there: choose another output")
    if grid.exists():
        try:
            with open(grid, "rb") as f:
                png = f.read(8) == b"\x89PNG\r\n\x1a\n"
        except OSError:
            png = False
        if not png:
            raise ValueError(f"{grid} exists and is not a PNG image; the PNG grid of {out.name} would replace it: "
                             "choose another output or remove it")


def _dist():
    """``(rank, world_size, created_group)``; joins the process group started by torchrun/accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        # gloo only synchronises (shards travel through files), so it serves CPU and GPU runs alike.
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), created


def _rank_device(device, rank: int, world: int):
    """The device a rank samples on: under torchrun each rank takes its own GPU (LOCAL_RANK), also for a plain
    ``cuda`` (the current device, GPU 0 for every rank)."""
    if world == 1:
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if device is None:
        return local if torch.cuda.is_available() else None
    device = torch.device(device)
    return local if device.type == "cuda" and device.index is None else device


def _shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.shard{rank}-of-{world}.npz")


def _merge_meta(metas: list[dict], per_rank) -> dict:
    """The meta of the file merged from the ranks' shards (``metas`` in rank order): the slowest rank's sampling time,
    and each ``per_rank`` setting as one value where every rank drew with the same, else as the list of each rank's
    (rank r drew the r-th slice of the seeds): with uneven slices the images per call differ, with GPUs the device."""
    merged = dict(metas[0], sample_time_s=max(m["sample_time_s"] for m in metas))
    for key in per_rank:
        values = [m[key] for m in metas]
        if any(v != values[0] for v in values):
            merged[key] = values
    return merged


class NonFiniteSamplesError(ValueError):
    """Sampling produced NaN or inf pixels: the model or the sampler diverged."""


def _require_finite(bad: torch.Tensor, first_seed: int, num_samples: int, world: int, context: str) -> None:
    """Raise :class:`NonFiniteSamplesError` on every rank if any rank drew a non-finite image (``bad``: per image of
    this rank, whether it has a NaN or inf pixel; uint8 conversion would silently turn NaN into black pixels)."""
    total = int(bad.sum())
    if world > 1:  # all ranks must raise together: one rank raising alone would leave the others at a barrier
        import torch.distributed as dist

        count = torch.tensor([total])
        dist.all_reduce(count)
        total = int(count)
    if total:
        where = f" (seed {first_seed + int(bad.nonzero()[0])} among them)" if bad.any() else ""
        raise NonFiniteSamplesError(f"{total} of {num_samples} images have NaN or inf pixels{where}: the model or the "
                                    f"sampler diverged ({context})")


def generate(model, scheduler, out, num_samples: int, num_inference_steps: int, seed: int = 0, batch_size: int = 64,
             eta: float = 0.0, guidance: float = 1.0, meta: dict | None = None, disable: bool = False,
             device=None, cuda_graphs: bool = False, sample_shape=None) -> dict | None:
    """Sample ``num_samples`` images into the sample file ``out`` and a PNG grid of the first 64 beside it;
    ``cuda_graphs`` replays the denoiser's calls from CUDA graphs (:class:`msfp.cuda_graphs.GraphedDenoiser`);
    ``sample_shape`` (C, H, W) is read from a diffusers model's config unless given (a plain model has none).

    Under torchrun with ``WORLD_SIZE`` > 1 each rank draws its slice and rank 0 merges; returns the
    :func:`load_samples` dict of the merged file on rank 0, ``None`` on other ranks.
    """
    num_samples = whole_number("num_samples", num_samples, 1)
    if not (isinstance(guidance, numbers.Real) and math.isfinite(guidance) and guidance >= 0):
        # inf wrote clipped, meaningless images (and Infinity into the JSON metadata); NaN read as a diverged model
        raise ValueError(f"guidance must be a finite number ≥ 0 (1: no guidance), got {guidance!r}")
    out = resolved_parent(out)  # "missing/../x.npz" does not exist (and passed the checks) until mkdir made "missing"
    if out.suffix != ".npz":  # "x.png" would be overwritten by its own grid
        raise ValueError(f"{out}: a sample file's name must end in .npz (its PNG grid is written beside it)")
    if out.is_dir():
        raise ValueError(f"{out} is a directory; name the sample file (.npz) to write")
    if out.exists():  # an earlier sample file is replaced, as an output is; anything else (reference statistics) not
        try:  # its names only: reading every image of a large earlier file would cost its size in memory, per rank
            with np.load(out, allow_pickle=False) as f:  # a .npy's array is no context manager: "not readable"
                held = sorted(f.files)
        except Exception as e:
            held = f"nothing readable as .npz ({type(e).__name__})"
        if not (isinstance(held, list) and {"arr_0", "seeds"} <= set(held)):
            raise ValueError(f"{out} exists and holds {held}, not the images and seeds msfp sample writes; it is not "
                             "a sample file to replace: choose another output or remove it")
    _check_grid_path(out)
    check_writable(out)  # an unwritable --out fails before sampling, not after
    rank, world, created = _dist()
    try:
        if num_samples < world:
            raise ValueError(f"--num {num_samples} is smaller than the number of processes ({world})")
        device = _rank_device(device, rank, world)
        if device is not None:
            model = model.to(device)
        start, stop = rank * num_samples // world, (rank + 1) * num_samples // world
        # What a quantized model's images depend on besides the seeds (README, "Same seeds, same images?"): the
        # images per call drawn, not asked for (8 images at --batch 64 are drawn 8 per call).
        setup = dict(batch_size=min(batch_size, stop - start), device=str(model_device(model)),
                     cuda_graphs=cuda_graphs)
        if getattr(model, "msfp_config", None) is not None:
            setup["backend"] = getattr(model, "msfp_backend", {}).get("kind", "fake")
        channels = sample_shape[0] if sample_shape is not None else model_config(model).get("in_channels")
        if channels not in (None, 1, 3):
            raise ValueError(f"{type(model).__name__} makes {channels}-channel outputs (latents?); sample files hold "
                             "images with 1 or 3 channels, and decoding latents is not supported")
        num_classes, null_label = class_info(model)
        if cuda_graphs:  # inside the guidance: a routed TALoRA model must be what the graphs wrap
            model = GraphedDenoiser(model)
        if guidance != 1.0:
            if null_label is None:
                raise ValueError(f"guidance {guidance} needs a class-conditional model with a null class (DiT); "
                                 f"{type(model).__name__} has none")
            model = Guided(model, guidance, null_label)
        seeds = np.arange(seed + start, seed + stop)
        labels = sample_labels(num_classes, seeds) if num_classes else None
        began = time.time()
        nonfinite = []

        def to_pixels(batch: torch.Tensor) -> torch.Tensor:  # per batch: the run never holds all images in float32
            nonfinite.append((~torch.isfinite(batch)).flatten(1).any(1))
            return torch.from_numpy(to_uint8(batch))

        # Image i uses the generator seeded with seed + i, on whichever rank draws it.
        with warnings.catch_warnings():  # _require_finite below refuses them, naming a seed
            warnings.simplefilter("ignore", NonFiniteSamplesWarning)
            images = sample(model, scheduler, stop - start, num_inference_steps, seed=seed + start,
                            batch_size=batch_size, eta=eta, class_labels=labels, disable=disable or rank != 0,
                            device=device, sample_shape=sample_shape, postprocess=to_pixels).numpy()
        _require_finite(torch.cat(nonfinite), seed + start, num_samples, world,
                        f"{type(scheduler).__name__}, {num_inference_steps} steps, eta {eta}; {out} was not written")
        meta = dict(meta or {}, num_samples=num_samples, steps=num_inference_steps, seed=seed, eta=eta,
                    guidance=guidance, scheduler=type(scheduler).__name__, world_size=world, **setup,
                    sample_time_s=round(time.time() - began, 2))
        if world > 1:
            import torch.distributed as dist

            save_samples(_shard_path(out, rank, world), images, seeds, labels, meta)
            dist.barrier()
            if rank != 0:
                dist.barrier()  # wait for rank 0 to merge, so that no rank exits while the others still work
                return None
            shards = [_shard_path(out, r, world) for r in range(world)]
            parts = [load_samples(s) for s in shards]
            images, seeds = (np.concatenate([p[k] for p in parts]) for k in ("images", "seeds"))
            labels = None if labels is None else np.concatenate([p["labels"] for p in parts])
            meta = _merge_meta([p["meta"] for p in parts], setup)
        save_samples(out, images, seeds, labels, meta)
        save_grid(from_uint8(images[:GRID_COUNT]), grid_path(out))
        if world > 1:
            for s in shards:
                s.unlink()
            dist.barrier()
        return load_samples(out)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
