"""Is msfp's fused rounding, as Inductor writes it for a GPU, exact? Run as a script (no GPU needed):

    python tests/fused_rounding_triton.py capture DIR         # Triton not interpreted
    TRITON_INTERPRET=1 python tests/fused_rounding_triton.py interpret DIR

On a CUDA device :func:`msfp.kernels.compiled_fake_quant` (the fused rounding that fine-tuning uses there by default)
runs Triton kernels that Inductor writes. ``capture`` has Inductor write them here: its Triton backend with CPU
tensors, the options ``compiled_fake_quant`` passes and a stand-in sm_90 driver (``benchmarks/stand_in_gpu.py``),
stopped before Triton would compile them for the CPU. It writes each case's kernels and the calls of Inductor's
wrapper into DIR, compiles each kernel for sm_90 and prints, per case, what its PTX holds: IEEE divisions
(``div.rn.f32``) or approximate ones, FMA contractions (which would change the last bit of ``q · scale + zero_point``)
and round-to-nearest-even conversions (``cvt.rni``). ``interpret`` runs the written kernels in Triton's interpreter,
in the wrapper's order, on inputs on every grid point, midpoint (tie) and their neighbours at several scales (and
zeros of both signs, subnormals, values past the range, infinities, NaN), and prints, per case, how many outputs
differ from eager ``fake_quant`` bit for bit. The interpreter has no libdevice: ``nearbyint``, ``trunc``, ``isnan``
and ``isinf`` are numpy's here (``rint`` for ``nearbyint``, which on CUDA rounds to nearest, ties to even: the PTX's
``cvt.rni``). Uses Inductor and Triton internals (checked with torch 2.13 and Triton 3.9). Used by
tests/test_kernels.py.
"""

import ast
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from msfp.formats import fake_quant, get_format

# Every 4-bit format, a 6-bit and the 8-bit edge-layer grid; one case with gradients (fine-tuning's forward).
CASES = {name: (name, False) for name in ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "ufp4_e1m3", "ufp4_e2m2", "ufp4_e3m1",
                                          "ufp4_e4m0", "int4", "uint4", "fp6_e3m2", "fp8_e4m3"]}
CASES["ufp4_e2m2_grad"] = ("ufp4_e2m2", True)
ROW_SCALES = [1.0, 0.5, 2.0**-7, 8.0, 3.0, 0.1, 1e-3, 7.3]  # powers of two keep ties exact in grid units
ZERO_POINTS = [0.0, -0.25, -0.5, 0.125]  # per column: on those rows x - z is exact


def inputs(name: str, requires_grad: bool):
    """``x`` (rows × values), per-row ``scale`` and, for unsigned formats, a per-column ``zero_point``: the shapes
    differ, so the wrapper's arguments can be told apart by shape."""
    fmt = get_format(name)
    grid = fmt.values().float()
    units = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, grid.nextafter(grid + 1), grid.nextafter(grid - 1),
                       torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2 * fmt.max_value, -2 * fmt.max_value, math.inf,
                                     -math.inf, math.nan])])
    scale = torch.tensor(ROW_SCALES).unsqueeze(1)
    zero_point = None
    x = units * scale
    if fmt.needs_zero_point:
        zero_point = torch.tensor(ZERO_POINTS).repeat(math.ceil(units.numel() / len(ZERO_POINTS)))
        zero_point = zero_point[: units.numel()].unsqueeze(0)
        x = x + zero_point
    return x.requires_grad_(requires_grad), scale, zero_point


def capture(name: str, requires_grad: bool):
    """Inductor's Triton kernels ``[(name, source)]`` and wrapper source for ``compiled_fake_quant`` on CPU tensors."""
    import torch._inductor.config as inductor_config
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.codecache import PyCodeCache

    benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    from stand_in_gpu import stand_in_gpu

    from msfp.kernels import compiled_fake_quant

    kernels, wrappers = [], []

    def record_kernel(self, kernel_name, source_code, *args, **kwargs):
        kernels.append((kernel_name, source_code))

    real_write = PyCodeCache.write.__func__

    def record_wrapper(cls, source_code, extra=""):
        wrappers.append(source_code)
        return real_write(cls, source_code, extra)

    class Captured(Exception):
        pass

    def stop(*args, **kwargs):  # the wrapper module has declared all its kernels: stop before running it
        raise Captured

    torch._dynamo.reset()
    # No cache: a cached graph would skip the code generation this records.
    with inductor_config.patch(cpu_backend="triton", compile_threads=1, force_disable_caches=True), \
            stand_in_gpu(arch=90), \
            mock.patch.object(AsyncCompile, "triton", record_kernel), \
            mock.patch.object(AsyncCompile, "wait", stop), \
            mock.patch.object(PyCodeCache, "write", classmethod(record_wrapper)):
        try:
            x, scale, zero_point = inputs(name, requires_grad)
            compiled_fake_quant(x, name, scale, zero_point)
        except Exception as e:  # Inductor wraps Captured
            if not kernels or "Captured" not in repr(e):
                raise
    return kernels, wrappers[-1]


def call_sequence(wrapper: str) -> dict:
    """From Inductor's wrapper: the graph inputs' shapes, the buffers it allocates, its kernel calls and outputs."""
    call = wrapper[wrapper.index("def call("):wrapper.index("runner = Runner")]
    int_tuple = r"(\([\d, ]*\))"
    shapes = {arg: ast.literal_eval(shape)
              for arg, shape in re.findall(rf"assert_size_stride\((\w+), {int_tuple},", call)}
    buffers = {buf: dict(shape=ast.literal_eval(shape), stride=ast.literal_eval(stride), dtype=dtype)
               for buf, shape, stride, dtype in
               re.findall(rf"(\w+) = empty_strided_cpu\({int_tuple}, {int_tuple}, torch\.(\w+)\)", call)}
    runs = [dict(kernel=kernel, args=[a.strip() for a in args.split(",") if "stream=" not in a])
            for kernel, args in re.findall(r"(\w+)\.run\(([^)]*)\)", call)]
    returned = re.search(r"return \(([^)]*)\)", call).group(1)
    outputs = [b.strip() for b in returned.split(",") if b.strip()]
    return dict(inputs=shapes, buffers=buffers, runs=runs, outputs=outputs)


def load_kernel(path: Path, name: str, interpret: bool):
    """The ``@triton.jit`` function of a kernel module Inductor wrote, without its autotuning decorator, and the
    decorator's ``triton_meta``."""
    from torch._inductor.runtime import triton_heuristics

    metas = []

    def pointwise(*args, triton_meta, **kwargs):
        metas.append(triton_meta)
        return lambda fn: fn

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.object(triton_heuristics, "pointwise", pointwise), \
            mock.patch("torch._inductor.runtime.triton_helpers.set_driver_to_cpu"):
        spec.loader.exec_module(module)
    if interpret:
        module.libdevice = _InterpretedLibdevice
    return getattr(module, name), metas[0]


def ptx_counts(fn, meta) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn, meta["signature"], {"XBLOCK": 1024}, meta["configs"][0])
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=4, enable_fp_fusion=meta["enable_fp_fusion"])).asm["ptx"]
    patterns = dict(ieee_division=r"div\.rn\.f32", approximate_division=r"div\.(full|approx)\.f32|rcp\.approx",
                    fma=r"\bfma\.", round_to_nearest_even=r"cvt\.rni\.f32\.f32")
    return {key: len(re.findall(pattern, ptx)) for key, pattern in patterns.items()}


def _elementwise(numpy_fn, result=None):
    """A libdevice function for the interpreter; ``result`` (e.g. ``"int32"``: libdevice's tests return an int) or
    the argument's element type."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def apply(x):
        dtype = getattr(tl, result) if result else x.handle.dtype.scalar
        data = numpy_fn(x.handle.data).astype(np.dtype(result) if result else x.handle.data.dtype)
        return tl.tensor(TensorHandle(data, dtype), x.type.with_element_ty(dtype))

    return staticmethod(apply)


class _InterpretedLibdevice:
    nearbyint = _elementwise(np.rint)  # CUDA's nearbyintf: to nearest, ties to even (the default rounding mode)
    trunc = _elementwise(np.trunc)
    isnan = _elementwise(np.isnan, "int32")
    isinf = _elementwise(np.isinf, "int32")


def main_capture(out: Path) -> dict:
    result = {}
    for case, (name, requires_grad) in CASES.items():
        kernels, wrapper = capture(name, requires_grad)
        ptx = {}
        (out / case).mkdir()  # kernel names repeat across formats; their constants differ
        for kernel_name, source in kernels:
            path = out / case / f"{kernel_name}.py"
            path.write_text(source)
            fn, meta = load_kernel(path, kernel_name, interpret=False)
            ptx[kernel_name] = dict(ptx_counts(fn, meta), enable_fp_fusion=meta["enable_fp_fusion"],
                                    div_rn_calls=source.count("div_rn("))
        sequence = call_sequence(wrapper)
        (out / case / "calls.json").write_text(json.dumps(sequence))
        result[case] = dict(kernels=ptx, runs=len(sequence["runs"]))
    return result


def main_interpret(out: Path) -> dict:
    import triton

    result = {}
    for case, (name, requires_grad) in CASES.items():
        sequence = json.loads((out / case / "calls.json").read_text())
        x, scale, zero_point = inputs(name, requires_grad=False)
        by_shape = {tuple(t.shape): t for t in (x, scale, zero_point) if t is not None}
        if len(by_shape) != len(sequence["inputs"]):
            raise AssertionError(f"{case}: inputs {sequence['inputs']} cannot be told apart by shape")
        values = {arg: by_shape[tuple(shape)] for arg, shape in sequence["inputs"].items()}
        values.update({buf: torch.empty_strided(b["shape"], b["stride"], dtype=getattr(torch, b["dtype"]))
                       for buf, b in sequence["buffers"].items()})
        for run in sequence["runs"]:
            fn, _ = load_kernel(out / case / f"{run['kernel']}.py", run["kernel"], interpret=True)
            args = [values[a] if a in values else int(a) for a in run["args"]]
            numel = args[-1]  # a pointwise kernel's last argument
            fn[(triton.cdiv(numel, 1024),)](*args, XBLOCK=1024)
        got, expected = values[sequence["outputs"][0]], fake_quant(x, name, scale, zero_point)
        same = (got == expected) & (got.signbit() == expected.signbit()) | (got.isnan() & expected.isnan())
        differ = (~same).nonzero().tolist()
        result[case] = dict(values=got.numel(), differ=len(differ),
                            examples=[dict(x=x[i, j].item(), scale=scale[i, 0].item(), kernel=got[i, j].item(),
                                           eager=expected[i, j].item()) for i, j in differ[:5]])
    return result


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    if mode not in ("capture", "interpret"):
        sys.exit(f"usage: {sys.argv[0]} capture|interpret DIR")
    if (mode == "interpret") != (os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit(f"{mode} needs TRITON_INTERPRET {'=1' if mode == 'interpret' else 'unset'}")
    print(json.dumps(main_capture(directory) if mode == "capture" else main_interpret(directory)))
