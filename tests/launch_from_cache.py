"""Do launches find the kernels that msfp.triton_kernels.precompile compiled? Run as a script (no GPU needed):

    TRITON_CACHE_DIR=<empty dir> python tests/launch_from_cache.py

Precompiles a few launches for sm_90 (recorded, rebuilt on the CPU and compiled with ``compile_ahead`` in two
worker processes), then launches them as the launchers do (``_Launch.run``) through a stand-in sm_90 driver
(``benchmarks/stand_in_gpu.py``), which lets Triton's JIT specialize, compile or read its cache, and launches
nothing. Prints JSON:
what ``precompile`` reported, the cache entries added by each launch (none when the launch read what was compiled
ahead), and by a control launch that differs by one option (one: the check can see a miss). Used by
tests/test_triton_kernels.py, in a separate process because that module imports the kernels interpreted.
"""

import json
import os
import sys

import torch

from msfp import triton_kernels as tk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks"))
from stand_in_gpu import stand_in_gpu  # noqa: E402


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


def launch(gpu, launcher, args, options):
    prepared = tk._prepare(next(n for n, (f, _) in tk._LAUNCHERS.items() if f is launcher), *args, **options)
    before, launches = entries(), gpu.launches
    prepared.kernel[prepared.grid](*prepared.args, **prepared.flags)
    if gpu.launches == launches:  # the stand-in counts what reached the GPU's launch call
        raise AssertionError(f"{launcher.__name__}{options} did not reach the launch")
    return len(entries() - before)


def main():
    precompiled = tk.precompile(lambda: [launcher(*args, **options) for launcher, args, options in LAUNCHES.values()],
                                arch=90, workers=2)
    with stand_in_gpu(arch=90) as gpu:
        added = {name: launch(gpu, *spec) for name, spec in LAUNCHES.items()}
        control = launch(gpu, tk.conv2d_fp8, conv_args(), dict(BLOCKS, num_stages=2))
    print(json.dumps(dict(precompiled=precompiled, added=added, control=control)))


if __name__ == "__main__":
    main()
