"""Do launches find the kernels that msfp.triton_kernels.precompile compiled? Run as a script (no GPU needed):

    TRITON_CACHE_DIR=<empty dir> python tests/launch_from_cache.py

Precompiles a few launches for sm_90 (recorded, rebuilt on the CPU and compiled with ``compile_ahead`` in two
worker processes), then launches them as the launchers do (``_Launch.run``) through a stand-in sm_90 driver
(``benchmarks/stand_in_gpu.py``), which lets Triton's JIT specialize, compile or read its cache, and launches
nothing. Prints JSON:
what ``precompile`` reported, the cache entries added by each launch (none when the launch read what was compiled
ahead), and by a control launch that differs by one option (one: the check can see a miss); whether an autotuned
launch, made again, goes straight to the kernel the autotuner chose the first time; and, for each launch made again
(straight to the compiled kernel, past Triton's dispatch), whether the kernel's launcher got exactly what Triton's
own dispatch of that launch gives it — with one more launch whose input is not 16-byte aligned, on which Triton
specializes. Used by tests/test_triton_kernels.py, in a separate process because that module imports the kernels
interpreted.
"""

import json
import os
import sys
from unittest import mock

import torch
from triton.compiler.compiler import LazyDict
from triton.runtime import Autotuner, JITFunction

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


def act_codes_launch(aligned: bool):
    x = torch.zeros(2 * 64 * 16 * 16 + 1, dtype=torch.bfloat16)
    x = (x[:-1] if aligned else x[1:]).view(2, 64, 16, 16)  # 2 bytes off 16-byte alignment, or not
    return tk.act_codes, (x, "ufp4_e2m2", torch.ones(2), torch.zeros(2)), {}


def entries():
    return set(os.listdir(os.environ["TRITON_CACHE_DIR"]))


def prepare(launcher, args, options):
    return tk._prepare(next(n for n, (f, _) in tk._LAUNCHERS.items() if f is launcher), *args, **options)


def launch(gpu, launcher, args, options):
    """Cache entries added and kernels launched (their metadata) by one launch as the launcher makes it."""
    prepared = prepare(launcher, args, options)
    before, launched = entries(), gpu.launches
    prepared.run(args[0])
    if gpu.launches == launched:
        raise AssertionError(f"{launcher.__name__}{options} did not reach the launch")
    return len(entries() - before), gpu.launched[launched:]


def direct_as_triton(gpu, launcher, args, options):
    """Made again, does a launch go straight to its compiled kernel with what Triton's dispatch of the same launch
    (the same tensors) gives the kernel's launcher: grid, stream, kernel, metadata, hooks and every argument?"""
    prepared = prepare(launcher, args, options)
    before = len(gpu.calls)
    with mock.patch.object(JITFunction, "run", side_effect=AssertionError("dispatched by Triton")):
        prepared.run(args[0])
    prepared._launch_through_triton()
    direct, dispatched = gpu.calls[before:]
    return len(direct) == len(dispatched) and all(map(same, direct, dispatched))


def same(a, b) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    if type(a) is LazyDict:  # the launch metadata for Triton's launch hooks: built per launch
        return a.data == b.data and len(a.extras) == len(b.extras)
    return a == b


def main():
    precompiled = tk.precompile(lambda: [launcher(*args, **options) for launcher, args, options in LAUNCHES.values()],
                                arch=90, workers=2)
    added, kernels = {}, {}
    # CPU tensors pass for GPU ones: nothing reads them.
    with stand_in_gpu(arch=90, record_calls=True) as gpu, mock.patch.object(tk, "_require_triton", lambda *tensors: None):
        for name, spec in LAUNCHES.items():
            added[name], kernels[name] = launch(gpu, *spec)
        control, _ = launch(gpu, tk.conv2d_fp8, conv_args(), dict(BLOCKS, num_stages=2))
        # The autotuned launch again: now straight to the kernel the autotuner chose, without the autotuner.
        with mock.patch.object(Autotuner, "run", autospec=True, side_effect=Autotuner.run) as autotuner_run:
            _, again = launch(gpu, *LAUNCHES["conv_autotuned"])
        # A launch unlike an earlier one only in its input's alignment, which Triton specializes on.
        _, aligned_kernels = launch(gpu, *act_codes_launch(aligned=True))
        _, misaligned_kernels = launch(gpu, *act_codes_launch(aligned=False))
        direct = {name: direct_as_triton(gpu, *spec)
                  for name, spec in [*LAUNCHES.items(), ("misaligned", act_codes_launch(aligned=False))]}
    direct["misaligned_own_kernel"] = misaligned_kernels[-1] is not aligned_kernels[-1]
    tuned = kernels["conv_autotuned"]  # each candidate timed, then the winner (the last: see stand_in_gpu.py)
    autotuned = dict(first_launches=len(tuned), winner_is_last_candidate=tuned[-1] is tuned[-2],
                     again_launches=len(again), again_same_kernel=again[-1] is tuned[-1],
                     again_autotuner_calls=autotuner_run.call_count)
    print(json.dumps(dict(precompiled=precompiled, added=added, control=control, autotuned=autotuned, direct=direct)))


if __name__ == "__main__":
    main()
