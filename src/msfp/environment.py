"""The machine and versions a measurement ran on, for every benchmark and report; and the help layout that the
benchmark and asset-training scripts share."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from msfp.fileio import write_json


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of a benchmark or script: its docstring as written, and every option's default."""


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


def machine_info(device: str | torch.device | None = None) -> dict:
    """The CPU, GPU and versions, and a digest of msfp's own files (``msfp.__version__`` stays the same between
    commits): what a recorded figure depends on besides its command."""
    import diffusers

    from msfp import __version__
    from msfp.identity import code_digest

    device = torch.device(device) if device is not None else None
    on_gpu = device is not None and device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if on_gpu else None
    # Global settings that change float results (TF32 matmuls and convolutions on a GPU), so a cache keyed on this
    # dict is not reused across them.
    precision = dict(float32_matmul=torch.get_float32_matmul_precision(),
                     **(dict(cuda_matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                             cudnn_tf32=torch.backends.cudnn.allow_tf32) if on_gpu else {}))
    return dict(cpu=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                device=str(device) if device is not None else "cpu", gpu=gpu, precision=precision,
                versions=dict(msfp=__version__, msfp_code=code_digest(), torch=torch.__version__,
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
