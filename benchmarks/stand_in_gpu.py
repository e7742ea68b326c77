"""Triton's dispatch of GPU kernels on a machine without a GPU: a stand-in for its CUDA driver.

Inside ``with stand_in_gpu(arch=90) as gpu:`` Triton treats kernel calls as it would on a GPU of that compute
capability: its JIT binds and specializes the arguments, compiles for ``arch`` or reads its cache, the autotuner
keys and (on a key's first call) picks a configuration, and the compiled kernel is "loaded" — but the launch itself
does nothing and is only noted: ``gpu.launched`` lists each launched kernel's metadata and, with
``record_calls=True``, ``gpu.calls`` the arguments its launcher got (grid, stream, kernel handle, metadata, hooks,
then the kernel's own). Every candidate the autotuner times comes out faster than the one before, so the last one
wins (unlike the first, it shows when a launch ignores the choice). What it leaves out of a real launch is Triton's C
launcher: packing the arguments (and, for TMA descriptors, encoding the tensor maps) and the CUDA launch call. Used
to time Triton's share of a layer's host work (``fp8_host_overhead.py``) and to check that launches read the kernels
compiled ahead and, made again, reach the launcher as Triton's dispatch would (``tests/launch_from_cache.py``).
Tensors may be CPU tensors: nothing reads their memory.
"""

from __future__ import annotations

import contextlib

from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class _Binaries:
    # H100/H200 limits (sm_90): Triton checks a kernel's shared memory and threads against them when loading it.
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        # module, function, registers, spills, max threads per block; a module, as a load gives, marks the
        # kernel loaded (with None, Triton would load it again on every launch)
        return object(), object(), 0, 0, 1024

    def unload_module(self, module):
        pass


class StandInGpu:
    """What Triton's JIT, autotuner and compiled kernels ask of the active driver, answered without a GPU."""

    utils = _Binaries()

    def __init__(self, arch: int, record_calls: bool = False):
        self.target = GPUTarget("cuda", arch, 32)
        self.launched = []
        self.calls = []
        self._timings = 0
        launched, calls = self.launched, self.calls

        class Launcher:  # built per kernel when it is loaded; called per launch
            def __init__(self, src, metadata):
                self.metadata = metadata

            def __call__(self, *args):
                launched.append(self.metadata)
                if record_calls:  # (it keeps the arguments alive)
                    calls.append(args)

        self.launcher_cls = Launcher

    @property
    def launches(self) -> int:
        return len(self.launched)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_benchmarker(self):
        def bench(call, quantiles=None, **kwargs):
            call()
            self._timings += 1
            ms = 1.0 / self._timings
            return [ms, ms, ms] if quantiles else ms

        return bench


@contextlib.contextmanager
def stand_in_gpu(arch: int = 90, record_calls: bool = False):
    previous = driver._active  # None until first asked for; asking would fail without a GPU
    gpu = StandInGpu(arch, record_calls)
    driver.set_active(gpu)
    try:
        yield gpu
    finally:
        driver._active = previous
