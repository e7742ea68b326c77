"""Sample quality of W4A4 on FP8 codes (``backend="fp8"``) against the fake-quant reference: same models, same seeds.

    python benchmarks/fp8_quality.py --out runs/fp8_quality [--methods w4a4-msfp,w4a4-msfp+talora --num 160
        --steps 20 --batch 128 --control-batch 1 --calib-samples 64 --calib-steps 25 --finetune-iters 160
        --finetune-batch 8 --device cpu]

Builds each method exactly as ``msfp compare`` does (same calibration and fine-tuning seeds and settings, so its
fake-quant row is compare's row), then draws the same seeded images three times: on the fake-quant path; after
:func:`msfp.fp8.convert_to_fp8` (the Triton FP8 kernels on a GPU with FP8 tensor cores, the emulated path
elsewhere); and, as the yardstick, on the fake-quant path again with ``--control-batch`` images per denoiser call.
Each FP8 layer equals its fake-quant layer up to fp32 summation order; a convolution's summation order also depends
on the batch size (the library picks its algorithm per shape). Either way an ulp can move an activation across a
4-bit rounding boundary, and the difference grows from there through the network and the sampling steps, so this
measures both against the fake-quant images: FD and classifier score of each, FD differences with a paired-bootstrap
interval (the sample sets resampled with the same indices), PSNR against full precision and between the sets, the
largest and mean pixel differences, the fraction of identical images and pixels, and sampling times. On the Triton
kernels, one sampling step of each FP8 model is first recorded and its kernels compiled in parallel processes
(:func:`msfp.triton_kernels.precompile`, totals under ``precompiled``), so that compiling (69 kernels for the default
model, about a second each one by one) stays out of the sampling time. Prints one JSON document (also written
atomically to OUT/results.json); the sample files go to OUT/samples/.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

from msfp import triton_kernels
from msfp.checkpoint import freeze_weights
from msfp.compare import FINETUNED, METHODS, REFERENCE_METHOD, CompareSettings, Context, parse_methods
from msfp.config import PRESETS
from msfp.environment import HelpFormatter, command_line, machine_info
from msfp.evaluation import evaluate, load_reference, psnr
from msfp.fileio import write_json
from msfp.fp8 import convert_to_fp8, fp8_kernels_available
from msfp.metrics import bootstrap_interval
from msfp.models import load_model
from msfp.samples import CALIB_SEED_OFFSET, generate
from msfp.sampling import sample

MSFP_METHODS = (*PRESETS, *FINETUNED)


def difference(run: dict, reference: dict) -> dict:
    """How far one run's images (``dict(images, evaluation)``) are from the reference run's, drawn from the same
    seeds: FD difference with a paired-bootstrap 90 % interval, PSNR between the sets and their pixel differences."""
    images, ref_images = run["images"], reference["images"]
    diff = np.abs(images.astype(np.int16) - ref_images.astype(np.int16))
    db, mse = psnr(images, ref_images)
    fd_diffs = np.asarray(run["evaluation"]["fd_bootstrap"]) - np.asarray(reference["evaluation"]["fd_bootstrap"])
    fd_difference = run["evaluation"]["metrics"]["fd"] - reference["evaluation"]["metrics"]["fd"]
    return dict(fd_difference=fd_difference, fd_difference_interval=list(bootstrap_interval(fd_diffs, estimate=fd_difference)),
                psnr=db, mse=mse,
                max_abs_diff=int(diff.max()), mean_abs_diff=float(diff.mean()),
                identical_images=float((diff.reshape(len(diff), -1).max(axis=1) == 0).mean()),
                identical_pixels=float((diff == 0).mean()))


def precompile_sampling(model, scheduler, num_samples: int, batch_size: int, device, **options) -> dict:
    """Compile, in parallel processes, the FP8 kernels that drawing ``num_samples`` images ``batch_size`` per call
    launches: one sampling step is recorded (every batch size the split gives), not run. ``options`` go to
    :func:`msfp.triton_kernels.precompile`."""
    return triton_kernels.precompile(lambda: sample(model, scheduler, num_samples, 1, batch_size=batch_size,
                                                    disable=True, device=device), **options)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    defaults = CompareSettings()
    p.add_argument("--model", default=defaults.model,
                   help="'default', a save_pretrained directory or a Hub id (msfp.load_model)")
    p.add_argument("--methods", default="w4a4-msfp,w4a4-msfp+talora",
                   help=f"comma-separated msfp methods, any of {', '.join(MSFP_METHODS)}")
    p.add_argument("--num", type=int, default=defaults.num_samples, help="images per backend")
    p.add_argument("--steps", type=int, default=defaults.steps, help="DDIM sampling steps")
    p.add_argument("--calib-samples", type=int, default=defaults.calib_samples,
                   help="calibration trajectories (images)")
    p.add_argument("--calib-steps", type=int, default=defaults.calib_steps,
                   help="DDIM steps per calibration trajectory")
    p.add_argument("--finetune-iters", type=int, default=defaults.finetune_iters,
                   help="fine-tuning iterations of the LoRA/TALoRA methods")
    p.add_argument("--finetune-batch", type=int, default=defaults.finetune_batch,
                   help="fine-tuning batch size of the LoRA/TALoRA methods")
    p.add_argument("--num-loras", type=int, default=defaults.num_loras, help="TALoRA: LoRAs per layer")
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    p.add_argument("--seed", type=int, default=defaults.seed, help="image i is drawn with seed + i")
    p.add_argument("--batch", type=int, default=defaults.batch_size, help="images per denoiser call")
    p.add_argument("--control-batch", type=int, default=1,
                   help="images per call of the fake-quant control run (must differ from --batch; both are capped at "
                   "--num)")
    p.add_argument("--device", default=None, help="torch device (unset: cuda if available, else cpu)")
    p.add_argument("--out", default="runs/fp8_quality",
                   help="output directory: results.json, samples/ and the calibration cache/")
    args = p.parse_args(argv)
    try:
        methods = parse_methods(args.methods)[1:]  # the full-precision samples are drawn anyway, for PSNR vs fp
    except ValueError as e:
        p.error(f"--methods: {e}")
    if not methods or any(name not in MSFP_METHODS for name in methods):
        p.error(f"--methods: msfp methods only (the FP8 backend converts msfp's quantized layers); got "
                f"{args.methods!r}, valid: {', '.join(MSFP_METHODS)}")
    s = CompareSettings(model=args.model, num_samples=args.num, steps=args.steps, calib_samples=args.calib_samples,
                        calib_steps=args.calib_steps, finetune_iters=args.finetune_iters,
                        finetune_batch=args.finetune_batch, num_loras=args.num_loras, rank=args.rank, seed=args.seed,
                        batch_size=args.batch, device=args.device)
    # The images per call actually drawn: a run of --num images never draws more than that per call.
    batch, control_batch = min(s.batch_size, s.num_samples), min(args.control_batch, s.num_samples)
    if control_batch == batch:
        p.error(f"--control-batch {args.control_batch} and --batch {s.batch_size} both draw {batch} images per call "
                f"at --num {s.num_samples}: the control measures what the batch size changes")
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    fp_model, scheduler = load_model(s.model)
    fp_model.to(device)
    reference = load_reference()
    # No held-out points: msfp methods' builders do not use them, and nothing here is per-timestep evaluation.
    ctx = Context(fp_model, scheduler, s, out / "cache", heldout=None)

    def draw(model, name: str, method: str, batch_size: int = s.batch_size) -> dict:
        path = out / "samples" / f"{name}.npz"
        samples = generate(model, scheduler, path, s.num_samples, s.steps, seed=s.seed, batch_size=batch_size,
                           meta=dict(model=s.model, method=method), device=device)
        evaluation = None if name == REFERENCE_METHOD else evaluate(path, reference, paired_path=fp_path,
                                                                     device=device)
        return dict(path=path, images=samples["images"], evaluation=evaluation,
                    sample_seconds=samples["meta"]["sample_time_s"], batch_size=samples["meta"]["batch_size"])

    fp_path = draw(fp_model, REFERENCE_METHOD, REFERENCE_METHOD)["path"]
    results = {}
    for name in methods:
        print(f"{name}: {METHODS[name].description}", file=sys.stderr, flush=True)
        model = METHODS[name].build(ctx).model
        freeze_weights(model)
        fake = draw(model, name, name)
        control = draw(model, f"{name}@batch{control_batch}", f"{name}, {control_batch} images per call",
                       batch_size=control_batch)
        fp8_model = copy.deepcopy(model)
        kept = convert_to_fp8(fp8_model)
        precompiled = None
        if fp8_kernels_available(device)[0]:
            precompiled = precompile_sampling(fp8_model, scheduler, s.num_samples, s.batch_size, device)
        fp8 = draw(fp8_model, f"{name}@fp8", f"{name} on the fp8 backend")
        runs = dict(fake_quant=fake, fake_quant_control_batch=control, fp8=fp8)
        results[name] = {label: dict(metrics=r["evaluation"]["metrics"], sample_seconds=r["sample_seconds"],
                                     batch_size=r["batch_size"], samples=str(r["path"].relative_to(out)))
                         for label, r in runs.items()}
        results[name]["fp8"].update(fake_quant_layers=kept, precompiled=precompiled)
        results[name]["fp8_vs_fake_quant"] = difference(fp8, fake)
        results[name]["control_batch_vs_fake_quant"] = difference(control, fake)
    command = command_line(__file__, argv)
    result = dict(command=command, settings=vars(args), device=str(device), machine=machine_info(device),
                  seeds=dict(samples=f"{s.seed}..{s.seed + s.num_samples - 1}",
                             calibration=f"{s.seed + CALIB_SEED_OFFSET}.."
                                         f"{s.seed + CALIB_SEED_OFFSET + s.calib_samples - 1}"),
                  fp8_kernels=dict(zip(("used", "detail"), fp8_kernels_available(device))),
                  reference=reference.name, methods=results)
    write_json(out / "results.json", result)
    print((out / "results.json").read_text(), end="")  # strict JSON: a PSNR of identical sets (inf) becomes null


if __name__ == "__main__":
    main()
