"""The accuracy benchmark's smoke mode drives `effsam compare` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_accuracy_smoke_writes_table_and_verdicts(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "accuracy.py"),
            "--smoke",
            "--threads",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (json_file,) = (tmp_path / "out").glob("accuracy-smoke-*.json")
    data = json.loads(json_file.read_text())
    assert [r["optimizer"] for r in data["rows"]] == ["sgd", "sam", "esam"]
    assert all(r["seeds"] == 2 for r in data["rows"])
    assert len(data["runs"]) == 6
    assert data["verdicts"][0].startswith("SAM over SGD")
    md = json_file.with_suffix(".md").read_text()
    assert "| ESAM |" in md and "## Verdicts" in md
