"""Measure the quality of msfp's default model (or any 1-channel 32x32 Fashion-MNIST model) in the feature space of
the shipped feature network: Fréchet distance (FD) and KID against the Fashion-MNIST test split (with --data, its test
images, FD included, as msfp eval --data-dir does; unset, FD from the shipped statistics), the classifier score
(Inception-score analogue), and the same numbers for N real training images (the floor a perfect generator reaches
with the same N). Also writes a PNG grid of the first samples.

    python scripts/evaluate_default_model.py --data .data --num-samples 10000 --steps 100 --batch 1000 \
        --out src/msfp/assets/fashion_ddpm/eval.json

gave the shipped model card's numbers (on an H100; on this 2-core CPU, use fewer samples).

FD is biased upward for small N (the covariance estimate is noisy): compare only numbers with the same N, and compare
a model's FD with the real-data floor at that N.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from msfp.data import CLASS_NAMES, DEFAULT_DATA_DIR, load_fashion_mnist, to_model_range
from msfp.environment import HelpFormatter, check_minimums, command_line, machine_info
from msfp.evaluation import load_reference
from msfp.feature_net import compute_features, load_feature_net
from msfp.fileio import write_json
from msfp.metrics import classifier_score, feature_stats, frechet_distance, kid
from msfp.models import load_model
from msfp.samples import from_uint8
from msfp.sampling import sample, save_grid


def quality(feats, logits, ref_stats, ref_feats, args) -> dict:
    fd = frechet_distance(*feature_stats(feats), *ref_stats)
    kid_mean, kid_std = kid(feats, ref_feats, subsets=args.kid_subsets, subset_size=args.kid_subset_size,
                            seed=args.seed)
    cs_mean, cs_std = classifier_score(logits, splits=args.splits)
    counts = torch.bincount(logits.argmax(1), minlength=len(CLASS_NAMES)).tolist()
    return dict(fd=fd, kid=kid_mean, kid_std=kid_std, classifier_score=cs_mean, classifier_score_std=cs_std,
                predicted_classes=dict(zip(CLASS_NAMES, counts)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="default", help="msfp.load_model spec")
    p.add_argument("--num-samples", type=int, default=1000,
                   help="images to sample (and real training images for the floor: at most the training split's)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--batch", type=int, default=250, help="images per denoiser call")
    p.add_argument("--seed", type=int, default=0,
                   help="image i is drawn with seed + i; also seeds the real-image draw and KID subsets")
    p.add_argument("--kid-subsets", type=int, default=100, help="random subsets KID is averaged over")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="images per KID subset (capped at the smaller set)")
    p.add_argument("--splits", type=int, default=10, help="classifier-score splits")
    p.add_argument("--data", default=None,
                   help="directory with the Fashion-MNIST IDX files (unset: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default="runs/evaluate_default_model.json", help="JSON result file")
    p.add_argument("--grid", default="runs/evaluate_default_model.png", help="PNG grid of the first samples")
    p.add_argument("--grid-count", type=int, default=64, help="images in the PNG grid (8 per row)")
    p.add_argument("--grid-steps", type=int, default=None,
                   help="sample the grid separately with this many steps (unset: --steps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to sample")
    args = p.parse_args(argv)
    # Checked before the sampling they would otherwise waste: FD's covariance and KID need 2 images at least.
    check_minimums(p, args, num_samples=2, kid_subsets=1, kid_subset_size=2, grid_count=1, grid_steps=1)
    if not 1 <= args.splits <= args.num_samples:
        p.error(f"--splits must be between 1 and --num-samples ({args.num_samples}), got {args.splits}")
    train_u8, _ = load_fashion_mnist("train", args.data)
    if args.num_samples > len(train_u8):  # the floor would be measured on fewer real images than the samples
        p.error(f"--num-samples {args.num_samples} is more than the {len(train_u8):,} training images in "
                f"{args.data or DEFAULT_DATA_DIR}, which give the real-data floor at the same N")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, scheduler = load_model(args.model)
    model.to(args.device)
    net = load_feature_net()
    reference = load_reference(data_dir=args.data)  # msfp eval's: --data's test images, FD from them too
    if reference.images is None:  # KID needs features, not just moments
        raise FileNotFoundError(reference.no_images_reason)
    ref_feats, _ = compute_features(net, from_uint8(reference.images))
    ref_stats = reference.stats or feature_stats(ref_feats)

    start = time.time()
    images = sample(model, scheduler, args.num_samples, num_inference_steps=args.steps, seed=args.seed,
                    batch_size=args.batch, eta=args.eta)
    sample_time = time.time() - start
    grid_steps = args.grid_steps or args.steps
    grid = images[: args.grid_count] if grid_steps == args.steps else sample(
        model, scheduler, args.grid_count, num_inference_steps=grid_steps, seed=args.seed, batch_size=args.batch,
        eta=args.eta)
    save_grid(grid, args.grid, nrow=8)
    # Real images are 8-bit, so quantise the samples the same way (as FID pipelines do by writing PNGs).
    images = ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    feats, logits = compute_features(net, images)

    idx = torch.randperm(len(train_u8), generator=torch.Generator().manual_seed(args.seed))[: args.num_samples]
    real_feats, real_logits = compute_features(net, to_model_range(train_u8[idx]))

    result = dict(
        model=args.model, num_samples=args.num_samples, sampler=type(scheduler).__name__, steps=args.steps,
        eta=args.eta, seed=args.seed, grid=dict(path=args.grid, count=args.grid_count, steps=grid_steps),
        reference=reference.name,
        samples=quality(feats, logits, ref_stats, ref_feats, args),
        real_train_floor=quality(real_feats, real_logits, ref_stats, ref_feats, args),
        sample_time_s=round(sample_time, 1), sample_time_per_step_and_image_ms=round(
            1000 * sample_time / (args.steps * args.num_samples), 2), total_time_s=round(time.time() - start, 1),
        machine=machine_info(args.device),
        command=command_line(__file__, argv),
    )
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
