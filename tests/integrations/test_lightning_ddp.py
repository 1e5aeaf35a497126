"""Lightning automatic optimisation under DDP, 2 CPU processes (gloo): each closure call is
a synchronised forward+backward, so ε is the global one: equal to one process on the
concatenated batch (what sharpness_aware_step(sync_ascent=True) does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import effsam
from integrations import _lightning_workers as W
from scale._dist import run_workers

pytest.importorskip("lightning.pytorch")
WORLD = 2


@pytest.mark.slow
def test_automatic_ddp_equals_one_process_on_the_concatenated_batch(tmp_path: Path):
    run_workers(W.ddp_automatic, str(tmp_path), world_size=WORLD, timeout=240)
    got = torch.load(tmp_path / "lightning_ddp.pt", weights_only=False)
    model = W.mlp()
    opt = W.make_opt(model.parameters())
    for step in range(W.STEPS):
        xs, ys = zip(*(W.batch(step, r) for r in range(WORLD)))
        effsam.sharpness_aware_step(
            model, opt, (torch.cat(xs), torch.cat(ys)),
            lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
        )  # fmt: skip
    for a, b in zip(got["weights"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-12)
    assert got["warned"] and got["global_step"] == W.STEPS
