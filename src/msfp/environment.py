"""The machine and versions a measurement ran on, for every benchmark and report."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


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
