"""The machine and versions a measurement ran on, for every benchmark and report; and the help layout that the
benchmark and asset-training scripts share."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch


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


def machine_info(device: str | torch.device | None = None) -> dict:
    import diffusers

    from msfp import __version__

    device = torch.device(device) if device is not None else None
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    return dict(cpu=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                device=str(device) if device is not None else "cpu", gpu=gpu,
                versions=dict(msfp=__version__, torch=torch.__version__, diffusers=diffusers.__version__,
                              python=platform.python_version()))
