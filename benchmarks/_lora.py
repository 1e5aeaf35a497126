"""What the LoRA benchmarks (lora_memory.py, lora_minilm.py) share: importing transformers
beside a mismatched torchvision, and the code a result was made with."""

from __future__ import annotations

import datetime
import importlib.util
import platform
import subprocess
import sys
import types


def torchvision_importable() -> None:
    """A torchvision wheel built for another torch fails at import while registering fake
    kernels that nothing here uses (transformers imports it): stub that one module."""
    if importlib.util.find_spec("torchvision") is None:
        return
    probe = subprocess.run(
        [sys.executable, "-c", "import torchvision"], capture_output=True, text=True
    )
    if probe.returncode != 0 and "torchvision::" in probe.stderr:
        name = "torchvision._meta_registrations"
        sys.modules.setdefault(name, types.ModuleType(name))


def code() -> dict[str, object]:
    """``git rev-parse HEAD``, whether src/, configs/ or benchmarks/ (results excepted)
    differ from it, and the digest of the effsam package that ran."""
    from effsam.frontier.runs import code_stamp

    stamp = code_stamp()
    return {"commit": stamp["commit"] or "unknown", "dirty": stamp["dirty"], "src": stamp["src"]}


def run_header(script: str, argv: list[str] | None, threads: int) -> dict[str, object]:
    """What every LoRA results file starts with: the command, the code, the date and the
    machine."""
    import torch

    cmd = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    return {
        "command": cmd.strip(),
        **code(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
    }
