"""Evaluate a sample file: distribution metrics against a reference, and paired fidelity against other samples.

- Offline, in the shipped feature network's space (:mod:`msfp.feature_net`; 1x32x32 Fashion-MNIST-style images):
  FD, KID, classifier score, precision/recall.
- Inception-v3 (:mod:`msfp.inception`, only with a local weights file): FID, sFID, IS, precision/recall.
- Paired (samples drawn from the same seeds, e.g. by the full-precision model): PSNR and MSE.
- Per-timestep noise-prediction MSE of a model against the full-precision outputs stored with trajectory points
  (:func:`per_timestep_eps_mse`), and its γ_t²-weighted mean (:func:`eps_mse_weighted`).

Metrics that cannot be computed are listed with the reason in ``result["skipped"]``, never silently left out.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msfp.conditioning import check_conditioning, model_cond, select
from msfp.data import load_fashion_mnist, to_model_range
from msfp.feature_net import compute_features, feature_dim, load_feature_net, load_reference_stats
from msfp.losses import dfa_weights, factor_per_timestep
from msfp.metrics import classifier_score, fd_bootstrap, feature_stats, frechet_distance, kid, precision_recall
from msfp.models import denoise
from msfp.samples import from_uint8, load_samples, read_npz, to_uint8
from msfp.sampling import model_device, model_dtype

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = 10  # classifier score / IS splits, as in the reference IS code
INCEPTION_METRICS = "fid, sfid, inception_score, inception_precision, inception_recall"
MIN_DISTRIBUTION_SAMPLES = 4  # precision/recall compare each point with its 3rd nearest neighbour; FD needs 2
# FD's "± std" is the spread over this many bootstrap resamples of the samples (result["fd_bootstrap"] keeps them).
FD_BOOTSTRAP_RESAMPLES = 200
PSNR_CHUNK_PIXELS = 1 << 22  # pixels psnr compares at a time (two int32 arrays of 16 MiB)
SAMPLING_SETTINGS = ("scheduler", "steps", "eta", "guidance")  # of a sample file's meta (msfp.samples.generate)
FEATURE_NET_IMAGE = (32, 32, 1)  # (H, W, C) the shipped feature network takes: Fashion-MNIST padded to 32x32
# (key, label) in table order; keys are those of result["metrics"].
METRICS = (
    ("fd", "FD (feature net)"), ("kid", "KID (feature net)"), ("classifier_score", "classifier score"),
    ("precision", "precision (feature net)"), ("recall", "recall (feature net)"),
    ("fid", "FID (Inception-v3)"), ("sfid", "sFID (Inception-v3)"), ("inception_score", "Inception score"),
    ("inception_precision", "precision (Inception-v3)"), ("inception_recall", "recall (Inception-v3)"),
    ("psnr", "PSNR vs paired samples (dB)"), ("paired_mse", "MSE vs paired samples (0-255)"),
    ("eps_mse", "noise-prediction MSE vs --fp-model (mean over t)"),
    ("eps_mse_weighted", "noise-prediction MSE vs --fp-model (γ²-weighted)"),
)


@dataclass
class Reference:
    """What the samples are compared with: images (uint8 (N, H, W, C)) and/or feature-net ``(mu, sigma)``."""

    name: str
    images: np.ndarray | None = None
    stats: tuple | None = None
    # Why there are no images (so KID, precision/recall and Inception FID cannot be computed).
    no_images_reason: str | None = None
    # Feature-net features of ``images``, computed on first use: evaluating several sample files against one
    # reference (msfp compare) computes them once.
    features: torch.Tensor | None = None


def _too_few(images, what: str = "samples") -> str | None:
    if images is not None and len(images) < MIN_DISTRIBUTION_SAMPLES:
        return f"they need at least {MIN_DISTRIBUTION_SAMPLES} {what}, got {len(images)}"
    return None


def _splits(n: int) -> int:
    """Splits of at least 10 images: a split's score is at most its image count (1 image: always exactly 1)."""
    return max(1, min(SPLITS, n // 10))


def load_image_dir(path: str | os.PathLike) -> np.ndarray:
    """All images of a directory (sorted by name), as uint8 (N, H, W, C); gray images give C = 1: grayscale files, and
    RGB files whose three channels are equal, when every file's are (torchvision's save_image writes gray so)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"reference image directory {path} not found")
    # Hidden files are not images: macOS writes "._name.png" metadata beside each copied file.
    files = sorted(f for f in path.iterdir()
                   if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith("."))
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images, gray = [], True
    for f in files:
        try:
            with Image.open(f) as im:
                # 16-bit PNGs open as I;16 (I in older Pillow), and convert("L") would clip them to 0 or 255.
                if im.mode.startswith("I"):
                    a = np.round(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8)
                else:
                    a = np.asarray(im.convert("L" if _grayscale(im) else "RGB"))
        except (OSError, SyntaxError) as e:  # Pillow raises both for damaged files
            raise ValueError(f"{f}: not a readable image ({e})") from e
        a = a[..., None] if a.ndim == 2 else a
        if images and a.shape != images[0].shape:
            raise ValueError(f"{f}: shape {a.shape} differs from {files[0].name}'s {images[0].shape}; all reference "
                             "images must have the same size and channel count")
        images.append(a)
        gray = gray and bool((a == a[..., :1]).all())
    return np.stack([a[..., :1] for a in images] if gray else images)


def _grayscale(im) -> bool:
    """Whether a Pillow image holds gray levels only: a gray mode, or a palette of grays (GIFs, indexed PNGs)."""
    if im.mode in ("P", "PA"):
        palette = im.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return im.mode in ("1", "L", "LA")


def load_reference(ref: str | os.PathLike | None = None, ref_images: str | os.PathLike | None = None,
                   data_dir: str | os.PathLike | None = None) -> Reference:
    """``ref``: an ``.npz`` with images (``arr_0``, e.g. a sample file) or feature-net statistics (``mu``, ``sigma``);
    ``ref_images``: a directory of images; neither: the test split (``t10k`` IDX files) in ``data_dir``, every metric
    from its images, or else the Fashion-MNIST test split: shipped statistics for FD, the images from Debian's package
    for the rest."""
    if ref is not None and ref_images is not None:
        raise ValueError("give --ref or --ref-images, not both")
    if ref_images is not None:
        return Reference(name=str(ref_images), images=load_image_dir(ref_images))
    if ref is not None:
        path = Path(ref)
        data = read_npz(path, "reference file")
        if "arr_0" in data:
            return Reference(name=str(path), images=load_samples(path)["images"])
        if not {"mu", "sigma"} <= data.keys():
            raise ValueError(f"{path}: expected reference images (arr_0) or feature-net statistics (mu, sigma); "
                             f"got keys {sorted(data)}")
        mu, sigma = data["mu"], data["sigma"]
        finite = bool(np.isfinite(mu).all() and np.isfinite(sigma).all())
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not finite:
            raise ValueError(f"{path}: expected finite statistics mu (D,) and sigma (D, D); got mu {mu.shape}, sigma "
                             f"{sigma.shape}, finite: {finite}")
        return Reference(name=str(path), stats=(mu, sigma),
                         no_images_reason=f"the reference {path.name} holds statistics only, no images")
    if data_dir is not None:  # asked for by name: a missing file is an error, not KID, precision and recall dropped
        test, _ = load_fashion_mnist("test", data_dir)
        # Not the shipped statistics: they record no digest of their images, and these may be part of the split or
        # another data set (MNIST's files have the same names); FD would then compare with a reference other than
        # KID's, under a false name.
        return Reference(name=f"{data_dir} test split ({len(test):,} images)", images=to_uint8(to_model_range(test)))
    name = "Fashion-MNIST test split (10,000 images)"
    stats = load_reference_stats("test")
    try:
        test, _ = load_fashion_mnist("test")
    except FileNotFoundError as e:
        return Reference(name=name, stats=stats, no_images_reason=f"the Fashion-MNIST test images are not available "
                                                                  f"({e})")
    return Reference(name=name, images=to_uint8(to_model_range(test)), stats=stats)


def _check_pairs(samples: dict, paired: dict, samples_path, paired_path) -> None:
    """Paired metrics only mean something for images drawn from the same seeds (and labels)."""
    a, b = samples["images"], paired["images"]
    if a.shape != b.shape:
        raise ValueError(f"{samples_path} has images {a.shape} but {paired_path} has {b.shape}; paired metrics need "
                         "the same number and size of images")
    for key in ("seeds", "labels"):
        x, y = samples[key], paired[key]
        if key == "seeds" and (x is None or y is None):
            missing = samples_path if x is None else paired_path
            raise ValueError(f"{missing} has no seeds, so it cannot be paired: sample both files with `msfp sample`")
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            i = 0 if x is None or y is None else int(np.flatnonzero(x != y)[0])
            show = lambda v: "none" if v is None else v[i]  # noqa: E731
            raise ValueError(f"{samples_path} and {paired_path} were not drawn with the same {key}: image {i} has "
                             f"{key[:-1]} {show(x)} vs {show(y)}; sample both with the same --seed and --num")
    # Allowed (how far are 10 steps from 50?), but then the paired metrics are not the model's error alone.
    differ = [f"{key} {samples['meta'][key]!r} vs {paired['meta'][key]!r}" for key in SAMPLING_SETTINGS
              if key in samples["meta"] and key in paired["meta"] and samples["meta"][key] != paired["meta"][key]]
    if differ:
        warnings.warn(f"{samples_path} and {paired_path} were drawn with different sampling settings "
                      f"({', '.join(differ)}): the paired metrics measure that difference too", stacklevel=3)


def psnr(images, others) -> tuple[float, float]:
    """``(psnr_db, mse)`` of two uint8 image sets over all pixels, on the 0-255 scale (PSNR inf when identical)."""
    images, others = np.asarray(images), np.asarray(others)
    if images.shape != others.shape or images.size == 0:  # broadcasting would compare every image with one
        raise ValueError(f"PSNR pairs the images of two equally shaped, non-empty sets, got {images.shape} and "
                         f"{others.shape}")
    if images.dtype != np.uint8 or others.dtype != np.uint8:  # the integer sum below would truncate floats
        raise ValueError(f"PSNR takes uint8 images (0-255), got {images.dtype} and {others.dtype}")
    # Exact integer sums over chunks of pixels: float64 copies of both sets, their difference and its square took ~24x
    # the sets' uint8 size (220 GiB for 50,000 256x256 RGB pairs).
    images, others = images.reshape(-1), others.reshape(-1)
    squared_error = 0
    for start in range(0, images.size, PSNR_CHUNK_PIXELS):
        diff = images[start: start + PSNR_CHUNK_PIXELS].astype(np.int32)
        diff -= others[start: start + PSNR_CHUNK_PIXELS]
        squared_error += int(np.square(diff).sum(dtype=np.int64))  # a square fits int32 (255² < 2³¹), a sum not
    mse = squared_error / images.size
    return (10 * math.log10(255.0 ** 2 / mse) if mse > 0 else math.inf), mse


@torch.no_grad()
def per_timestep_eps_mse(model, points, device=None, batch_size: int = 256) -> dict[float, float]:
    """Mean squared error between ``model``'s noise predictions and the full-precision ones (``points.eps``, from
    :func:`msfp.calibration.collect_trajectories`), per timestep, in sampling order (largest timestep first)."""
    check_conditioning(model, points.cond)
    device, dtype = model_device(model, device), model_dtype(model)
    sums, counts = defaultdict(float), defaultdict(int)
    for start in range(0, len(points), batch_size):
        sl = slice(start, start + batch_size)
        x, t, eps = points.x[sl].to(device, dtype), points.t[sl].to(device), points.eps[sl]  # (points: float32)
        cond = model_cond(select(points.cond, sl), device, dtype)
        # Learned-variance models (DiT) also output the variance: compare the noise channels only.
        out = denoise(model, x, t, **cond).float().cpu()[:, : eps.shape[1]]
        err = (out - eps).pow(2).flatten(1).mean(1)
        for ti, e in zip(t.tolist(), err.tolist()):
            sums[ti] += e
            counts[ti] += 1
    return {ti: sums[ti] / counts[ti] for ti in sorted(sums, reverse=True)}


def eps_mse_weighted(eps_mse: dict[float, float], scheduler) -> float:
    """Per-timestep ε MSE (:func:`per_timestep_eps_mse` along ``scheduler``'s trajectory of ``len(eps_mse)``
    steps) weighted by γ_t², normalised to mean 1: the squared error each step passes on to ``x_{t-1}``.

    The plain mean over t is dominated by the last step (t = 0), where the ε error is largest but γ_0 is tiny, so it
    hardly moves the sample; this weighting counts errors the way sampling feels them (SPEC §2.4)."""
    if not eps_mse:
        raise ValueError("no ε MSE values to weight: per_timestep_eps_mse found no trajectory points")
    # (Heun's and PNDM's own points were said to be "not the trajectory")
    timesteps, gammas = factor_per_timestep(scheduler, len(eps_mse), "its ε MSE by; weight along a DDIM, Euler or "
                                            "DPM-Solver trajectory")
    # Keys as numbers: JSON gives strings, Euler-type schedulers fractional timesteps.
    by_t = {float(t): e for t, e in eps_mse.items()}
    expected = [float(t) for t in timesteps.tolist()]
    if sorted(by_t, reverse=True) != expected:
        raise ValueError(f"ε MSE timesteps {sorted(by_t, reverse=True)} are not the {len(eps_mse)}-step "
                         f"trajectory of {type(scheduler).__name__} ({expected})")
    weights = dfa_weights(gammas, "square")
    return float(sum(w * by_t[t] for w, t in zip(weights.tolist(), expected)) / len(eps_mse))


def eps_mse_means(eps_mse: dict[float, float], scheduler) -> tuple[float | None, float | None, str | None]:
    """``(plain mean, γ²-weighted mean, None)`` of a per-timestep ε MSE, or ``(None, None, why)`` when some timestep's
    is not finite: a diverged model has no mean, and JSON would hold null, which reads as "not applicable"."""
    diverged = [t for t, e in eps_mse.items() if not math.isfinite(e)]
    if diverged:
        return None, None, (f"the noise prediction error is not finite at t = {', '.join(map(str, diverged))}: the "
                            "model diverged there (eps_mse_per_timestep has the finite ones)")
    return sum(eps_mse.values()) / len(eps_mse), eps_mse_weighted(eps_mse, scheduler), None


def check_reference(reference: Reference, image_shape: tuple, inception: bool = False) -> None:
    """Raise if ``reference`` cannot be compared with images of ``image_shape`` (H, W, C) by the metrics that use it,
    the feature network's (32x32x1 images only) and, with ``inception``, Inception's: :func:`evaluate` checks before
    any metric, msfp compare before sampling for minutes or hours."""
    image_shape = tuple(image_shape)
    feature_net = image_shape == FEATURE_NET_IMAGE
    if not (feature_net or inception):  # the reference is not used
        return
    # Inception resizes any image to 299x299, so it would compare other sizes too, measuring the resizing as well.
    # Gray (1-channel) reference images for RGB samples are not: only Inception compares those, and it reads gray as
    # three equal channels, so they compare as the same set stored in RGB would (load_image_dir makes that one).
    if reference.images is not None and reference.images.shape[1:] not in (image_shape, (*image_shape[:2], 1)):
        raise ValueError(f"reference images ({reference.name}) are {reference.images.shape[1:]} but samples are "
                         f"{image_shape}")
    if feature_net and reference.stats is not None and len(reference.stats[0]) != (dim := feature_dim()):
        raise ValueError(f"the reference statistics ({reference.name}) are {len(reference.stats[0])}-dimensional, the "
                         f"feature network's features {dim}-dimensional: statistics of another network "
                         "(e.g. Inception's 2048) do not apply")


def _feature_net_metrics(images, reference: Reference, metrics: dict, skipped: dict, device):
    """Fills ``metrics``/``skipped``; returns FD's bootstrap replicates (None when FD cannot be computed)."""
    if images.shape[1:] != FEATURE_NET_IMAGE:
        skipped["fd, kid, classifier_score, precision, recall"] = (
            f"the shipped feature network takes 32x32x1 Fashion-MNIST images; the samples are "
            f"{'x'.join(map(str, images.shape[1:]))}")
        return None
    net = load_feature_net(device=device)
    feats, logits = compute_features(net, from_uint8(images))
    metrics["classifier_score"], metrics["classifier_score_std"] = classifier_score(logits, _splits(len(logits)))
    too_few = _too_few(images) or _too_few(reference.images, "reference images")
    if too_few:
        skipped["fd, kid, precision, recall"] = too_few
        return None
    ref_feats = None
    if reference.images is None:
        skipped["kid, precision, recall"] = f"they need reference images: {reference.no_images_reason}"
    else:
        if reference.features is None:
            reference.features, _ = compute_features(net, from_uint8(reference.images))
        ref_feats = reference.features
        metrics["kid"], metrics["kid_std"] = kid(feats, ref_feats)
        metrics["precision"], metrics["recall"] = precision_recall(ref_feats, feats)
    ref_stats = reference.stats or feature_stats(ref_feats)
    metrics["fd"] = frechet_distance(*feature_stats(feats), *ref_stats)
    replicates = fd_bootstrap(feats, *ref_stats, resamples=FD_BOOTSTRAP_RESAMPLES)
    metrics["fd_std"] = float(replicates.std())
    return replicates


def _inception_metrics(images, reference: Reference, net, metrics: dict, skipped: dict) -> None:
    from msfp.inception import inception_features

    feats = inception_features(net, images)
    metrics["inception_score"], metrics["inception_score_std"] = classifier_score(
        feats["logits"], _splits(len(images)))
    too_few = _too_few(images) or _too_few(reference.images, "reference images")
    if too_few:
        skipped["fid, sfid, inception_precision, inception_recall"] = too_few
        return
    if reference.images is None:
        skipped["fid, sfid, inception_precision, inception_recall"] = (
            f"they need reference images: {reference.no_images_reason}")
        return
    ref = inception_features(net, reference.images)
    metrics["fid"] = frechet_distance(*feature_stats(feats["pool"]), *feature_stats(ref["pool"]))
    metrics["sfid"] = frechet_distance(*feature_stats(feats["spatial"]), *feature_stats(ref["spatial"]))
    metrics["inception_precision"], metrics["inception_recall"] = precision_recall(ref["pool"], feats["pool"])


def evaluate(samples_path, reference: Reference | None = None, inception_weights=None, paired_path=None,
             device=None) -> dict:
    """All metrics of the sample file ``samples_path``; see the module docstring. ``reference`` defaults to
    :func:`load_reference`'s default. Returns ``dict(samples, num_samples, reference, metrics, skipped,
    fd_bootstrap)`` (FD of each bootstrap resample, same resamples for every file of the same size; None without FD)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = load_samples(samples_path)
    paired = load_samples(paired_path) if paired_path is not None else None
    # Check the inputs before the slow metrics: fail fast.
    if paired is not None:
        _check_pairs(samples, paired, samples_path, paired_path)
    images = samples["images"]
    reference = reference if reference is not None else load_reference()
    check_reference(reference, images.shape[1:], inception=inception_weights is not None)
    if inception_weights is not None:
        from msfp.inception import InceptionFeatures

        inception = InceptionFeatures(inception_weights).to(device)
    metrics, skipped = {}, {}
    fd_replicates = _feature_net_metrics(images, reference, metrics, skipped, device)
    if inception_weights is None:
        skipped[INCEPTION_METRICS] = "no --inception-weights given"
    else:
        _inception_metrics(images, reference, inception, metrics, skipped)
    if paired is None:
        skipped["psnr, paired_mse"] = "no --paired samples given"
    else:
        metrics["psnr"], metrics["paired_mse"] = psnr(images, paired["images"])
    return dict(samples=str(samples_path), num_samples=len(images), image_shape=list(images.shape[1:]),
                reference=reference.name, paired=None if paired_path is None else str(paired_path),
                metrics=metrics, skipped=skipped,
                fd_bootstrap=None if fd_replicates is None else [round(float(v), 4) for v in fd_replicates])


def format_table(result: dict) -> str:
    """The metrics as an aligned text table, then the skipped ones with their reasons."""
    m = result["metrics"]
    lines = [f"samples:   {result['samples']} ({result['num_samples']} images, "
             f"{'x'.join(map(str, result['image_shape']))})", f"reference: {result['reference']}"]
    if result.get("paired"):
        lines.append(f"paired:    {result['paired']}")
    rows = []
    for key, label in METRICS:
        if key in m:
            std = m.get(f"{key}_std")
            rows.append((label, f"{m[key]:.4g}" + ("" if std is None else f" ± {std:.2g}")))
    width = max((len(label) for label, _ in rows), default=0)
    lines += ["", f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    if result["skipped"]:
        lines += ["", "skipped:"] + [f"  {keys}: {why}" for keys, why in result["skipped"].items()]
    return "\n".join(lines)
