"""Which code made a result: the git commit of the checkout holding effsam ("+dirty" with
uncommitted changes under src/, configs/ or benchmarks/), a digest of the effsam package
and the torch version. Every run's ``env.json`` records it, ``effsam compare`` prints it
under its table, and the frontier stamps each launch with it.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

#: The effsam package's directory, and the checkout holding it (None when installed).
PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE.parents[1]
CHECKOUT: Path | None = _CHECKOUT if (_CHECKOUT / ".git").exists() else None


def _git(*args: str, root: Path | None = CHECKOUT) -> str | None:
    if root is None:
        return None
    try:
        proc = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout


def src_digest(package: Path = PACKAGE) -> str:
    """SHA-256 (16 hex digits) of every file of the effsam package (named from its parent,
    ``effsam/...``; caches and metadata left out): the code that trains a run."""
    h = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        rel = path.relative_to(package.parent).as_posix()
        if "__pycache__" in rel or rel.endswith(".pyc") or ".egg-info" in rel:
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_stamp(root: Path | None = CHECKOUT) -> dict[str, Any]:
    """The code as it is now: ``git rev-parse HEAD`` of the checkout ``root`` holding effsam,
    "+dirty" when ``git status --porcelain`` lists changes under src/, configs/ or
    benchmarks/ (the results under benchmarks/results/ excluded: writing them must not make
    the next run dirty); without a checkout (an installed effsam) its version. Always a
    digest of the package (which tells two dirty trees apart) and the torch version."""
    import torch

    from . import __version__

    commit = (_git("rev-parse", "HEAD", root=root) or "").strip() or None
    status = _git(
        "status", "--porcelain", "--", "src", "configs", "benchmarks",
        ":(exclude)benchmarks/results", root=root,
    )  # fmt: skip
    dirty = bool(status and status.strip())
    if commit is None:
        text = f"effsam {__version__}" if root is None else "commit unknown"
    else:
        text = commit[:12] + ("+dirty" if dirty else "")
    src = src_digest()
    return {
        "commit": commit,
        "dirty": dirty,
        "text": text,
        "src": src,
        "torch": torch.__version__,
        "key": f"{src}|torch {torch.__version__}",  # what the stale checks are cached under
    }
