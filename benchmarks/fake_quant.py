"""Throughput of fake_quant relative to a plain tensor copy, eager and compiled, on CPU and (if present) GPU.

    python benchmarks/fake_quant.py [--out results.json] [--repeats 20]

Prints one JSON document: per device, tensor and path, the median time, GB/s (bytes read + written) and the ratio to
a copy of the same tensor (1.0 = as fast as a copy; SPEC §5 measured 15.4 eager and 1.0 compiled on an H100), and
the time of the first call (compilation, for the compiled path). Under
``host_us_per_call``: the time of one quantizer-style call (forward and backward) on a tiny tensor, eager and
compiled, i.e. the host work per call that a small model's training step pays once per quantizer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from msfp.environment import HelpFormatter, command_line, machine_info, print_result
from msfp.formats import _fake_quant, fake_quant, get_format
from msfp.kernels import compiled_fake_quant

CASES = {
    # A UNet activation (batch 16, 320 channels at 32x32) with one per-tensor unsigned scale and zero point.
    "activation_16x320x32x32_ufp4_e2m2": dict(shape=(16, 320, 32, 32), fmt="ufp4_e2m2", per_channel=False),
    # A 1280x1280 3x3 conv weight with per-output-channel signed scales.
    "weight_1280x1280x3x3_fp4_e2m1": dict(shape=(1280, 1280, 3, 3), fmt="fp4_e2m1", per_channel=True),
}


def timed(fn, device, repeats) -> tuple[float, float]:
    """``(median seconds per call, seconds of the first call)``: the first is the warm-up (and compilation)."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[0]


def bench_device(device, repeats, compile_too):
    results = {}
    for name, case in CASES.items():
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(case["shape"], generator=gen).to(device)
        if case["per_channel"]:
            scale = (x.abs().amax(dim=(1, 2, 3), keepdim=True) / 6).contiguous()
            zp = None
        else:
            scale = torch.tensor(0.05, device=device)
            zp = torch.tensor(-0.2, device=device)
        paths = {"copy": lambda: x.clone(), "eager": lambda: fake_quant(x, case["fmt"], scale, zp)}
        if compile_too:
            paths["compiled"] = lambda: compiled_fake_quant(x, case["fmt"], scale, zp)
        bytes_moved = 2 * x.numel() * x.element_size()
        row, seconds = {}, {}
        for path, fn in paths.items():
            seconds[path], first = timed(fn, device, repeats)
            row[path] = dict(median_ms=round(1e3 * seconds[path], 3),
                             gb_per_s=round(bytes_moved / seconds[path] / 1e9, 2), first_call_s=round(first, 3))
        for path in row:  # from the unrounded times: a GPU copy takes a few µs
            row[path]["x_copy_time"] = round(seconds[path] / seconds["copy"], 2)
        if compile_too:
            row["compiled_equals_eager"] = bool(torch.equal(paths["compiled"](), paths["eager"]()))
        results[name] = row
    return results


def us_per_call(paths: dict, device, rounds: int, calls: int, warmup: int = 20) -> dict[str, list[float]]:
    """µs per call of each of ``paths`` (name → function), one entry per timed round of ``calls`` calls. The paths
    take turns round by round, so a shared machine's drift affects them alike."""
    for fn in paths.values():
        for _ in range(warmup):  # compilation and warm-up
            fn()
    per_round = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_round[name].append(1e6 * (time.perf_counter() - start) / calls)
    return per_round


def host_overhead(device, rounds: int = 7, calls: int = 300) -> dict:
    """Median µs per forward+backward call on a 72-element tensor: almost no arithmetic, so this is host work (and,
    on a GPU, launches). The eager path is the quantizers' unvalidated one."""
    fmt = get_format("ufp4_e2m2")
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    scale = torch.tensor(0.5, device=device, requires_grad=True)
    zero = torch.tensor(-0.1, device=device, requires_grad=True)
    paths = {"eager": lambda: _fake_quant(x, fmt, scale, zero).sum().backward(),
             "compiled": lambda: compiled_fake_quant(x, fmt, scale, zero).sum().backward()}
    return {name: round(statistics.median(times), 1)
            for name, times in us_per_call(paths, device, rounds, calls).items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per path after a warm-up (median)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile path (and the host_us_per_call timings)")
    args = p.parse_args(argv)
    report = dict(
        command=command_line(__file__, argv),
        machine=machine_info("cuda" if torch.cuda.is_available() else None),
        results={"cpu": bench_device(torch.device("cpu"), args.repeats, not args.no_compile)},
        host_us_per_call={},
    )
    if torch.cuda.is_available():
        report["results"]["cuda"] = bench_device(torch.device("cuda"), args.repeats, not args.no_compile)
    if not args.no_compile:
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            report["host_us_per_call"][device] = host_overhead(torch.device(device))
    print_result(report, args.out)
    return report


if __name__ == "__main__":
    main()
