"""Host (Python) time of one Fp8Layer forward on the Triton path, without a GPU: ours alone, and with Triton's
dispatch of the two kernel launches.

    python benchmarks/fp8_host_overhead.py [--calls 1000 --rounds 7 --compile-workers N | --no-triton-dispatch]

A W4A4 layer on the FP8 path launches two kernels (activation codes, GEMM); everything around them is host work that
a GPU waits for unless the step is replayed from a CUDA graph. On the first H200 run
(benchmarks/results/gpu_w4a4_h200_f1fe63f.json) no eager FP8 GEMM took under 0.23 ms whatever its size, which points
at that host work. Measured on any machine, in two parts:

- ``host_us_per_forward``: our launchers' work (argument checks, scale vectors, output allocation), with the launches
  replaced by no-ops.
- ``with_triton_dispatch_us_per_forward``: the same forward with the launches going through Triton as on an sm_90
  GPU, via the stand-in driver of ``stand_in_gpu.py``: the first launch of each kind through its JIT and autotuner
  (argument binding, specialization, cache lookup, the autotuner's choice), the timed ones, like it, straight to the
  compiled kernel that Triton chose (``_Launch._launch``); the kernels are compiled for sm_90 first
  (``msfp.triton_kernels.precompile``). Left out: Triton's C launcher (argument packing and, with TMA, encoding the
  tensor maps) and the CUDA launch itself.
  ``launches_per_forward`` counts what reached the launch. Needs Triton's real JIT, so not ``TRITON_INTERPRET=1``.

Prints JSON with µs per forward for a linear and a 3×3 convolution layer (sizes do not matter here: nothing is
computed), with pointer loads and with TMA loads (two tensor descriptors built per call; for the convolution both
tilings, ``"rows"`` also allocating its codes' zero border), machine and command.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import statistics
import sys
from unittest import mock

import torch

from fake_quant import us_per_call  # the script's own directory is on sys.path
from gpu_w4a4 import quantized_layer
from msfp import triton_kernels
from msfp.environment import HelpFormatter, command_line, machine_info
from msfp.fp8 import Fp8Layer
from stand_in_gpu import stand_in_gpu


def layers() -> dict:
    cases = {"linear_64x64_tokens16": (torch.nn.Linear(64, 64), torch.randn(2, 16, 64)),
             "conv3x3_16x16_8x8": (torch.nn.Conv2d(16, 16, 3, padding=1), torch.randn(2, 16, 8, 8))}
    built = {}
    for (name, (module, x)), tma in itertools.product(cases.items(), (None, "boxes", "rows")):
        if tma == "boxes" and name.startswith("linear"):
            continue  # a linear's TMA tiles are flat rows either way
        key = name if tma is None else f"{name}_tma_{tma}"
        built[key] = Fp8Layer(quantized_layer(module, x), use_kernels=True, tma=tma), x.bfloat16()
    return built


def no_launches():
    """Launches as no-ops: they are not host work we own."""
    return mock.patch.object(triton_kernels._Launch, "run", lambda self, *tensors: self.result)


@contextlib.contextmanager
def dispatching():
    """Launches through Triton's dispatch to a stand-in sm_90 GPU (CPU tensors pass as GPU ones: nothing reads them)."""
    with stand_in_gpu(arch=90) as gpu, mock.patch.object(triton_kernels, "_require_triton", lambda *t: None):
        yield gpu


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--calls", type=int, default=1000, help="forwards per timed round")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (the median is reported)")
    p.add_argument("--triton-dispatch", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the forwards with Triton's dispatch (compiles the kernels for sm_90 first)")
    p.add_argument("--compile-workers", type=int, default=None,
                   help="processes compiling the kernels ahead (unset: one per CPU; 0: in this process)")
    args = p.parse_args(argv)
    if not triton_kernels.HAS_TRITON:
        sys.exit("fp8_host_overhead.py needs the triton package (its launchers are what is timed)")
    if args.triton_dispatch and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("--triton-dispatch times Triton's JIT dispatch, which TRITON_INTERPRET=1 replaces by its interpreter")
    torch.set_num_threads(1)
    built = layers()
    forwards = {key: functools.partial(layer, x) for key, (layer, x) in built.items()}
    results = {key: {} for key in forwards}
    modes = [("host_us_per_forward", "rounds", no_launches)]
    with torch.no_grad():
        if args.triton_dispatch:
            compiled = triton_kernels.precompile(lambda: [f() for f in forwards.values()], arch=90,
                                                 workers=args.compile_workers)
            with dispatching() as gpu:
                for key, forward in forwards.items():
                    forward()  # the autotuner picks its configuration (launching each candidate once)
                    launches = gpu.launches
                    forward()
                    results[key]["launches_per_forward"] = gpu.launches - launches
            modes.append(("with_triton_dispatch_us_per_forward", "with_triton_dispatch_rounds", dispatching))
        # The two modes take turns round by round: run one after the other, this VM's drift between them made "ours
        # alone" slower than ours with Triton's dispatch.
        for _ in range(args.rounds):
            for _median, rounds, mode in modes:
                with mode():
                    for key, r in us_per_call(forwards, torch.device("cpu"), 1, args.calls, warmup=200).items():
                        results[key].setdefault(rounds, []).extend(r)
        for key, r in results.items():
            for median, rounds, _mode in modes:
                r[median] = statistics.median(r[rounds])
    command = command_line(__file__, argv)
    print(json.dumps(dict(benchmark="fp8_host_overhead", settings=vars(args), machine=machine_info("cpu"),
                          command=command, precompiled=compiled if args.triton_dispatch else None, results=results),
                     indent=2))


if __name__ == "__main__":
    main()
