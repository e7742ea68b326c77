"""How many Triton kernels one step of a Stable-Diffusion-1.5-shaped UNet compiles on the FP8 path, without a GPU.

    python benchmarks/step_kernels.py [--batch 8 --arch 90 --loads pointers boxes rows]

Needs triton, no GPU: the W4A4-quantized UNet (random weights, ``benchmarks/gpu_w4a4.py``'s ``sd15_unet``, its
8-bit edge layers kept in full precision as there) is converted to the FP8 path with every layer set to the Triton
kernels, and one step is recorded by :func:`msfp.triton_kernels.precompile` with ``count_only``: its kernel
``launches``, the ``distinct`` ones and the ``kernels`` they compile (every autotuning candidate of each distinct
specialization; what a model's first forward on a GPU compiles, one by one unless precompiled), per way of loading the
GEMMs' tiles (``convert_to_fp8(tma=…)``: pointer loads, TMA boxes, TMA rows). ``--channels`` narrows the UNet (the
test suite's smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from gpu_w4a4 import sd15_unet, w4a4_quantized  # the script's own directory is on sys.path
from msfp import triton_kernels
from msfp.environment import command_line, machine_info
from msfp.fp8 import Fp8Layer, convert_to_fp8

LOADS = {"pointers": None, "boxes": "boxes", "rows": "rows"}


def count_step(q: torch.nn.Module, tma: str | None, batch: int, arch: int) -> dict:
    model = copy.deepcopy(q)
    convert_to_fp8(model, tma=tma)
    for layer in model.modules():
        if isinstance(layer, Fp8Layer):  # the kernels, here on CPU tensors: recorded, not run
            layer.use_kernels = True
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size).contiguous(
        memory_format=torch.channels_last)
    t = torch.full((batch,), 500)
    cond = torch.randn(batch, 77, cfg.cross_attention_dim)
    with torch.no_grad():
        report = triton_kernels.precompile(lambda: model(x, t, encoder_hidden_states=cond), arch=arch,
                                           count_only=True)
    return {k: report[k] for k in ("launches", "distinct", "kernels", "errors")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--arch", type=int, default=90, help="compute capability the kernels are specialized for")
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS),
                        help="ways of loading the GEMMs' tiles to count")
    parser.add_argument("--channels", type=int, nargs=4, default=[320, 640, 1280, 1280],
                        help="the UNet's block_out_channels (SD-1.5's by default)")
    args = parser.parse_args(argv)
    result = dict(benchmark="step_kernels", command=command_line(__file__, argv), machine=machine_info(),
                  batch=args.batch, arch=args.arch, channels=args.channels)
    if not triton_kernels.HAS_TRITON:
        result["skipped"] = "triton is not installed"
        print(json.dumps(result, indent=1))
        return
    result["machine"]["versions"]["triton"] = triton_kernels.triton.__version__
    # Fewer samples for the weights' format search than gpu_w4a4.py: which kernels launch does not depend on the codes.
    q = w4a4_quantized(sd15_unet(channels=tuple(args.channels)), max_samples=1 << 10)
    result["steps"] = {name: count_step(q, LOADS[name], args.batch, args.arch) for name in args.loads}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
