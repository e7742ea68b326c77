"""Block-size sweep of the Triton FP8 implicit-GEMM convolution on a GPU, against cuDNN BF16 (issue #8).

    python benchmarks/conv_tiles.py [--batch 8 --iters 30 --cuda-graphs --loads pointers tma]

The autotuner of ``msfp.triton_kernels.conv2d_fp8`` picks among four block configurations, and on the H200 the
best of them reached 10–24% of the FP8 peak on the Stable-Diffusion-1.5 3×3 convolutions (0.57–0.94× BF16). This
times every configuration of a wider grid (BLOCK_M × BLOCK_N × BLOCK_K × pipeline stages, with fp32 and with fast
accumulation) on the same shapes (``gpu_w4a4.CONVS``, random codes, zero point and bias as in a real W4A4 layer),
so one short GPU run shows whether better tiles reach the targets or the kernel's design must change. Every
configuration runs with both ways of loading tiles (``--loads``): per-thread pointer arithmetic (``cp.async``) and
TMA tensor-descriptor copies (``tma=True``; stride-1 shapes only). Each call is
timed eagerly and replayed from a CUDA graph (the GPU's own time). A configuration that does not compile (too much
shared memory, say) is recorded with its error. Prints JSON: per shape the BF16 and autotuned times, every
configuration's time, and the fastest configuration per loading method and accumulation with its speed-up over
BF16. ``--smoke`` runs two tiny
configurations on one small shape (under Triton's interpreter on CPU: it checks the script, timings are meaningless).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from gpu_w4a4 import ACT_FORMAT, CONVS, WEIGHT_FORMAT, Timer, progress, rates, speedups, start_report
from msfp import triton_kernels
from msfp.fp8 import e4m3_shift


def tile_configs(smoke: bool) -> list[dict]:
    if smoke:
        # The smallest tiles a GPU takes too (FP8 MMA: BLOCK_K ≥ 32; Hopper: BLOCK_M = 64 per warp group).
        return [dict(block_m=64, block_n=32, block_k=32, num_warps=4, num_stages=2),
                dict(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2)]
    # 64/128 × 64/128/256 tiles, plus 128×256 and 256×128 at BLOCK_K 64. On sm_90 (Triton 3.9's compile_ahead, with
    # a zero point) the former use 96–255 registers per thread and at most 160 KB of shared memory (Hopper allows
    # 227 KB per block), no spills; of the latter, the pointer loads spill 192–204 bytes at 128×256 (0–4 at
    # 256×128) and the TMA loads fit (229–255 registers).
    grid = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=4 if bm * bn <= 64 * 128 else 8, num_stages=stages)
            for bm, bn, bk, stages in itertools.product((64, 128), (64, 128, 256), (64, 128), (3, 4))
            if (bm, bn) != (128, 256)]
    return grid + [dict(block_m=bm, block_n=bn, block_k=64, num_warps=8, num_stages=3)
                   for bm, bn in ((128, 256), (256, 128))]


def random_codes(fmt, shape, device) -> torch.Tensor:
    """Codes of ``fmt``'s grid in E4M3, as the activation kernel and Fp8Layer produce them."""
    grid = fmt.values() * 2.0 ** e4m3_shift(fmt)
    return grid[torch.randint(len(grid), shape)].to(torch.float8_e4m3fn).to(device)


def shape_row(cin, cout, size, stride, args, timer: Timer, peak) -> dict:
    device = timer.device
    out_size = (size + 2 - 3) // stride + 1
    flops = 2 * args.batch * out_size**2 * cout * cin * 9
    x_codes = random_codes(ACT_FORMAT, (args.batch, size, size, cin), device)
    w_codes = random_codes(WEIGHT_FORMAT, (cout, 3, 3, cin), device)
    a_scale, w_scale = torch.rand(args.batch, device=device) + 0.5, torch.rand(cout, device=device) * 1e-2
    bias, zp = torch.randn(cout, device=device), torch.randn(args.batch, device=device)
    zp_weight_sums = torch.randn(cout, 3, 3, device=device)

    def conv(**options):
        return triton_kernels.conv2d_fp8(x_codes, w_codes, a_scale, w_scale, bias, zp, zp_weight_sums, stride, 1,
                                         out_dtype=torch.bfloat16, **options)

    bf16 = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(device, torch.bfloat16)
    bf16 = bf16.to(memory_format=torch.channels_last)
    xb = torch.randn(args.batch, cin, size, size, device=device, dtype=torch.bfloat16)
    xb = xb.contiguous(memory_format=torch.channels_last)
    row = dict(c_in=cin, c_out=cout, hw=size, stride=stride, batch=args.batch, flops=flops)
    with torch.no_grad():
        bf16_t = timer(lambda: bf16(xb))
        row["bf16"] = rates(flops, bf16_t, peak and peak["bf16"])
        loads = [m for m in args.loads if m == "pointers" or triton_kernels.tma_unsupported(x_codes, w_codes, stride)
                 is None]
        row["autotuned"] = {}
        if device.type == "cuda":  # the autotuner times its candidates on a GPU only
            for method in loads:
                tuned_t = timer(lambda: conv(tma=method == "tma"))
                row["autotuned"][method] = dict(rates(flops, tuned_t, peak and peak["fp8"]),
                                                speedup=speedups(bf16_t, tuned_t))
        row["configs"], best = [], {}
        for config, precise, method in itertools.product(tile_configs(args.smoke), (True, False), loads):
            entry = dict(config, precise_acc=precise, loads=method)
            try:
                t = timer(lambda: conv(precise_acc=precise, tma=method == "tma", **config))
            except Exception as e:  # e.g. Triton's OutOfResources: record it and keep sweeping
                entry["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            else:
                entry.update(rates(flops, t, peak and peak["fp8"]), speedup=speedups(bf16_t, t))
                key = t.get("graph_ms", t["ms"])
                accumulation = "fp32_accumulation" if precise else "fast_accumulation"
                if (method, accumulation) not in best or key < best[method, accumulation][0]:
                    best[method, accumulation] = (key, entry)
            row["configs"].append(entry)
        row["best"] = {f"{method}_{accumulation}": e for (method, accumulation), (_, e) in best.items()}
    return progress(row)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="also time every call replayed from a CUDA graph (no host launch work)")
    p.add_argument("--loads", nargs="+", choices=("pointers", "tma"), default=["pointers", "tma"],
                   help="how the kernel loads its tiles: per-thread pointers (cp.async), TMA descriptors (stride 1)")
    p.add_argument("--smoke", action="store_true", help="two tiny configurations on one small shape (CPU: the "
                                                        "Triton interpreter; checks the script only)")
    args = p.parse_args(argv)
    started = start_report("conv_tiles", args, argv)
    if started is None:
        return
    report, device, peak = started
    shapes = [(32, 32, 6, 1)] if args.smoke else CONVS  # 32 channels: TMA's 16-byte rows
    if args.smoke:
        args.batch, args.iters = 1, 1
        report["note"] = "smoke run: timings are meaningless"
    timer = Timer(device, args.iters, args.cuda_graphs)
    report["shapes"] = [shape_row(*shape, args, timer, peak) for shape in shapes]
    report["cuda_graph_error"] = timer.graph_error
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
