"""SharpnessAwareTrainer on 2 CPU processes (gloo): both passes are all-reduced, so ε is
the global one: equal to one process on the concatenated batches (sync_ascent=True)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import effsam
from integrations import _hf_workers as W
from scale._dist import run_workers

pytest.importorskip("transformers")
WORLD = 2


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_ddp_equals_one_process_on_the_concatenated_batch(tmp_path: Path, accumulation):
    run_workers(W.trainer_ddp, str(tmp_path), accumulation, world_size=WORLD, timeout=300)
    got = torch.load(tmp_path / "hf_ddp.pt", weights_only=False)
    assert got["world"] == WORLD and got["steps"] == W.STEPS
    model = W.Tiny()
    opt = W.make_opt(model.parameters())
    data = [W.rows(r) for r in range(WORLD)]
    per_step = W.B * accumulation
    for step in range(W.STEPS):
        rows = []
        for micro in range(accumulation):  # micro-batch i of every rank, as DDP averages
            for r in range(WORLD):
                start = step * per_step + micro * W.B
                rows += data[r][start : start + W.B]
        batch = {k: torch.stack([row[k] for row in rows]) for k in ("x", "labels")}
        effsam.sharpness_aware_step(
            model, opt, batch,
            lambda m, b: F.cross_entropy(m.net(b["x"]), b["labels"], reduction="none"),
            accumulation_steps=accumulation,
        )  # fmt: skip
    for a, b in zip(got["weights"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-12)
