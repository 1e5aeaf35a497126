"""accelerate on 2 CPU processes (gloo): effsam.integrations.accelerate.sharpness_aware_step
on the prepared (DDP) model, with sync_ascent=True, equals one process on the
concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import effsam
from integrations import _accelerate_workers as W
from scale._dist import run_workers

pytest.importorskip("accelerate")
WORLD = 2


@pytest.mark.slow
def test_accelerate_ddp_with_sync_ascent_equals_one_process(tmp_path: Path):
    run_workers(W.accelerate_ddp, str(tmp_path), world_size=WORLD, timeout=240)
    got = torch.load(tmp_path / "accelerate_ddp.pt", weights_only=False)
    assert got["world"] == WORLD and got["ddp"] == "DistributedDataParallel"
    model = W.mlp()
    opt = W.make_opt(model.parameters())
    for step in range(W.STEPS):
        xs, ys = zip(*(W.batch(step, r) for r in range(WORLD)))
        effsam.sharpness_aware_step(model, opt, (torch.cat(xs), torch.cat(ys)), W.per_sample)
    for a, b in zip(got["weights"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-12)
