"""Compile the FP8 W4A4 Triton kernels for a GPU architecture without that GPU, and report what they will use.

    python benchmarks/kernel_compile.py [--arch 90 89 --batch 8]

Needs triton (its compiler and bundled ptxas; no GPU, no CUDA driver). For each layer shape of
``benchmarks/gpu_w4a4.py`` (Stable Diffusion 1.5's 3×3 convolutions and linears, DiT-XL/2's MLP linears; unsigned
activations with zero point as in the MSFP W4A4 preset) and each block configuration the launch may use (every
autotuning candidate), it prints JSON with registers per thread, spilled bytes, shared memory, how many blocks fit on
one SM at once (and what limits them), the tensor-core instructions (and on Hopper where wgmma reads its first operand
from), the number of asynchronous copies (a pipelined K loop) and their vector widths, the number of SASS instructions
(in all, and in the GEMMs' K loop, with on sm_90 how long issuing a K step's instructions, and a whole output tile's,
takes over how long the tensor cores take for it), how many output tiles it launches, in how many waves over an
H100's SMs, and what share of the multiply-adds they compute is asked for (the rest pads blocks past the GEMM's edges,
or computes positions not stored), and the compile time (near 0 where Triton's cache already held the
same specialization), plus the activation-quantize kernel for each input (with its SASS instructions per element). For
Hopper and newer, the GEMMs are compiled again with TMA loads wherever the shape allows them (stride 1):
``conv2d_fp8_tma_boxes`` (boxes of output rows of the unpadded input), ``conv2d_fp8_tma_rows`` (flat rows of
zero-bordered codes) and ``linear_fp8_tma``, and warp-specialized (``*_ws``: a producer warp group issuing the TMA
copies, two consumers running wgmma; one 128×128×64 tile; the convolutions without the zero point, which Triton cannot
specialize with a 3×3 kernel) where the Triton version compiles that (3.6), else ``refused`` says why. This is the
static half of issue #8's checks: it says whether the kernels build for Hopper with FP8 tensor cores, not how fast
they run (``gpu_w4a4.py`` on a GPU does that).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from conv_tiles import zero_bordered
from gpu_w4a4 import ACT_FORMAT, CONVS, DIT_LINEARS, LINEARS, WARP_SPECIALIZED
from msfp import triton_kernels as tk
from msfp.environment import command_line, machine_info
from msfp.fp8 import e4m3_shift

FP8 = torch.float8_e4m3fn
# Dense FP8 multiply-adds per SM and cycle: Hopper's tensor cores do 2048 FP16 ones (989 TFLOP/s on an H100 SXM:
# 132 SMs at 1.83 GHz), FP8 twice that.
FP8_MACS_PER_SM_CYCLE = {90: 4096}
SMS = {90: 132}  # H100 SXM and H200, the GPUs gpu_w4a4.py has run on


def k_steps(taps: int, channels: int, block_k: int) -> int:
    """The GEMM kernel's K steps over ``taps`` × ``channels``: each tap's channels in whole ``block_k`` blocks."""
    return taps * tk._cdiv(channels, block_k)


def with_issue_ratios(row: dict, arch: int, taps: int, channels: int) -> dict:
    """``row`` (a GEMM over ``taps`` × ``channels`` of K) with its instructions set against its tensor-core work. An SM
    sub-partition issues one instruction a cycle, and each of its num_warps/4 warps runs the K loop's body once a step
    (BLOCK_M·BLOCK_N·BLOCK_K multiply-adds at the SM's peak rate): ``k_step_issue_over_tensor_cycles`` above 1 means
    the loop cannot keep the tensor cores busy however fast its data comes. ``tile_issue_over_tensor_cycles`` is the
    same for a whole output tile, the K loop once a step and every other instruction once (filling the pipeline; the
    epilogue's scales, bias, zero point and stores): where K is small, the K loop is a small part of a tile's work.
    Unchanged for kernels with fixed blocks (the warp-specialized ones: their warps run different loops) and other
    architectures."""
    config, loop = row["config"], row["mma_loop_instructions"]
    if arch not in FP8_MACS_PER_SM_CYCLE or "BLOCK_M" not in config or loop is None:
        return row
    warps = row["num_warps"] / 4
    step_cycles = config["BLOCK_M"] * config["BLOCK_N"] * config["BLOCK_K"] / FP8_MACS_PER_SM_CYCLE[arch]
    steps = k_steps(taps, channels, config["BLOCK_K"])
    tile = row["sass_instructions"] + (steps - 1) * loop
    return dict(row, k_step_issue_over_tensor_cycles=round(loop * warps / step_cycles, 2),
                tile_issue_over_tensor_cycles=round(tile * warps / (steps * step_cycles), 2))


def with_tiles(row: dict, launch, arch: int, macs: int, taps: int, channels: int) -> dict:
    """``row`` (a GEMM of ``macs`` multiply-adds over ``taps`` × ``channels`` of K, launched as ``launch``) with its
    output tiles: ``tiles`` (blocks launched, split-K shares included), ``useful_mac_fraction`` (the multiply-adds
    asked for over those the tiles compute: blocks padded past the GEMM's edges — 320 channels in 128-wide or
    128-deep blocks compute 384 — and with TMA the positions computed and not stored: the rows' zero border, the
    boxes' overhang) and on sm_90 ``waves`` (rounds of ``ctas_per_sm`` blocks on each of an H100's or H200's 132 SMs;
    a last partial round leaves SMs idle)."""
    blocks = {**launch.flags, **row["config"]}
    output_tiles, shares = launch.grid(blocks) if callable(launch.grid) else launch.grid
    computed = (output_tiles * blocks["BLOCK_M"] * blocks["BLOCK_N"]
                * k_steps(taps, channels, blocks["BLOCK_K"]) * blocks["BLOCK_K"])
    row = dict(row, tiles=output_tiles * shares, useful_mac_fraction=round(macs / computed, 3))
    if arch in SMS and row["ctas_per_sm"]:
        row["waves"] = round(output_tiles * shares / (SMS[arch] * row["ctas_per_sm"]), 2)
    return row


def compiled_rows(launcher, *args, arch: int, **kwargs) -> list[dict]:
    t0 = time.perf_counter()
    compiled = tk.compile_ahead(launcher, *args, arch=arch, **kwargs)
    seconds = (time.perf_counter() - t0) / len(compiled)
    return [dict(config=config, compile_s=round(seconds, 2), **tk.kernel_stats(kernel)) for config, kernel in compiled]


def gemm_rows(layer: dict, kernel: str, launcher, *args, arch: int, macs: int, taps: int, channels: int,
              **kwargs) -> list[dict]:
    """The GEMM launch's rows (one per block configuration) with their issue ratios and tile counts."""
    launch = tk._prepare(launcher.__name__, *args, **kwargs)
    return [with_tiles(with_issue_ratios(dict(layer, kernel=kernel, **r), arch, taps, channels), launch, arch, macs,
                       taps, channels)
            for r in compiled_rows(launcher, *args, arch=arch, **kwargs)]


def act_codes_rows(layer: dict, x: torch.Tensor, zeros: torch.Tensor, shift: int, arch: int) -> list[dict]:
    """The activation kernel's row, with its SASS instructions per element: it has no loop, so each thread runs its
    instructions once (but for the out-of-line slow path of IEEE division, which also counts) for its share of the
    default tile (``msfp.triton_kernels._ACT_BLOCKS``)."""
    rows = compiled_rows(tk.act_codes, x, ACT_FORMAT, torch.ones(len(zeros)), zeros, shift, arch=arch)
    per_thread = tk._ACT_BLOCKS[0] * tk._ACT_BLOCKS[1] // (32 * rows[0]["num_warps"])
    return [dict(layer, kernel="act_codes", **r,
                 sass_instructions_per_element=round(r["sass_instructions"] / per_thread, 1)) for r in rows]


def warp_specialized_rows(layer: dict, kernel: str, launcher, *args, refused: dict, **kwargs) -> list:
    """The warp-specialized kernel's row, or none where the launcher refuses it (its reason kept in ``refused``)."""
    try:
        return gemm_rows(layer, kernel, launcher, *args, **WARP_SPECIALIZED, **kwargs)
    except ValueError as e:
        refused.setdefault(kernel, str(e))
        return []


def layer_rows(arch: int, batch: int, refused: dict) -> list[dict]:
    shift = e4m3_shift(ACT_FORMAT)
    scales, zeros = torch.ones(batch), torch.zeros(batch)
    rows = []
    for cin, cout, size, stride in CONVS:
        x = torch.zeros(batch, cin, size, size, dtype=torch.bfloat16)
        args = (torch.zeros(batch, size, size, cin, dtype=FP8), torch.zeros(cout, 3, 3, cin, dtype=FP8), scales,
                torch.ones(cout), torch.zeros(cout), zeros, torch.zeros(cout, 3, 3))
        layer = dict(kind="conv3x3", c_in=cin, c_out=cout, hw=size, stride=stride, batch=batch)
        shape = dict(arch=arch, macs=batch * (size // stride) ** 2 * cout * 9 * cin, taps=9, channels=cin)
        rows += act_codes_rows(layer, x, zeros, shift, arch)
        loads = {"": {}}
        if arch >= 90 and stride == 1:
            loads.update(_tma_boxes=dict(tma=True), _tma_rows=dict(tma=True, zero_bordered=True))
        for suffix, options in loads.items():
            x_codes = zero_bordered(args[0]) if options.get("zero_bordered") else args[0]
            rows += gemm_rows(layer, "conv2d_fp8" + suffix, tk.conv2d_fp8, x_codes, *args[1:], stride=stride,
                              padding=1, out_dtype=torch.bfloat16, **shape, **options)
            if options.get("zero_bordered"):  # without the zero point, which a 3×3 kernel cannot specialize with
                rows += warp_specialized_rows(layer, "conv2d_fp8_tma_rows_ws_no_zp", tk.conv2d_fp8, x_codes,
                                              *args[1:5], padding=1, out_dtype=torch.bfloat16, zero_bordered=True,
                                              refused=refused, **shape)
    for tokens, k, n in LINEARS + DIT_LINEARS:
        m = batch * tokens
        x = torch.zeros(m, k, dtype=torch.bfloat16)
        layer = dict(kind="linear", m=m, k=k, n=n)
        rows += act_codes_rows(layer, x, torch.zeros(m), shift, arch)
        args = (torch.zeros(m, k, dtype=FP8), torch.zeros(n, k, dtype=FP8), torch.ones(m), torch.ones(n),
                torch.zeros(n), torch.zeros(m), torch.zeros(n))
        shape = dict(arch=arch, macs=m * n * k, taps=1, channels=k, out_dtype=torch.bfloat16)
        for tma in (False, True) if arch >= 90 else (False,):
            rows += gemm_rows(layer, "linear_fp8_tma" if tma else "linear_fp8", tk.linear_fp8, *args, tma=tma,
                              **shape)
        if arch >= 90:
            rows += warp_specialized_rows(layer, "linear_fp8_tma_ws", tk.linear_fp8, *args, refused=refused, **shape)
    return rows


RANGE_FIELDS = ("k_step_issue_over_tensor_cycles", "tile_issue_over_tensor_cycles", "useful_mac_fraction")


def summary(rows: list[dict]) -> dict:
    gemms = [r for r in rows if r["kernel"] != "act_codes"]
    act = [r["sass_instructions_per_element"] for r in rows if r["kernel"] == "act_codes"]
    ranges = {field: {} for field in RANGE_FIELDS}
    for r in gemms:
        for field in RANGE_FIELDS:
            if field in r:  # no issue ratios for fixed-block (warp-specialized) kernels
                ranges[field].setdefault(r["kernel"], []).append(r[field])
    return dict(compiled=len(rows), with_spills=sum(r["spill_store_bytes"] > 0 for r in rows),
                act_codes_sass_instructions_per_element=[min(act), max(act)],
                **{field: {kernel: [min(v), max(v)] for kernel, v in sorted(by_kernel.items())}
                   for field, by_kernel in ranges.items()},
                max_registers=max(r["registers"] for r in rows), max_shared_bytes=max(r["shared_bytes"] for r in rows),
                gemm_mma_instructions=sorted({i for r in gemms for i in r["mma_instructions"]}),
                gemms_by_ctas_per_sm={n: sum(r["ctas_per_sm"] == n for r in gemms)
                                      for n in sorted({r["ctas_per_sm"] for r in gemms}, key=str)},
                gemms_without_async_copies=sum(r["async_copies"] == r["tma_copies"] == 0 for r in gemms),
                wgmma_operand_a={kernel: sorted({a for r in gemms if r["kernel"] == kernel for a in r["mma_operand_a"]})
                                 for kernel in sorted({r["kernel"] for r in gemms})},
                async_copy_bytes=sorted({b for r in rows for b in r["async_copy_bytes"]}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="compute capabilities to compile for (89 Ada, 90 Hopper, 100 Blackwell)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the layer shapes")
    args = parser.parse_args(argv)
    result = dict(benchmark="kernel_compile", command=command_line(__file__, argv), machine=machine_info())
    if not tk.HAS_TRITON:
        result["skipped"] = "triton is not installed"
        print(json.dumps(result, indent=1))
        return
    import triton

    result["machine"]["versions"]["triton"] = triton.__version__
    refused = {}
    by_arch = {f"sm_{arch}": layer_rows(arch, args.batch, refused) for arch in args.arch}
    result["kernels"] = [row for rows in by_arch.values() for row in rows]
    result["refused"] = refused
    result["summary"] = {arch: summary(rows) for arch, rows in by_arch.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
