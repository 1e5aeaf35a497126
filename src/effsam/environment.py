"""What a result was measured on: versions, device, threads, date."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from typing import Any

import torch


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """A JSON-ready description of the machine and software."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    from effsam import __version__

    info["effsam"] = __version__  # the imported copy's, installed or a source tree
    return info


def environment_tag(info: dict[str, Any]) -> str:
    """A short file-name tag: device, threads, torch version."""
    device = "cuda" if info["device"].startswith("cuda") else "cpu"
    return f"{device}{info['torch_threads']}t-torch{info['torch'].split('+')[0]}"
