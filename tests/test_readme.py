"""The README's API snippet runs exactly as written (it defines its own tiny model and data)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import effsam

README = Path(__file__).resolve().parents[1] / "README.md"


def api_snippet() -> str:
    """The first Python block of the README's "The API" section, verbatim."""
    text = README.read_text()
    section = text[text.index("## The API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md has no Python block under '## The API'"
    return match.group(1)


def test_the_api_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves opt.pt
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    exec(compile(api_snippet(), str(README), "exec"), namespace)
    assert isinstance(namespace["result"], effsam.StepResult)
    assert namespace["result"].selected == 16  # ESAM's gamma 0.5 of a batch of 32
    assert torch.isfinite(namespace["loss"])
    assert namespace["step"].ascent_samples == 8  # the slice: a quarter of 32
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = effsam.create_optimizer(
        namespace["model"], "ssam-f", lr=0.05, momentum=0.9, rho=0.1, sparsity=0.5
    )
    fresh.load_state_dict(saved)  # the saved state restores into a fresh optimizer
    assert fresh.state_dict()["effsam"].keys() == saved["effsam"].keys()
