"""PTQ quality of the MSFP presets and their baselines on one model (default: msfp's shipped DDPM).

    python benchmarks/ptq.py --out runs/ptq.json [--model default --presets w4a4-int,w4a4-fp,w4a4-msfp,w6a6-msfp]
        [--calib-samples 64 --calib-steps 25 --eval-samples 256 --eval-steps 25 --heldout-samples 16]

For every preset: calibration time, the noise-prediction MSE against the full-precision model on *held-out*
trajectory points (the full-precision model's own DDIM trajectories from other seeds) at every timestep, its plain
and γ²-weighted means (the plain one is dominated by t = 0, where the sampler barely uses ε), and the
quality of samples drawn with the same seeds by every method: FD and classifier score in the shipped feature
network's space (vs the Fashion-MNIST test statistics) and the paired error against the full-precision samples
(``paired_mse_vs_fp``: in the model's [-1, 1] image range, where ``msfp eval``'s ``paired_mse`` is on 0–255, i.e.
127.5² times larger). Prints one JSON document (also written atomically to --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import msfp
from msfp.calibration import collect_trajectories
from msfp.environment import HelpFormatter, command_line, machine_info, preset_names
from msfp.evaluation import eps_mse_weighted, per_timestep_eps_mse
from msfp.feature_net import compute_features, load_feature_net, load_reference_stats
from msfp.fileio import write_json
from msfp.metrics import classifier_score, feature_stats, frechet_distance
from msfp.sampling import sample


def sample_quality(images, reference, net) -> dict:
    images = ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # 8-bit, like real images
    feats, logits = compute_features(net, images)
    return dict(fd=frechet_distance(*feature_stats(feats), *reference),
                classifier_score=classifier_score(logits, splits=1)[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default', a save_pretrained directory or a Hub id (msfp.load_model)")
    p.add_argument("--presets", default="w4a4-int,w4a4-fp,w4a4-msfp,w6a6-msfp",
                   help="comma-separated quantization presets to compare")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration trajectories (images)")
    p.add_argument("--calib-steps", type=int, default=25, help="DDIM steps per calibration (and held-out) trajectory")
    p.add_argument("--heldout-samples", type=int, default=16,
                   help="held-out trajectories for the per-timestep noise MSE")
    p.add_argument("--eval-samples", type=int, default=256, help="images sampled per method for FD and scores")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps of the evaluation samples")
    p.add_argument("--batch", type=int, default=256, help="images per model call (calibration, MSE, sampling)")
    p.add_argument("--seed", type=int, default=0,
                   help="calibration seed; held-out trajectories use seed + 10000, samples seed + 20000")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's choice)")
    p.add_argument("--out", default="runs/ptq.json", help="JSON result file")
    args = p.parse_args(argv)
    presets = preset_names(p, args.presets)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    fp, scheduler = msfp.load_model(args.model)
    fp.to(device)
    net = load_feature_net(device=device)
    reference = load_reference_stats("test")
    heldout = collect_trajectories(fp, scheduler, args.heldout_samples, args.calib_steps, seed=args.seed + 10_000,
                                   batch_size=args.batch)
    eval_seed = args.seed + 20_000  # neither calibration nor held-out seeds
    draw = lambda m: sample(m, scheduler, args.eval_samples, args.eval_steps, seed=eval_seed,  # noqa: E731
                            batch_size=args.batch)
    start = time.time()
    fp_images = draw(fp)
    results = {"fp": dict(sample_seconds=time.time() - start, **sample_quality(fp_images, reference, net))}

    for preset in presets:
        qmodel = msfp.quantize(copy.deepcopy(fp), preset)
        start = time.time()
        report = msfp.calibrate(qmodel, fp, scheduler, num_samples=args.calib_samples, num_steps=args.calib_steps,
                                seed=args.seed, batch_size=args.batch)
        calib_seconds = time.time() - start
        mse = per_timestep_eps_mse(qmodel, heldout, device, args.batch)
        start = time.time()
        images = draw(qmodel)
        layers = msfp.surgery.quant_layers(qmodel).values()
        results[preset] = dict(
            calibration_seconds=calib_seconds, calibration_points=report.num_points,
            sample_seconds=time.time() - start,
            eps_mse_mean=sum(mse.values()) / len(mse), eps_mse_weighted=eps_mse_weighted(mse, scheduler),
            eps_mse_per_timestep=mse,
            paired_mse_vs_fp=(images - fp_images).pow(2).mean().item(),
            aals=sum(bool(layer.info["aal"]) for layer in layers),
            unsigned_act_layers=sum(layer.info["act_format"].startswith("u") for layer in layers),
            **sample_quality(images, reference, net))
        print(f"{preset}: FD {results[preset]['fd']:.1f}, eps MSE {results[preset]['eps_mse_mean']:.4g}, "
              f"calibration {calib_seconds:.1f} s", file=sys.stderr)

    out = dict(benchmark="ptq", model=args.model, settings=vars(args), machine=machine_info(device),
               command=command_line(__file__, argv),
               results=results)
    write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
