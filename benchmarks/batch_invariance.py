"""How much the batch size changes the 8-bit images: the same seeds drawn one per call and all in one call.

    python benchmarks/batch_invariance.py [--model default --num 5 --steps 3 --presets w4a4-msfp] [--out results.json]

Image i starts from the same noise (seed + i) whatever the batch size (``msfp.sampling.sample`` draws it from a
generator of its own), so what differs between the two runs comes from the float arithmetic alone: a batched
convolution sums in another order. For each sampler (DDIM with η = 0 and 0.7, DPM-Solver++, Euler, Euler ancestral),
for the full-precision model and for each preset (calibrated on --calib-samples trajectories), counts the pixels of
the uint8 images (as ``msfp sample`` stores them) that differ between batch 1 and batch --num, and the largest
difference in levels. A control draws batch --num twice: sampling is deterministic if it never differs. Prints one
JSON document (also written atomically to --out).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

import msfp
from msfp.checkpoint import freeze_weights
from msfp.environment import HelpFormatter, command_line, machine_info, preset_names, print_result
from msfp.samples import CALIB_SEED_OFFSET, get_scheduler, to_uint8
from msfp.sampling import sample

# (name, msfp scheduler key, eta)
SAMPLERS = (("ddim", "ddim", 0.0), ("ddim-eta0.7", "ddim", 0.7), ("dpm", "dpm", 0.0), ("euler", "euler", 0.0),
            ("euler-a", "euler-a", 0.0))


def compare_images(a: np.ndarray, b: np.ndarray) -> dict:
    levels = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return dict(differing_pixels=int((levels > 0).sum()), max_levels=int(levels.max()))


def measure(model, base_scheduler, num: int, steps: int, seed: int) -> dict:
    out = {}
    for name, key, eta in SAMPLERS:
        scheduler = get_scheduler(key, base_scheduler)

        def draw(batch_size):
            return to_uint8(sample(model, scheduler, num, num_inference_steps=steps, seed=seed, batch_size=batch_size,
                                   eta=eta, disable=True))

        batched = draw(num)
        out[name] = dict(pixels=int(batched.size), **compare_images(draw(1), batched),
                         control_differing_pixels=compare_images(draw(num), batched)["differing_pixels"])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default="default",
                        help="'default', a save_pretrained directory or a Hub id (msfp.load_model)")
    parser.add_argument("--num", type=int, default=5, help="images, drawn one per call and all in one call")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps")
    parser.add_argument("--seed", type=int, default=0, help="image i starts from seed + i")
    parser.add_argument("--presets", default="w4a4-msfp", help="comma-separated quantization presets ('' for none)")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration trajectories per preset")
    parser.add_argument("--calib-steps", type=int, default=10, help="DDIM steps per calibration trajectory")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.num < 2:
        parser.error(f"--num must be >= 2 to compare batch 1 with a larger batch, got {args.num}")
    presets = preset_names(parser, args.presets)

    fp_model, scheduler = msfp.load_model(args.model)
    fp_model.eval()
    models = {"fp": measure(fp_model, scheduler, args.num, args.steps, args.seed)}
    for preset in presets:
        qmodel = msfp.quantize(copy.deepcopy(fp_model), preset)
        msfp.calibrate(qmodel, fp_model, scheduler, num_samples=args.calib_samples, num_steps=args.calib_steps,
                       seed=args.seed + CALIB_SEED_OFFSET, disable=True)
        freeze_weights(qmodel)  # sampling only runs the model: the same outputs, quantized once
        models[preset] = measure(qmodel, scheduler, args.num, args.steps, args.seed)
    result = dict(benchmark="batch_invariance", model=args.model, num_images=args.num, steps=args.steps,
                  seed=args.seed, batch_sizes=[1, args.num], models=models, machine=machine_info(),
                  command=command_line(__file__, argv))
    print_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
