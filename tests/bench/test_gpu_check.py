"""The GPU check runs its CPU smoke mode end to end, can fail, and refuses a missing GPU."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effsam.optim.registry import available_optimizers

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\S+?)/(\S+?): ?(.*)$")


def _module(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", mod)  # its dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


def _checks(stdout: str) -> list[tuple[str, str, str, str]]:
    return [m.groups() for m in map(LINE.match, stdout.splitlines()) if m]


def test_smoke_passes_and_writes_results(tmp_path):
    proc = _run("--device", "cpu", "--smoke", "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = _checks(proc.stdout)
    for status, group, name, detail in checks:
        assert status in ("PASS", "SKIP"), f"{group}/{name}: {status} {detail}"
        if status == "SKIP":
            assert detail.strip(), f"{group}/{name} skipped without a reason"
    seen = {(g, n) for _, g, n, _ in checks}
    # every registered optimizer is compared in float32; every group reported
    assert {("fp32", n) for n in available_optimizers()} <= seen
    for g, n in [
        ("fp16", "sam"),
        ("fp16", "esam"),
        ("fp16", "sam-overflow-pass1"),
        ("fp16", "esam-overflow-pass2"),
        ("bf16", "sam"),
        ("bf16", "esam"),
        ("compile", "sam"),
        ("compile", "esam"),
        ("ddp", "sam"),
        ("ddp", "esam"),
        ("memory", "sam"),
        ("memory", "esam"),
        ("throughput", "resnet18"),
    ]:
        assert (g, n) in seen, f"no {g}/{n} line"
    # every comparison line states the measured difference and the tolerance
    assert all(
        re.match(r"diff \S+ \(tol \S+\)", d)
        for s, g, _, d in checks
        if s == "PASS" and g != "throughput"
    )

    (md,) = tmp_path.glob("gpu-check-*-smoke.md")
    (js,) = tmp_path.glob("gpu-check-*-smoke.json")
    assert md.stem == js.stem and f"-torch{torch.__version__.split('+')[0]}-" in md.stem
    data = json.loads(js.read_text())
    text = md.read_text()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert data["commit"] == (head or "unknown")
    assert data["device"] == "cpu" and data["device_name"]
    assert data["device_name"] in text and data["commit"] in text
    assert data["command"].startswith("python benchmarks/gpu_check.py --device cpu --smoke")
    assert data["date"] and data["passed"] is True
    assert [c["status"] for c in data["checks"]] == [s for s, *_ in checks]
    for name in ("sgd", "sam", "esam"):
        assert name in {r["optimizer"] for r in data["memory"]}
        assert name in {r["variant"] for r in data["throughput"]}
        assert sum(line.startswith(f"| {name} |") for line in text.splitlines()) == 2
    speeds = {r["variant"]: r for r in data["throughput"]}
    assert speeds["sam"]["vs_sam"] == 1.0
    assert speeds["esam"]["paper_vs_sam"] == 1.40
    assert all(r["vs_sam"] > 0 for r in data["throughput"])


def test_a_perturbed_reference_fails(tmp_path):
    proc = _run(
        "--device", "cpu", "--smoke", "--only", "fp32", "--perturb-reference", "1",
        "--out", str(tmp_path), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    checks = _checks(proc.stdout)
    assert checks and {s for s, *_ in checks} <= {"FAIL", "SKIP"}
    assert sum(s == "FAIL" for s, *_ in checks) >= len(available_optimizers()) - 1
    (js,) = tmp_path.glob("gpu-check-*.json")
    assert json.loads(js.read_text())["passed"] is False


def test_a_zero_tolerance_fails(tmp_path, monkeypatch, capsys):
    mod = _module(monkeypatch)
    monkeypatch.setitem(mod.TOLERANCES, "bf16", 0.0)
    code = mod.main(["--device", "cpu", "--smoke", "--only", "bf16", "--out", str(tmp_path)])
    statuses = [s for s, *_ in _checks(capsys.readouterr().out)]
    if set(statuses) == {"SKIP"}:
        pytest.skip("no bf16 autocast on this CPU")
    assert code == 1 and statuses == ["FAIL"] * 3  # sgd, sam, esam


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_exits_2(tmp_path):
    proc = _run("--device", "cuda", "--out", str(tmp_path))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err
    assert "CUDA is not available" in err
    assert not list(tmp_path.iterdir())
