"""Do launches find the kernels that msfp.triton_kernels.precompile compiled? Run as a script (no GPU needed):

    TRITON_CACHE_DIR=<empty dir> python tests/launch_from_cache.py

Precompiles a few launches for sm_90 (recorded, rebuilt on the CPU and compiled with ``compile_ahead`` in two
worker processes), then launches them as the launchers do (``_Launch.run``) through a stand-in sm_90 driver, which
lets Triton's JIT specialize, compile or read its cache, and stops it at the kernel's first launch. Prints JSON:
what ``precompile`` reported, the cache entries added by each launch (none when the launch read what was compiled
ahead), and by a control launch that differs by one option (one: the check can see a miss). Used by
tests/test_triton_kernels.py, in a separate process because that module imports the kernels interpreted.
"""

import json
import os

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from msfp import triton_kernels as tk


class Launched(Exception):
    """Raised where Triton would load the compiled kernel onto the GPU."""


class Sm90Driver:
    """What JITFunction.run and the autotuner ask of a driver before a compiled kernel reaches the GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        def bench(call, quantiles=None):  # the autotuner compiles each candidate in its first call
            try:
                call()
            except Launched:
                pass
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    @property
    def utils(self):
        raise Launched

    @property
    def launcher_cls(self):
        raise Launched


def conv_args(bordered=False):
    B, H, W, C, O = 2, 16, 16, 64, 64
    x = torch.zeros(B, H + 2, W + 2, C, dtype=torch.float8_e4m3fn)
    return (x[:, 1:-1, 1:-1] if bordered else x[:, :H, :W].contiguous(), torch.zeros(O, 3, 3, C, dtype=x.dtype),
            torch.ones(B), torch.ones(O), torch.zeros(O), torch.zeros(B), torch.zeros(O, 3, 3), 1, 1)


BLOCKS = dict(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3)
LAUNCHES = {
    "act_codes_bordered": (tk.act_codes, (torch.zeros(2, 64, 16, 16, dtype=torch.bfloat16), "ufp4_e2m2",
                                          torch.ones(2), torch.zeros(2)), dict(pad=(1, 1))),
    "conv_pointers": (tk.conv2d_fp8, conv_args(), BLOCKS),
    "conv_autotuned": (tk.conv2d_fp8, conv_args(), {}),
    "conv_tma_rows": (tk.conv2d_fp8, conv_args(bordered=True), dict(BLOCKS, tma=True, zero_bordered=True)),
    "linear_tma": (tk.linear_fp8, (torch.zeros(256, 64, dtype=torch.float8_e4m3fn),
                                   torch.zeros(128, 64, dtype=torch.float8_e4m3fn), torch.ones(256), torch.ones(128)),
                   dict(BLOCKS, tma=True)),
}


def entries():
    return set(os.listdir(os.environ["TRITON_CACHE_DIR"]))


def launch(launcher, args, options):
    prepared = tk._prepare(next(n for n, (f, _) in tk._LAUNCHERS.items() if f is launcher), *args, **options)
    before = entries()
    try:
        prepared.kernel[prepared.grid](*prepared.args, **prepared.flags)
    except Launched:
        pass
    else:
        raise AssertionError("the stand-in driver let a kernel launch")
    return len(entries() - before)


def main():
    precompiled = tk.precompile(lambda: [launcher(*args, **options) for launcher, args, options in LAUNCHES.values()],
                                arch=90, workers=2)
    driver.set_active(Sm90Driver())
    added = {name: launch(*spec) for name, spec in LAUNCHES.items()}
    control = launch(tk.conv2d_fp8, conv_args(), dict(BLOCKS, num_stages=2))
    print(json.dumps(dict(precompiled=precompiled, added=added, control=control)))


if __name__ == "__main__":
    main()
