"""FSDP on 2 CPU processes (gloo), float64: FSDP2 (``fully_shard``) equals the unsharded
run on the concatenated batch (FSDP averages both passes' gradients over ranks, so ε is
the global one, from the global norm); torch.distributed.checkpoint keeps effsam's state;
FSDP1 is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import effsam
from integrations import _fsdp_workers as W
from scale._dist import run_workers

WORLD = 2

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

CASES = [
    ("sam", "closure"),
    ("sam", "sharpness_aware_step"),
    ("asam", "closure"),
    ("esam_swp", "sharpness_aware_step"),
    ("ssam_d", "sharpness_aware_step"),
    ("ssam_f", "sharpness_aware_step"),
]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    run_workers(W.suite, str(out), CASES, world_size=WORLD, timeout=240)
    return torch.load(Path(out) / "fsdp.pt", weights_only=False)


def _reference(kind: str) -> list[list[torch.Tensor]]:
    model = W.net()
    opt = W.make_opt(kind, model.parameters())
    log = []
    for step in range(W.STEPS):
        xs, ys = zip(*(W.batch(step, r) for r in range(WORLD)))
        effsam.sharpness_aware_step(model, opt, (torch.cat(xs), torch.cat(ys)), W.per_sample)
        log.append([p.detach().clone() for p in model.parameters()])
    return log


@pytest.mark.parametrize("kind, drive", [c for c in CASES if c[0] != "ssam_f"])
def test_fsdp2_equals_the_unsharded_run(fsdp, kind, drive):
    got = fsdp[f"{kind}/{drive}"]
    assert not isinstance(got, str), got
    ref = _reference(kind)
    for step, (g, r) in enumerate(zip(got, ref)):
        for i, (a, b) in enumerate(zip(g, r)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"step {step} tensor {i}")


def test_fsdp2_ssam_f_is_refused(fsdp):
    got = fsdp["ssam_f/sharpness_aware_step"]
    assert isinstance(got, str) and got.startswith("NotImplementedError"), got
    assert "SSAM-F under FSDP2 is not supported" in got


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_is_refused_with_a_clear_message(fsdp, use_orig_params):
    got = fsdp["fsdp1"][use_orig_params]
    assert got.startswith("RuntimeError") and "FSDP1" in got and "fully_shard" in got, got


def test_distributed_checkpoint_keeps_effsams_state_under_fsdp2(fsdp):
    got = fsdp["dcp"]
    assert not isinstance(got, str), got
    assert got["has_entry"] and got["steps"] == (3, 3)
    for a, b in zip(*got["weights"]):
        assert torch.equal(a, b)
