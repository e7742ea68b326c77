"""The machine and versions a measurement ran on, for every benchmark and report; and the help layout and option
checks that the benchmark and asset-training scripts share."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from msfp.config import PRESETS, QuantConfig
from msfp.fileio import write_json


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of a benchmark or script: its docstring as written, and every option's default."""


def check_minimums(parser: argparse.ArgumentParser, args: argparse.Namespace, **minimums: int) -> None:
    """``parser.error`` naming the first option below its minimum (an unset one passes): scripts check their options
    before the work that a bad one would waste, not where it fails."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and not value >= low:  # (NaN too)
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """``parser.error`` naming the first of these number options that is not finite and > 0 (an unset one passes):
    a zero or NaN learning rate trained nothing, or NaN weights, for the whole run."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")


def preset_names(parser: argparse.ArgumentParser, text: str, option: str = "--presets") -> list[str]:
    """The quantization presets listed in ``text`` (comma-separated; empty entries dropped) by their canonical names,
    each once, in order ("W4A4-MSFP, w4a4-msfp" is one preset, run once); every one checked up front: an unknown name
    must not surface after the presets before it were calibrated."""
    names, unknown = [], []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        try:
            canonical = QuantConfig.preset(name).name  # by QuantConfig.preset's own lookup (case ignored)
        except ValueError:
            unknown.append(name)
            continue
        if canonical not in names:
            names.append(canonical)
    if unknown:
        parser.error(f"{option}: unknown preset(s) {', '.join(map(repr, unknown))}; choose from {', '.join(PRESETS)}")
    return names


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def float32_precision() -> dict:
    """The global settings that change float32 results (TF32 or bfloat16 matmuls and convolutions, on a GPU or through
    oneDNN on a CPU), so that a cache keyed on :func:`machine_info` is not reused across them. Read through torch's
    per-backend ``fp32_precision`` where it has them (they reflect the legacy setters too; the legacy getter raises
    once the new API was used), else through the legacy flags."""
    backends = torch.backends
    per_backend = {"cuda_matmul": backends.cuda.matmul, "cudnn_conv": getattr(backends.cudnn, "conv", None),
                   "mkldnn_matmul": getattr(backends.mkldnn, "matmul", None),
                   "mkldnn_conv": getattr(backends.mkldnn, "conv", None)}
    if all(hasattr(b, "fp32_precision") for b in per_backend.values()):
        return {name: b.fp32_precision for name, b in per_backend.items()}
    return dict(float32_matmul=torch.get_float32_matmul_precision(), cuda_matmul_tf32=backends.cuda.matmul.allow_tf32,
                cudnn_tf32=backends.cudnn.allow_tf32)


def machine_info(device: str | torch.device | None = None) -> dict:
    """The CPU, GPU and versions, and a digest of msfp's own files (``msfp.__version__`` stays the same between
    commits): what a recorded figure depends on besides its command."""
    import diffusers

    from msfp import __version__
    from msfp.identity import code_digest

    device = torch.device(device) if device is not None else None
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    # cpu_capability: the instruction set whose kernels torch and oneDNN run (AVX2, AVX512...); it changes float
    # results from the first step, so the same torch on another CPU does not reproduce them bit for bit.
    # str(): torch's version is a TorchVersion, which a weights_only torch.load of a state file refuses
    return dict(cpu=cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability(), cores=os.cpu_count(),
                torch_threads=torch.get_num_threads(),
                device=str(device) if device is not None else "cpu", gpu=gpu, precision=float32_precision(),
                versions=dict(msfp=__version__, msfp_code=code_digest(), torch=str(torch.__version__),
                              cuda=torch.version.cuda, triton=_installed_version("triton"),
                              diffusers=diffusers.__version__, torchao=_installed_version("torchao"),  # its rows
                              python=platform.python_version()))


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How to run a benchmark or script again from the repository root: ``python benchmarks/NAME.py ARGS``, quoted
    for a shell. ``script`` is its ``__file__``; ``argv`` its arguments when its ``main(argv)`` was called directly."""
    path = Path(script)
    return shlex.join(["python", f"{path.parent.name}/{path.name}", *(sys.argv[1:] if argv is None else argv)])


def print_result(result: dict, out: str | os.PathLike | None = None) -> None:
    """Print a benchmark's JSON result, and also write it atomically to ``out`` when given."""
    print(json.dumps(result, indent=2))
    if out:
        write_json(out, result)
