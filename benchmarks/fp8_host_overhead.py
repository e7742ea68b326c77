"""Host (Python) time of one Fp8Layer forward on the Triton path, with the kernel launches themselves left out.

    python benchmarks/fp8_host_overhead.py [--calls 1000 --rounds 7]

A W4A4 layer on the FP8 path launches two kernels (activation codes, GEMM); everything around them (argument checks,
scale vectors, output allocation) is host work that a GPU waits for unless the step is replayed from a CUDA graph.
On the first H200 run (benchmarks/results/gpu_w4a4_h200_f1fe63f.json) no eager FP8 GEMM took under 0.23 ms whatever
its size, which points at that host work. This measures it on any machine: the launches are replaced by no-ops, so
no GPU or Triton compile is needed; what Triton's own launcher adds on a GPU is not included (with TMA loads, that
includes encoding the two tensor maps). Prints JSON with µs per forward for a linear and a 3×3 convolution layer
(sizes do not matter here: nothing is computed), with pointer loads and with TMA loads (two tensor descriptors built
per call; for the convolution both tilings, ``"rows"`` also allocating its codes' zero border), machine and command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

import torch

from fake_quant import us_per_call  # the script's own directory is on sys.path
from gpu_w4a4 import quantized_layer
from msfp import triton_kernels
from msfp.environment import machine_info
from msfp.fp8 import Fp8Layer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=1000, help="forwards per timed round")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (the median is reported)")
    args = p.parse_args(argv)
    if not triton_kernels.HAS_TRITON:
        sys.exit("fp8_host_overhead.py needs the triton package (its launchers are what is timed)")
    torch.set_num_threads(1)
    triton_kernels._Launch.run = lambda self, *tensors: self.result  # the launch itself is not host work we own
    cases = {"linear_64x64_tokens16": (torch.nn.Linear(64, 64), torch.randn(2, 16, 64)),
             "conv3x3_16x16_8x8": (torch.nn.Conv2d(16, 16, 3, padding=1), torch.randn(2, 16, 8, 8))}
    results = {}
    with torch.no_grad():
        for (name, (module, x)), tma in itertools.product(cases.items(), (None, "boxes", "rows")):
            if tma == "boxes" and name.startswith("linear"):
                continue  # a linear's TMA tiles are flat rows either way
            layer, xb = Fp8Layer(quantized_layer(module, x), use_kernels=True, tma=tma), x.bfloat16()
            key = name if tma is None else f"{name}_tma_{tma}"
            rounds = us_per_call({key: lambda: layer(xb)}, torch.device("cpu"), args.rounds, args.calls,
                                 warmup=200)[key]
            results[key] = dict(host_us_per_forward=statistics.median(rounds), rounds=rounds)
    command = "python " + " ".join(["benchmarks/fp8_host_overhead.py", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(dict(benchmark="fp8_host_overhead", settings=vars(args), machine=machine_info("cpu"),
                          command=command, results=results), indent=2))


if __name__ == "__main__":
    main()
