"""Block-size sweep of the Triton FP8 implicit-GEMM convolution on a GPU, against cuDNN BF16 (issue #8).

    python benchmarks/conv_tiles.py [--batch 8 --iters 30 --cuda-graphs --loads pointers tma_boxes tma_rows
                                     --maxnreg 128 --split-k 2 4 --warp-specialize]

The autotuner of ``msfp.triton_kernels.conv2d_fp8`` picks among a few block configurations, and on the H200 the
best of the four it had then reached 10–24% of the FP8 peak on the Stable-Diffusion-1.5 3×3 convolutions (0.57–0.94× BF16). This
times, on the same shapes (``gpu_w4a4.CONVS``, random codes, zero point and bias as in a real W4A4 layer), so that
one short GPU run shows whether better tiles reach the targets or the kernel's design must change:

1. every configuration of a wider grid (BLOCK_M × BLOCK_N × BLOCK_K × pipeline stages) with each way of loading
   tiles (``--loads``): per-thread pointer arithmetic (``cp.async``), and TMA tensor-descriptor copies (stride-1
   shapes only) of the unpadded input in boxes of output rows (``tma_boxes``) or of the input inside a zero border
   as flat rows (``tma_rows``, ``zero_bordered=True``), fp32 accumulation;
2. for the fastest configuration of each loading method: fast accumulation (``precise_acc=False``), the same under a
   register cap (``--maxnreg``: 128 fits two 8-warp blocks on an SM, and makes them spill) and split-K
   (``--split-k``: the K loop shared by that many programs per output tile);
3. warp-specialized tiles (``--warp-specialize``, ``conv2d_fp8(warp_specialize=True)``: a producer warp group issuing
   the TMA copies, two consumer warp groups running wgmma; Triton 3.6 only), as flat rows without the zero point,
   which Triton 3.6 cannot specialize with a 3×3 kernel, beside the fastest rows tiles also without it, all with
   fast accumulation (``warp_specialized``).

Each call is timed eagerly and replayed from a CUDA graph (the GPU's own time; configurations are ranked by it), and
its output compared with the exact (float64) result: ``error_vs_exact`` is the largest and the mean of
|output − exact| / Σ|terms|, the scale of the kernels' error bound, beside ``bf16_rounding_error``, the same for the
exact result rounded to bfloat16 (the output's own floor), so that what fast accumulation costs in accuracy shows
beside what it gains in speed. A configuration that does not compile (too much shared memory, say) is recorded with
its error. Prints JSON: per shape the BF16 and autotuned times, every timing, the fastest configuration per loading
method and the fastest of all with its speed-up over BF16. Before each step, its kernels are compiled in parallel
processes (:func:`msfp.triton_kernels.precompile`, ``--compile-workers``) into Triton's cache, which the launches
then read: compiled one by one at launch, they would take much of a short GPU session. ``--smoke`` runs two tiny
configurations on one small shape (on CPU under Triton's interpreter, ``TRITON_INTERPRET=1``, where it precompiles for
sm_90 only to check that path: it checks the script, timings are meaningless). It exits non-zero, after the JSON,
when no configuration of a shape ran.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

from gpu_w4a4 import ACT_FORMAT, CONVS, WEIGHT_FORMAT, Timer, progress, rates, speedups, start_report
from msfp import triton_kernels
from msfp.environment import HelpFormatter
from msfp.fp8 import e4m3_shift


# conv2d_fp8's options for each way of loading tiles
LOADS = {"pointers": {}, "tma_boxes": dict(tma=True), "tma_rows": dict(tma=True, zero_bordered=True)}


def zero_bordered(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, W, C) inside a one-wide zero border, as ``act_codes(…, pad=1)`` writes codes for ``tma_rows``."""
    B, H, W, C = x.shape
    buffer = torch.zeros(B, H + 2, W + 2, C, dtype=x.dtype, device=x.device)
    buffer[:, 1:-1, 1:-1] = x
    return buffer[:, 1:-1, 1:-1]


def tile_configs(smoke: bool) -> list[dict]:
    if smoke:
        # The smallest tiles a GPU takes too (FP8 MMA: BLOCK_K ≥ 32; Hopper: BLOCK_M = 64 per warp group).
        return [dict(block_m=64, block_n=32, block_k=32, num_warps=4, num_stages=2),
                dict(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2)]
    # 64/128 × 64/128/256 tiles, plus 128×256 and 256×128 at BLOCK_K 64. On sm_90 (Triton 3.9's compile_ahead, with
    # a zero point) the former use 96–255 registers per thread and at most 160 KB of shared memory (Hopper allows
    # 227 KB per block), no spills; of the latter, the pointer loads spill 192–204 bytes at 128×256 (0–4 at
    # 256×128), TMA boxes fit (229–255 registers) and TMA rows spill 180 bytes at 128×256 (none at 256×128).
    grid = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=4 if bm * bn <= 64 * 128 else 8, num_stages=stages)
            for bm, bn, bk, stages in itertools.product((64, 128), (64, 128, 256), (64, 128), (3, 4))
            if (bm, bn) != (128, 256)]
    return grid + [dict(block_m=bm, block_n=bn, block_k=64, num_warps=8, num_stages=3)
                   for bm, bn in ((128, 256), (256, 128))]


def precompile(args, arch: int | None, launches) -> dict | None:
    """Compile the kernels that ``launches()`` would launch, in parallel processes, before they are timed."""
    if arch is None or args.compile_workers < 0:
        return None
    return triton_kernels.precompile(launches, arch=arch, workers=args.compile_workers)


def error_vs_exact(y: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> dict:
    """Largest and mean |y − exact| / Σ|terms| over the outputs."""
    relative = (y.double() - exact).abs() / magnitude
    return dict(max=relative.max().item(), mean=relative.mean().item())


def random_codes(fmt, shape, device) -> torch.Tensor:
    """Codes of ``fmt``'s grid in E4M3, as the activation kernel and Fp8Layer produce them."""
    grid = fmt.values() * 2.0 ** e4m3_shift(fmt)
    return grid[torch.randint(len(grid), shape)].to(torch.float8_e4m3fn).to(device)


def shape_row(cin, cout, size, stride, args, timer: Timer, peak, arch: int | None) -> dict:
    device = timer.device
    out_size = (size + 2 - 3) // stride + 1
    flops = 2 * args.batch * out_size**2 * cout * cin * 9
    x_codes = random_codes(ACT_FORMAT, (args.batch, size, size, cin), device)
    w_codes = random_codes(WEIGHT_FORMAT, (cout, 3, 3, cin), device)
    a_scale, w_scale = torch.rand(args.batch, device=device) + 0.5, torch.rand(cout, device=device) * 1e-2
    bias, zp = torch.randn(cout, device=device), torch.randn(args.batch, device=device)
    zp_weight_sums = torch.randn(cout, 3, 3, device=device)

    x_bordered = zero_bordered(x_codes)
    # Exact results with the zero point and, for the warp-specialized kernels that cannot take it, without.
    exact = {zero_point: triton_kernels.conv2d_fp8_reference(x_codes, w_codes, a_scale, w_scale, bias,
                                                             zp if zero_point else None,
                                                             zp_weight_sums if zero_point else None, stride, 1)
             for zero_point in (True, False)}

    def conv(method, zero_point=True, **options):
        x = x_bordered if LOADS[method].get("zero_bordered") else x_codes
        zp_args = (zp, zp_weight_sums) if zero_point else (None, None)
        return triton_kernels.conv2d_fp8(x, w_codes, a_scale, w_scale, bias, *zp_args, stride, 1,
                                         out_dtype=torch.bfloat16, **LOADS[method], **options)

    bf16 = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(device, torch.bfloat16)
    bf16 = bf16.to(memory_format=torch.channels_last)
    xb = torch.randn(args.batch, cin, size, size, device=device, dtype=torch.bfloat16)
    xb = xb.contiguous(memory_format=torch.channels_last)
    row = dict(c_in=cin, c_out=cout, hw=size, stride=stride, batch=args.batch, flops=flops,
               bf16_rounding_error=error_vs_exact(exact[True][0].to(torch.bfloat16), *exact[True]))
    with torch.no_grad():
        bf16_t = timer(lambda: bf16(xb))
        row["bf16"] = rates(flops, bf16_t, peak and peak["bf16"])
        loads = [m for m in args.loads if m == "pointers" or triton_kernels.tma_unsupported(x_codes, w_codes, stride)
                 is None]
        autotuned = loads if device.type == "cuda" else []  # the autotuner times its candidates on a GPU only
        stage1 = list(itertools.product(loads, tile_configs(args.smoke)))
        row["precompile"] = [precompile(args, arch, lambda: [conv(method) for method in autotuned] + [
            conv(method, **config, precise_acc=True, split_k=1) for method, config in stage1])]
        row["autotuned"] = {}
        for method in autotuned:
            tuned_t = timer(lambda: conv(method))
            row["autotuned"][method] = dict(rates(flops, tuned_t, peak and peak["fp8"]),
                                            speedup=speedups(bf16_t, tuned_t))

        def timed(method, config, **options):
            entry = dict(config, loads=method, **options)
            try:
                t = timer(lambda: conv(method, **config, **options))
            except Exception as e:  # e.g. Triton's OutOfResources: record it and keep sweeping
                entry["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            else:
                y = conv(method, **config, **options)
                entry.update(rates(flops, t, peak and peak["fp8"]), speedup=speedups(bf16_t, t),
                             error_vs_exact=error_vs_exact(y, *exact[options.get("zero_point", True)]))
            return entry

        def fastest(entries):  # by the GPU's own time where graphs ran
            timed_ok = [e for e in entries if "error" not in e]
            return min(timed_ok, key=lambda e: e.get("graph", e)["ms"]) if timed_ok else None

        row["configs"] = [timed(method, config, precise_acc=True, split_k=1) for method, config in stage1]
        row["best"] = {method: fastest([e for e in row["configs"] if e["loads"] == method]) for method in loads}
        tile_keys = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
        options = ([dict(precise_acc=False, split_k=1)]
                   + [dict(precise_acc=False, split_k=1, maxnreg=cap) for cap in args.maxnreg]
                   + [dict(precise_acc=True, split_k=k) for k in args.split_k])
        stage2 = [(method, {k: best[k] for k in tile_keys}, variant)
                  for method, best in row["best"].items() if best is not None for variant in options]
        row["precompile"].append(precompile(args, arch, lambda: [conv(method, **config, **options)
                                                                 for method, config, options in stage2]))
        row["variants"] = [timed(method, config, **options) for method, config, options in stage2]
        every = row["configs"] + row["variants"]
        row["fastest"] = fastest(every)
        row["fastest_fp32_accumulation"] = fastest([e for e in every if e["precise_acc"]])
        if args.warp_specialize and row["best"].get("tma_rows") is not None:
            # Warp-specialized tiles (Triton 3.6; no zero point on a 3×3 kernel there), fast accumulation, against
            # the fastest rows tiles without the zero point either.
            best = {k: row["best"]["tma_rows"][k] for k in tile_keys}
            stage3 = [(config, dict(warp_specialize=True)) for config in warp_specialized_configs(args.smoke)]
            stage3.append((best, {}))
            no_zp = dict(precise_acc=False, split_k=1, zero_point=False)
            row["precompile"].append(precompile(args, arch, lambda: [
                rejected_or(lambda: conv("tma_rows", **config, **no_zp, **options)) for config, options in stage3]))
            row["warp_specialized"] = [timed("tma_rows", config, **no_zp, **options) for config, options in stage3]
    return progress(row)


def warp_specialized_configs(smoke: bool) -> list[dict]:
    """128-row tiles for two consumer warp groups (num_warps=4 becomes 12 warps with the producer)."""
    if smoke:
        return [dict(block_m=64, block_n=32, block_k=32, num_warps=4, num_stages=2)]
    return [dict(block_m=128, block_n=128, block_k=bk, num_warps=4, num_stages=stages)
            for bk, stages in ((64, 3), (64, 4), (128, 3))]


def rejected_or(launch):
    """``launch()``, or its ValueError: a configuration the launcher refuses is recorded when it is timed."""
    try:
        return launch()
    except ValueError as e:
        return e


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per convolution call")
    p.add_argument("--iters", type=int, default=30, help="timed calls per measurement, after warm-up (median)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="also time every call replayed from a CUDA graph (no host launch work)")
    p.add_argument("--loads", nargs="+", choices=tuple(LOADS), default=list(LOADS),
                   help="how the kernel loads its tiles: per-thread pointers (cp.async), TMA copies (stride 1) in "
                        "boxes of output rows or as flat rows of zero-bordered codes")
    p.add_argument("--split-k", type=int, nargs="*", default=[2, 4],
                   help="split-K factors tried on each loading method's fastest tiles")
    p.add_argument("--maxnreg", type=int, nargs="*", default=[128],
                   help="register caps tried with fast accumulation on each loading method's fastest tiles (128: two "
                        "8-warp blocks per SM, at the cost of spills: benchmarks/gemm_registers.py)")
    p.add_argument("--warp-specialize", action=argparse.BooleanOptionalAction, default=True,
                   help="also time warp-specialized tiles (tma_rows, no zero point) against the fastest rows tiles "
                        "without it")
    p.add_argument("--compile-workers", type=int, default=os.cpu_count() or 1,
                   help="processes compiling each step's kernels before it is timed (0: in this process; -1: no "
                        "precompiling, the launches compile)")
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
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    else:
        arch = 90 if args.smoke else None  # the smoke run checks the precompiling path too
    timer = Timer(device, args.iters, args.cuda_graphs)
    started = time.perf_counter()
    report["shapes"] = [shape_row(*shape, args, timer, peak, arch) for shape in shapes]
    report["sweep_seconds"] = round(time.perf_counter() - started, 1)
    report["cuda_graph_error"] = timer.graph_error
    print(json.dumps(report, indent=2))
    empty = [row for row in report["shapes"] if row["fastest"] is None]
    if empty:  # after the record of every error: a sweep that timed nothing is no result
        first = next((c["error"] for c in empty[0]["configs"] if "error" in c), "none")
        raise SystemExit(f"conv_tiles: no configuration ran on {len(empty)} of {len(report['shapes'])} shape(s); "
                         f"first error: {first}")


if __name__ == "__main__":
    main()
