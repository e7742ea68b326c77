"""What holds the FP8 GEMM's largest tiles to one block per SM: registers per thread of one tile configuration, with
and without each of its options, and under a register cap, compiled for a GPU architecture without that GPU.

    python benchmarks/gemm_registers.py [--arch 90 --blocks 128 128 64 --num-warps 8 --num-stages 3 --maxnreg 128]

For a Stable-Diffusion-1.5 linear (8·1024 tokens, 640→5120) and 3×3 convolution (320→320 at 64×64), it compiles
``msfp.triton_kernels.linear_fp8`` / ``conv2d_fp8`` at one block configuration with every combination of fp32 or fast
accumulation (``precise_acc``), pointer or TMA loads, with or without a zero point (the unsigned activation formats'
epilogue term), and without or with ``--maxnreg`` (PTX's register cap: 128 lets two 8-warp blocks share an SM), and
prints JSON with registers per thread, spilled bytes and blocks per SM (:func:`msfp.triton_kernels.kernel_stats`).
Static, like ``kernel_compile.py``: spills cost time on a GPU, how much only a GPU run shows.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from msfp import triton_kernels as tk
from msfp.environment import command_line, machine_info

FP8 = torch.float8_e4m3fn


def layers(batch: int) -> dict:
    """Each layer's launcher and arguments: codes, scales, bias; the zero point and weight sums apart."""
    def zeros(*shape):
        return torch.zeros(*shape, dtype=FP8)

    m = batch * 1024
    linear = (tk.linear_fp8, (zeros(m, 640), zeros(5120, 640), torch.ones(m), torch.ones(5120), torch.zeros(5120)),
              (torch.zeros(m), torch.zeros(5120)), {})
    conv = (tk.conv2d_fp8, (zeros(batch, 64, 64, 320), zeros(320, 3, 3, 320), torch.ones(batch), torch.ones(320),
                            torch.zeros(320)), (torch.zeros(batch), torch.zeros(320, 3, 3)), dict(padding=1))
    return {"linear_8x1024_640x5120": linear, "conv3x3_320x320_64x64": conv}


def rows(args) -> list[dict]:
    block_m, block_n, block_k = args.blocks
    found = []
    for (name, (launcher, operands, zero_point, options)), precise, tma, with_zp, cap in itertools.product(
            layers(args.batch).items(), (True, False), (False, True), (True, False), (None, args.maxnreg)):
        [(_, kernel)] = tk.compile_ahead(launcher, *operands, *(zero_point if with_zp else (None, None)), **options,
                                         out_dtype=torch.bfloat16, precise_acc=precise, tma=tma, block_m=block_m,
                                         block_n=block_n, block_k=block_k, num_warps=args.num_warps,
                                         num_stages=args.num_stages, maxnreg=cap, arch=args.arch)
        stats = tk.kernel_stats(kernel)
        found.append(dict(layer=name, precise_acc=precise, loads="tma" if tma else "pointers", zero_point=with_zp,
                          maxnreg=cap, **{k: stats[k] for k in ("registers", "spill_store_bytes", "spill_load_bytes",
                                                                "shared_bytes", "ctas_per_sm",
                                                                "ctas_per_sm_limited_by")}))
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the layer shapes (images)")
    parser.add_argument("--blocks", type=int, nargs=3, default=[128, 128, 64], metavar=("M", "N", "K"),
                        help="the tile configuration's block_m, block_n, block_k")
    parser.add_argument("--num-warps", type=int, default=8, help="warps per block")
    parser.add_argument("--num-stages", type=int, default=3, help="software-pipelining stages of the K loop")
    parser.add_argument("--maxnreg", type=int, default=128, help="the register cap compiled beside no cap")
    args = parser.parse_args(argv)
    command = command_line(__file__, argv)
    result = dict(benchmark="gemm_registers", settings=vars(args), command=command, machine=machine_info())
    if not tk.HAS_TRITON:
        result["skipped"] = "triton is not installed"
    else:
        import triton

        result["machine"]["versions"]["triton"] = triton.__version__
        result["kernels"] = rows(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
