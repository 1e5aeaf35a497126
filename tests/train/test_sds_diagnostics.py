"""ESAM's selection diagnostics: they change nothing in training, and they measure what they
say (selected samples sharper than the rest, coverage counts that add up)."""

from __future__ import annotations

import json

import torch

from effsam.analysis.sds import SDSDiagnostics
from effsam.train.loop import train
from effsam.train.records import read_metrics
from helpers import per_sample_ce, tiny_bn_net, tiny_data
from train.tiny_runs import tiny_config, without_timing


def _run(tmp_path, name, diagnostics):
    cfg = tiny_config(
        tmp_path / name,
        optim__name="esam",
        optim__args={"rho": 0.1, "beta": 0.6, "gamma": 0.5},
        train__sds_diagnostics=diagnostics,
    )
    train(cfg, run_dir=tmp_path / name, quiet=True)
    ckpt = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
    return read_metrics(tmp_path / name), ckpt["model"]


def test_training_is_identical_with_and_without_the_diagnostics(tmp_path):
    plain, w_plain = _run(tmp_path, "plain", 0)
    diag, w_diag = _run(tmp_path, "diag", 2)
    assert without_timing(plain) == without_timing(diag)
    for k, v in w_plain.items():
        assert torch.equal(v, w_diag[k]), k
    lines = (tmp_path / "diag" / "sds_diagnostics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    # 96 samples, batches of 16 -> 6 steps of k = 8 selected: 48 selections per epoch
    for r in recs:
        assert r["samples_seen"] == 96
        assert sum(i * n for i, n in enumerate(r["selection_histogram"])) == 48
        assert r["probes"] == 3
    assert (tmp_path / "diag" / "sds_diagnostics.png").stat().st_size > 10_000
    assert not (tmp_path / "plain" / "sds_diagnostics.jsonl").exists()


def test_probe_selects_the_sharpest_samples():
    model = tiny_bn_net()
    diag = SDSDiagnostics(num_train=12, gamma=0.5, rho=0.5, every=1)
    batch = tiny_data(seed=4, n=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diag.probe(model, batch, per_sample_ce)
    for k, v in model.state_dict().items():  # the probe ran on a copy
        assert torch.equal(v, before[k]), k
    rec = diag.end_epoch()
    rise_top = rec["loss_top_perturbed"] - rec["loss_top_theta"]
    rise_rest = rec["loss_rest_perturbed"] - rec["loss_rest_theta"]
    assert rise_top > rise_rest  # B+ is by definition the half whose loss rose most
    for key in ("cos_top", "cos_rest", "cos_random"):
        assert -1.0 <= rec[key] <= 1.0


def test_coverage_counts_and_the_misclassified_share():
    diag = SDSDiagnostics(num_train=6, gamma=0.5, rho=0.1, every=1)
    diag.record(torch.tensor([0, 1, 2]), torch.tensor([0]), torch.tensor([True, False, True]))
    diag.record(torch.tensor([3, 4, 5]), torch.tensor([1, 2]), torch.tensor([False, False, True]))
    rec = diag.end_epoch()
    # selected: 0, 4, 5; never selected: 1, 2, 3 (of which 1 and 3 misclassified)
    assert rec["never_selected"] == 0.5 and rec["never_selected_so_far"] == 0.5
    assert rec["misclassified_never_selected"] == 2 / 3
    assert rec["misclassified_all"] == 3 / 6
    assert rec["selection_histogram"] == [3, 3]


def test_coverage_over_the_run_accumulates_across_epochs():
    diag = SDSDiagnostics(num_train=4, gamma=0.5, rho=0.1, every=1)
    ids = torch.arange(4)
    diag.record(ids, torch.tensor([0, 1]), torch.ones(4, dtype=torch.bool))
    assert diag.end_epoch()["never_selected_so_far"] == 0.5
    diag.record(ids, torch.tensor([1, 2]), torch.ones(4, dtype=torch.bool))
    rec = diag.end_epoch()
    assert rec["never_selected"] == 0.5  # this epoch: 0 and 3
    assert rec["never_selected_so_far"] == 0.25  # over both: only 3
