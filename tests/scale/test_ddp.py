"""sharpness_aware_step under DistributedDataParallel: 2 CPU processes (gloo) with a hard
timeout. Expectations are computed here, without DDP.

The default-run scenarios share one spawn (the ``suite`` fixture); each test checks one
scenario's records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import effsam
from effsam.optim._random import stream_seed
from scale import _workers
from scale._common import (
    LR,
    MOMENTUM,
    RHO,
    SGDMomentum,
    add,
    ascent,
    assert_close,
    cat,
    ce,
    grad,
    max_diff,
    mean,
    mlp,
    per_sample_loss,
    sub,
    weights_of,
)
from scale._dist import run_workers
from scale._workers import BATCH, local_batch

WORLD = 2


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_suite")
    run_workers(_workers.suite, str(out), world_size=WORLD, timeout=150)
    return out


def _load(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _m_sharpness_reference(steps: list[int]) -> tuple[list, list]:
    """By hand: each rank ascends with its own gradient, pass 2 is averaged over ranks.
    Returns per-step (ε per rank, weights after)."""
    model = mlp(0)
    w = weights_of(model)
    opt = SGDMomentum()
    eps_log, w_log = [], []
    for step in steps:
        batches = [local_batch(step, r) for r in range(WORLD)]
        eps = [ascent(grad(model, w, b), RHO) for b in batches]
        g2 = mean([grad(model, add(w, e), b) for e, b in zip(eps, batches)])
        w = opt.step(w, g2)
        eps_log.append(eps)
        w_log.append(w)
    return eps_log, w_log


def _global_reference(steps: int) -> tuple[list, list]:
    """By hand: one ε from the gradient of the concatenated batch (sync_ascent)."""
    model = mlp(0)
    w = weights_of(model)
    opt = SGDMomentum()
    eps_log, w_log = [], []
    for step in range(steps):
        batch = cat([local_batch(step, r) for r in range(WORLD)])
        eps = ascent(grad(model, w, batch), RHO)
        w = opt.step(w, grad(model, add(w, eps), batch))
        eps_log.append(eps)
        w_log.append(w)
    return eps_log, w_log


def _one_process_run(steps: int) -> list:
    """The library itself in this process on the concatenated batch."""
    model = mlp(0)
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), rho=RHO)
    out = []
    for step in range(steps):
        batch = cat([local_batch(step, r) for r in range(WORLD)])
        effsam.sharpness_aware_step(model, opt, batch, ce)
        out.append(weights_of(model))
    return out


def test_m_sharpness_by_default_and_sync_ascent_matches_one_process(suite: Path) -> None:
    steps = _workers.SUITE_STEPS["sam_modes"]
    ranks = _load(suite / "sam_modes")

    # Default (m-sharpness): each rank's ε is its own local gradient's, so they differ.
    local = [r["local"] for r in ranks]
    ref_eps, ref_w = _m_sharpness_reference(list(range(steps)))
    for step in range(steps):
        e0, e1 = local[0]["eps"][step], local[1]["eps"][step]
        assert max_diff(e0, e1) > 1e-3, "ranks ascended with the same ε (pass 1 was synced)"
        for r in range(WORLD):
            assert_close(local[r]["eps"][step], ref_eps[step][r])
        # Pass 2 is all-reduced: both ranks apply the same update, bit for bit.
        for n, t in local[0]["weights"][step].items():
            assert torch.equal(t, local[1]["weights"][step][n]), n
        assert_close(local[0]["weights"][step], ref_w[step])

    # sync_ascent (with and without accumulation): one global ε, and the 2-process run is
    # the 1-process run on the concatenated batch.
    glob_eps, glob_w = _global_reference(steps)
    lib_w = _one_process_run(steps)
    for mode in ("sync", "sync_accum"):
        runs = [r[mode] for r in ranks]
        for step in range(steps):
            assert_close(runs[0]["eps"][step], runs[1]["eps"][step], atol=1e-15)
            assert_close(runs[0]["eps"][step], glob_eps[step])
            for r in range(WORLD):
                assert_close(runs[r]["weights"][step], glob_w[step])
                assert_close(runs[r]["weights"][step], lib_w[step])


def test_reduced_batch_ascent_slices_each_ranks_batch(suite: Path) -> None:
    """ascent_fraction 1/2 under DDP: each rank ascends with the gradient of its own slice
    (the same seeded positions on every rank), pass 2 on the whole local batches,
    all-reduced."""
    steps = _workers.SUITE_STEPS["sam_modes"]
    ranks = [r["slice"] for r in _load(suite / "sam_modes")]
    model = mlp(0)
    w = weights_of(model)
    opt = SGDMomentum()
    gen = torch.Generator().manual_seed(stream_seed(11, "ascent-slice"))
    for step in range(steps):
        idx = torch.randperm(BATCH, generator=gen)[: BATCH // 2].sort().values
        batches = [local_batch(step, r) for r in range(WORLD)]
        eps = [ascent(grad(model, w, sub(b, idx)), RHO) for b in batches]
        g2 = mean([grad(model, add(w, e), b) for e, b in zip(eps, batches)])
        w = opt.step(w, g2)
        for r in range(WORLD):
            assert_close(ranks[r]["eps"][step], eps[r])
            assert_close(ranks[r]["weights"][step], w)


def test_esam_swp_masks_agree_sds_per_rank_without_unused_parameter_search(
    suite: Path,
) -> None:
    """find_unused_parameters=False + SWP must neither hang nor error; masks agree across
    ranks; SDS picks the top-k of each rank's own batch; the update is the by-hand one."""
    steps = _workers.SUITE_STEPS["esam_swp_sds"]
    ranks = _load(suite / "esam_swp_sds")
    logs = [r["log"] for r in ranks]
    assert torch.equal(ranks[0]["generator"], ranks[1]["generator"])

    model = mlp(0)
    w = weights_of(model)
    opt = SGDMomentum()
    k = round(0.5 * BATCH)
    dropped_somewhere = False
    for step in range(steps):
        mask = logs[0][step]["mask"]
        assert logs[1][step]["mask"] == mask, f"step {step}: SWP masks differ across ranks"
        dropped_somewhere |= not all(mask)
        g2s = []
        for r in range(WORLD):
            entry, batch = logs[r][step], local_batch(step, r)
            assert_close(entry["w0"], w)
            eps = ascent(grad(model, w, batch), RHO, keep=mask, beta=0.5)
            before = per_sample_loss(model, w, batch)
            after = per_sample_loss(model, add(w, eps), batch)
            torch.testing.assert_close(entry["before"], before, atol=1e-12, rtol=0)
            torch.testing.assert_close(entry["after"], after, atol=1e-12, rtol=0)
            chosen = torch.topk(after - before, k).indices.sort().values
            assert torch.equal(entry["pass2_idx"], batch["idx"][chosen]), (step, r)
            assert entry["selected"] == k
            g2s.append(grad(model, add(w, eps), sub(batch, chosen)))
        w = opt.step(w, mean(g2s))
        for n, t in logs[0][step]["weights"].items():
            assert torch.equal(t, logs[1][step]["weights"][n]), (step, n)
        assert_close(logs[0][step]["weights"], w)
    assert dropped_somewhere, "SWP never dropped a tensor: the test exercised nothing"


def test_own_loop_recipe_from_the_docs(suite: Path) -> None:
    """no_sync around pass 1's forward AND backward gives m-sharpness; around the
    backward alone it does not (DDP decides in forward), so ε is the same on all ranks."""
    steps = _workers.SUITE_STEPS["own_loop"]
    ranks = _load(suite / "own_loop")
    ref_eps, ref_w = _m_sharpness_reference(list(range(steps)))
    glob_eps, _ = _global_reference(1)
    for r in range(WORLD):
        docs = ranks[r]["docs"]
        for step in range(steps):
            assert_close(docs["eps"][step], ref_eps[step][r])
            assert_close(docs["weights"][step], ref_w[step])
        wrong = ranks[r]["backward_only"]
        assert_close(wrong["eps"][0], glob_eps[0])  # pass 1 was all-reduced after all


def test_sync_ascent_when_a_rank_has_no_gradient_for_a_tensor(suite: Path) -> None:
    ranks = _load(suite / "sync_ascent_missing_grad")
    model = mlp(0)
    w = weights_of(model)
    g0 = grad(model, w, local_batch(0, 0))
    g1 = grad(model, w, local_batch(0, 1))
    g1["4.bias"] = torch.zeros_like(g1["4.bias"])  # rank 1's pass 1 did not reach it
    want = ascent(mean([g0, g1]), RHO)
    for r in range(WORLD):
        assert_close(ranks[r]["eps"], want)
    for n, t in ranks[0]["weights"].items():
        assert torch.equal(t, ranks[1]["weights"][n]), n


def test_mismatched_settings_raise_on_every_rank(suite: Path) -> None:
    for r, msgs in enumerate(_load(suite / "mismatched_settings")):
        gamma, seed = msgs["gamma"], msgs["seed"]
        assert gamma is not None and seed is not None, f"rank {r} did not raise"
        assert "selection" in gamma and "gamma=0.5" in gamma and "gamma=0.7" in gamma
        assert "mask" in seed and "seed=0" in seed and "seed=1" in seed
        assert msgs["gamma_weights_changed"] == "False"
        assert msgs["seed_weights_changed"] == "False"
        generator = msgs["generator"]
        assert generator is not None, f"rank {r} did not raise on a diverged mask generator"
        assert "mask generator state" in generator
        assert msgs["generator_weights_changed"] == "False"


def test_overflow_on_one_rank_skips_the_step_on_every_rank(suite: Path) -> None:
    """Under m-sharpness only the overflowing rank sees its pass-1 inf; the others must
    skip too (no hang, no divergence), and every scaler backs off the same way."""
    ranks = _load(suite / "amp_overflow_one_rank")
    _, ref_w = _m_sharpness_reference([0, 3])
    for r, data in enumerate(ranks):
        log = data["log"]
        assert [e["skipped"] for e in log] == [False, True, True, False], r
        assert [e["scale"] for e in log] == [2.0**10, 2.0**9, 2.0**8, 2.0**8], r
        assert data["steps"] == 2 and data["skipped_steps"] == 2, r
        for step in (1, 2):
            for n, t in log[step]["weights"].items():
                assert torch.equal(t, log[0]["weights"][n]), (r, step, n)
        assert_close(log[0]["weights"], ref_w[0])
        assert_close(log[3]["weights"], ref_w[1])
        for n, t in log[3]["weights"].items():
            assert torch.equal(t, ranks[0]["log"][3]["weights"][n]), (r, n)


@pytest.mark.slow
def test_esam_bn_accumulation_clipping_scaler_under_ddp_options(tmp_path: Path) -> None:
    """Ranks stay identical; gradient_as_bucket_view and find_unused_parameters do not
    change the result; static_graph is refused with a clear error on every rank."""
    steps = 4
    run_workers(_workers.everything_with_bn, str(tmp_path), steps, world_size=WORLD, timeout=240)
    ranks = _load(tmp_path)
    for sync in (False, True):
        ref = ranks[0][("default", sync)]["weights"]
        for name in ("default", "bucket_view", "find_unused"):
            a, b = ranks[0][(name, sync)], ranks[1][(name, sync)]
            for n, t in a["weights"].items():
                assert torch.isfinite(t).all()
                assert torch.equal(t, b["weights"][n]), (name, sync, n)
            assert_close(a["weights"], ref, atol=1e-14)
            # Two micro-batches of 6, γ = 0.5: k = 3 in each.
            assert a["selected"] == b["selected"] == [6] * steps
    for r in range(WORLD):
        assert "static_graph" in (ranks[r]["static_graph"] or ""), r


def test_schedules_decide_alike_on_every_rank_and_plain_steps_are_all_reduced(
    suite: Path,
) -> None:
    """sam-interval and AE-SAM under DDP, against the by-hand run: a plain step is SGD on
    the gradient of both ranks' batches; a sharpness-aware one is m-sharpness; AE-SAM
    decides from the mean over ranks of the local ‖g‖² (its recurrence written out, with
    λ1 = λ2 = 3 so that both branches occur within a few steps)."""
    steps = _workers.SUITE_STEPS["schedules"]
    ranks = _load(suite / "schedules")
    for name in ("sam-interval", "ae-sam"):
        model = mlp(0)
        w = weights_of(model)
        opt = SGDMomentum()
        mu = var = 0.0
        expected = []
        for step in range(steps):
            batches = [local_batch(step, r) for r in range(WORLD)]
            local = [grad(model, w, b) for b in batches]
            if name == "sam-interval":
                aware = (step + 1) % 2 == 0
            else:
                x = sum(float(sum((g**2).sum() for g in lg.values())) for lg in local) / WORLD
                mu = 0.9 * mu + 0.1 * x
                var = 0.9 * var + 0.1 * (x - mu) ** 2
                aware = x >= mu + 3.0 * var**0.5  # λ1 = λ2 = 3
            if aware:
                eps = [ascent(g, RHO) for g in local]
                g2 = mean([grad(model, add(w, e), b) for e, b in zip(eps, batches)])
            else:
                g2 = mean(local)
            w = opt.step(w, g2)
            expected.append(aware)
            for r in range(WORLD):
                assert ranks[r][name]["decisions"][step] == aware, (name, step, r)
                assert_close(ranks[r][name]["weights"][step], w)
        assert any(expected) and not all(expected), name  # both branches were exercised
