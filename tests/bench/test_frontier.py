"""The frontier benchmark: the rule, the share of SAM's gain, the targets, the stamps and the
stale-run check on fake run records; one smoke run (synthetic data) and one digits replay."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from effsam.frontier import runs as frontier_runs

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


# ----------------------------------------------------------------------------- fake runs


def _run(label, name, seed, acc, epochs=30, sa=1.0, time_s=100.0):
    return {
        "label": label,
        "optimizer": name,
        "epochs": epochs,
        "seed": seed,
        "final_test_acc": acc,
        "final_train_acc": 1.0,
        "train_time_s": time_s,
        "images_per_s": 1000.0,
        "sharpness_aware_fraction": sa,
        "threads": 1,
        "finished": True,
    }


def _runs(methods: dict[str, tuple[str, list[float]]], **kw) -> list[dict]:
    """{optimizer: (label, accuracies by seed 0, 1, ...)} -> run summaries."""
    return [
        _run(label, name, seed, acc, **kw)
        for name, (label, accs) in methods.items()
        for seed, acc in enumerate(accs)
    ]


SGD5 = [0.45, 0.46, 0.44, 0.45, 0.47]
SAM5 = [0.53, 0.54, 0.52, 0.53, 0.55]  # SAM's gain: 8 points on every seed


def _keeping(share: float, seeds: int = 5) -> list[float]:
    """Accuracies that keep ``share`` of SAM's gain on every seed."""
    return [g + share * (s - g) for g, s in zip(SGD5[:seeds], SAM5[:seeds])]


#: Side-by-side speeds: an SGD step costs half a SAM step.
THROUGHPUT = {
    "rows": [
        {"variant": "sgd", "step_ms": 50.0, "vs_sam": 2.0},
        {"variant": "sam", "step_ms": 100.0, "vs_sam": 1.0},
    ]
}


def _rows(fr, methods, order=None):
    return fr.rows_of(_runs(methods), order)


# ----------------------------------------------------------------------------- share of gain


def test_share_of_gain_and_its_90_percent_t_interval():
    fr = _module()
    rows = _rows(
        fr,
        {
            "sgd": ("SGD", [0.50, 0.50, 0.50]),
            "sam": ("SAM", [0.60, 0.60, 0.60]),
            "rst": ("RST", [0.60, 0.55, 0.58]),  # shares 1.0, 0.5, 0.8
        },
    )
    sgd, sam, rst = rows
    share = fr.share_of_gain(rst, sgd, sam)
    assert [round(share["by_seed"][s], 6) for s in (0, 1, 2)] == [1.0, 0.5, 0.8]
    # mean 0.7667, sd 0.2517, t_{0.95,2} = 2.919986 -> half-width 2.919986 * 0.2517 / sqrt(3)
    assert share["n"] == 3
    assert share["mean"] == pytest.approx(0.766667, abs=1e-6)
    assert share["sd"] == pytest.approx(0.251661, abs=1e-6)
    assert share["half"] == pytest.approx(0.424264, abs=1e-5)
    assert (share["lo"], share["hi"]) == pytest.approx((0.342403, 1.190931), abs=1e-5)
    # a seed where SAM does not beat SGD has no share: left out of the mean and interval
    sam["by_seed"][1] = 0.49
    share = fr.share_of_gain(rst, sgd, sam)
    assert share["by_seed"][1] is None and share["n"] == 2
    assert share["mean"] == pytest.approx(0.9)


def test_t_quantiles_from_scipy_or_the_written_out_table(monkeypatch):
    fr = _module()
    assert fr.t95(2) == pytest.approx(2.919986, abs=1e-6)
    assert fr.t95(4) == pytest.approx(2.131847, abs=1e-6)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # as if scipy were not installed
    assert fr.t95(1) == 6.313752 and fr.t95(2) == 2.919986 and fr.t95(30) == 1.697261
    assert fr.t95(45) == 1.697261  # beyond the table: df 30's (wider than the exact one)
    assert fr.t_interval([1.0, 0.5, 0.8])["half"] == pytest.approx(0.424264, abs=1e-5)


# ----------------------------------------------------------------------------- the rule


def test_noisy_keeps_on_mean_share_of_sams_gain_with_five_seeds():
    fr = _module()
    rows = _rows(
        fr,
        {
            "sgd": ("SGD", SGD5),
            "sam": ("SAM", SAM5),
            "rst": ("RST", _keeping(0.91)),
            "ae-sam": ("AE-SAM", _keeping(0.89)),
            "ksam": ("K-SAM", _keeping(0.95, seeds=3)),  # claims it on 3 seeds: undecided
            "msam": ("MSAM", _keeping(0.20, seeds=3)),  # fails on 3 seeds: decided
        },
    )
    v = fr.protocol_verdicts("noisy", rows)
    assert v["rst"]["status"] == "keeps" and v["rst"]["share"]["mean"] == pytest.approx(0.91)
    assert v["ae-sam"]["status"] == "does not keep"
    assert v["ksam"]["status"] == "undecided" and v["ksam"]["reason"] == "3 seeds of 5"
    assert v["ksam"]["provisional"] is True  # it claims SAM's accuracy: it gets more seeds
    assert v["msam"]["status"] == "does not keep"
    # with SAM on 3 seeds nothing is decided
    few = fr.rows_of([r for r in _runs({"sam": ("SAM", SAM5)}) if r["seed"] < 3])
    rows = [r for r in rows if r["optimizer"] != "sam"] + few
    v = fr.protocol_verdicts("noisy", rows)
    assert {x["status"] for x in v.values()} == {"undecided"}
    assert v["rst"]["reason"] == "SAM 3 seeds of 5"


def test_frontier_and_augment_keep_on_sams_seed_std_paired_by_seed():
    fr = _module()
    rows = _rows(
        fr,
        {
            "sgd": ("SGD", SGD5),
            "sam": ("SAM", SAM5),  # seed std 1.14 points
            "rst": ("RST", [a - 0.005 for a in SAM5[:4]] + [SAM5[4] + 0.002]),
            # within the std on the mean, but below SAM on every seed
            "msam": ("MSAM", [a - 0.001 for a in SAM5]),
        },
    )
    for protocol in ("frontier", "augment"):
        v = fr.protocol_verdicts(protocol, rows)
        assert v["rst"]["status"] == "keeps", protocol
        assert v["rst"]["rule"] == "std"
        assert v["msam"]["status"] == "does not keep", protocol
    assert fr.keeps_sam_accuracy(rows[2], rows[1]) and not fr.keeps_sam_accuracy(rows[3], rows[1])


def _verdict(fr, protocol, status_share: float | None, seeds: int = 5):
    """One protocol's verdicts for RST keeping ``status_share`` of SAM's gain (None: not run)."""
    methods = {"sgd": ("SGD", SGD5), "sam": ("SAM", SAM5)}
    if status_share is not None:
        methods["rst"] = ("RST", _keeping(status_share, seeds))
    return fr.protocol_verdicts(protocol, _rows(fr, methods))


def test_keeps_sams_accuracy_only_on_all_three_protocols():
    fr = _module()
    members = {p: ["sgd", "sam", "rst"] for p in fr.ALL}
    every = {p: _verdict(fr, p, 1.0) for p in fr.ALL}
    assert fr.overall_verdicts(every, members)["rst"]["status"] == "keeps"
    # keeps it on 2 of 3: does NOT keep it
    two = {**every, "augment": _verdict(fr, "augment", 0.0)}
    o = fr.overall_verdicts(two, members)["rst"]
    assert o["status"] == "does not keep" and o["reason"] == "not on augment"
    # missing from one protocol: undecided, never keeps
    missing = {**every, "noisy": _verdict(fr, "noisy", None)}
    o = fr.overall_verdicts(missing, members)["rst"]
    assert o["status"] == "undecided" and o["reason"] == "not run on noisy"
    o = fr.overall_verdicts(missing, {**members, "noisy": ["sgd", "sam"]})["rst"]
    assert o["reason"] == "not in noisy"
    # 3 seeds where 5 are needed on one protocol: undecided
    short = {**every, "frontier": _verdict(fr, "frontier", 1.0, seeds=3)}
    o = fr.overall_verdicts(short, members)["rst"]
    assert o["status"] == "undecided" and o["reason"] == "frontier: 3 seeds of 5"
    # noisy share 0.89 fails, 0.91 passes
    for share, status in ((0.89, "does not keep"), (0.91, "keeps")):
        case = {**every, "noisy": _verdict(fr, "noisy", share)}
        assert fr.overall_verdicts(case, members)["rst"]["status"] == status, share


def test_the_rule_as_stated_names_each_protocol_its_criterion_and_a_shared_reason_once():
    from effsam.frontier.rule import rule_text

    rules = {"noisy": "share", "frontier": "std", "augment": "std"}
    notes = {
        "noisy": "SAM's gain ~8 points",
        "frontier": "SAM's gain ~1 point",
        "augment": "SAM's gain ~1 point",
    }
    text = rule_text(5, 3, rules, notes)
    assert any("all 3 protocols (noisy, frontier, augment)" in x for x in text)
    share = next(x for x in text if "mean share of SAM's gain is >= 0.90" in x)
    assert share.startswith("On noisy (SAM's gain ~8 points) ")
    std = next(x for x in text if "within SAM's seed std" in x)
    assert std.startswith("On frontier and augment (SAM's gain ~1 point) "), std
    # two reasons that differ are both given
    text = rule_text(5, 3, rules, {**notes, "augment": "150 epochs"})
    std = next(x for x in text if "within SAM's seed std" in x)
    assert "(SAM's gain ~1 point; 150 epochs)" in std, std
    assert any("5 for SGD and SAM" in x and "3 for one that does not" in x for x in text)


# ----------------------------------------------------------------------------- targets


def test_speed_targets_pass_fail_undecided():
    fr = _module()
    keeps = {"status": "keeps", "reason": ""}
    fails = {"status": "does not keep", "reason": "not on noisy"}
    open_ = {"status": "undecided", "reason": "noisy: 3 seeds of 5"}
    speeds = {"sgd": 2.0, "rst": 1.6, "sam-late": 1.8, "ksam": 1.35}
    t = fr.speed_target
    # RST keeps it at 1.6x: target 1 passes; at 1.7x SAM-late is still open
    overall = {"rst": keeps, "sam-late": open_, "ksam": fails}
    assert t(1, 1.5, overall, speeds, 2.0)[0] == "PASS"
    status, text = t(2, 1.7, overall, speeds, 2.0)
    assert status == "UNDECIDED" and "sam-late, 1.80x SAM, 1.11x SGD's cost" in text
    # SAM-late fails: nothing faster than 1.7x can pass any more
    overall = {"rst": keeps, "sam-late": fails, "ksam": open_}  # K-SAM is too slow to matter
    status, text = t(2, 1.7, overall, speeds, 2.0)
    assert status == "FAIL" and "slower (rst, 1.60x SAM, 1.25x SGD's cost)" in text
    assert t(1, 1.5, {"rst": fails, "sam-late": fails}, speeds, 2.0)[0] == "FAIL"
    assert t(1, 1.5, {"rst": keeps}, {}, None)[0] == "UNDECIDED"  # no speeds measured
    # a method that keeps it but whose speed is unknown leaves the target open
    assert t(1, 1.5, {"rst": fails, "new": keeps}, speeds, 2.0)[0] == "UNDECIDED"


def test_equal_time_target_pass_fail_undecided():
    fr = _module()
    beats = {"status": "beats", "reason": ""}
    short = {"status": "does not beat", "reason": ""}
    open_ = {"status": "undecided", "reason": "3 seeds of 5"}
    t = fr.equal_time_target
    every = {p: {"rst": beats, "sgd": short} for p in fr.ALL}
    assert t(every) == ("PASS", "PASS target 3 (at equal wall-clock, one method beats SAM on "
                                "every protocol): rst.")  # fmt: skip
    assert t({**every, "augment": {"rst": short, "sgd": short}})[0] == "FAIL"
    assert t({**every, "augment": {"rst": open_, "sgd": short}})[0] == "UNDECIDED"
    assert t({**every, "augment": {"sgd": short}})[0] == "UNDECIDED"  # RST not run there
    status, text = t({**every, "augment": {}})
    assert status == "UNDECIDED" and "no equal-time runs on augment" in text
    # every method listed falls short somewhere: decided, even with a protocol not run yet
    # (each protocol's pool lists every method eligible there, run or not)
    status, text = t({"noisy": {"rst": short}, "frontier": {"rst": beats}, "augment": {}})
    assert status == "FAIL"
    # nothing listed anywhere: open
    status, text = t({p: {} for p in fr.ALL})
    assert status == "UNDECIDED" and "no equal-time runs on noisy, frontier, augment" in text


def test_summary_targets_from_fake_rows_and_the_seed_rule_on_equal_time_rows():
    fr = _module()
    throughput = THROUGHPUT
    gathered = {}
    for p in fr.ALL:
        runs = _runs({"sgd": ("SGD", SGD5), "sam": ("SAM", SAM5)}) + _runs(
            {"rst": ("RST", _keeping(1.0))}, sa=0.1
        )
        rows = fr.rows_of(runs, ["sgd", "sam", "rst"])
        fr.apply_speeds(rows, throughput)
        eq = fr.rows_of(_runs({"rst": ("RST @50 ep", [a + 0.02 for a in SAM5])}, epochs=50))
        for r in eq:
            r["paired"] = fr.paired(r, rows[1])
        gathered[p] = {"rows": rows, "equal": eq, "order": ["sgd", "sam", "rst"]}
    s = fr.summarize(gathered, throughput)
    # RST: 10% of its steps sharpness-aware -> 1 / (0.1 + 0.9 * 0.5) = 1.82x SAM's speed
    assert s["speeds"]["rst"] == pytest.approx(1 / 0.55)
    assert [x[0] for x in s["targets"]] == ["PASS", "PASS", "PASS"]
    # given SAM's time on 3 seeds only, beating SAM is a claim: undecided
    for g in gathered.values():
        g["equal"] = fr.rows_of(
            _runs({"rst": ("RST @50 ep", [a + 0.02 for a in SAM5[:3]])}, epochs=50)
        )
    s = fr.summarize(gathered, throughput)
    assert s["targets"][2][0] == "UNDECIDED" and "3 seeds of 5" in s["targets"][2][1]


# ----------------------------------------------------------------------------- the run order


def test_run_order_noisy_first_references_and_cheap_methods_before_the_rest():
    fr = _module()
    assert fr.ALL == ("noisy", "frontier", "augment")
    order = ["sgd", "sam", "sam-late", "ksam", "rst"]
    phases = fr.protocol_phases(order, set(), {"sam-late"}, set())
    first = phases[0][1]
    assert first[:3] == [("sgd", 0), ("sam", 0), ("sam-late", 0)]
    assert {s for n, s in first if n == "sam"} == {0, 1, 2, 3, 4}
    assert {s for n, s in first if n == "sam-late"} == {0, 1, 2}
    assert phases[1][1] == []  # no claim yet
    assert phases[2][1] == [("ksam", 0), ("rst", 0), ("ksam", 1), ("rst", 1), ("ksam", 2),
                            ("rst", 2)]  # fmt: skip
    # a cheap method that keeps SAM's accuracy on its 3 seeds gets seeds 3 and 4; done runs
    # are not planned again
    done = {(n, s) for n, s in first}
    phases = fr.protocol_phases(order, done, {"sam-late"}, {"sam-late", "rst"})
    assert phases[0][1] == [] and phases[1][1] == [("sam-late", 3), ("sam-late", 4)]
    assert phases[3][1] == [("rst", 3), ("rst", 4)]


# ----------------------------------------------------------------------------- stamps, stale


def _write(work: Path, label, name, seed, acc, stamp=None, loss=2.0, sa=1.0, stage="seed"):
    d = work / f"{stage}{seed}" / "proto" / "runs" / f"{label}_s{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(_run(label, name, seed, acc, sa=sa)))
    first = {"epoch": 1, "lr": 0.1, "train_loss": loss, "train_acc": 0.3, "test_loss": None,
             "test_acc": None, "steps": 40}  # fmt: skip
    (d / "metrics.jsonl").write_text(json.dumps(first) + "\n")
    if stamp is not None:
        (d / "frontier-stamp.json").write_text(json.dumps(stamp))
    return d


HEAD = {"commit": "c0ffee" * 6 + "abcd", "dirty": False, "text": "c0ffeec0ffee", "src": "s1",
        "torch": "t", "key": "s1|torch t"}  # fmt: skip


def test_stamps_commit_unknown_and_launch_and_finish(tmp_path, monkeypatch):
    fr = _module()
    monkeypatch.setattr(frontier_runs, "code_stamp", lambda: dict(HEAD))
    old = _write(tmp_path, "SGD", "sgd", 0, 0.5)
    new = tmp_path / "seed0" / "proto" / "runs" / "SAM_s0"
    fr.stamp_launch([old, new], "noisy", "protocol")  # a finished run is not stamped
    assert not (old / fr.STAMP).exists()
    assert json.loads((new / fr.STAMP).read_text())["launches"][0]["commit"] == HEAD["commit"]
    (new / "summary.json").write_text(json.dumps(_run("SAM", "sam", 0, 0.6)))
    (new / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 2.0}) + "\n")
    fr.stamp_finish([new])
    assert json.loads((new / fr.STAMP).read_text())["finished"]
    runs = {r["label"]: r for r in fr.collect(tmp_path)}
    assert runs["SGD"]["code"] == "commit unknown" and runs["SAM"]["code"] == "c0ffeec0ffee"
    rows = {r["label"]: r for r in fr.rows_of(list(runs.values()))}
    assert rows["SGD"]["code"] == "commit unknown: not checked"
    # the stamp's code is the code now: at HEAD without a replay; the other is not checked
    fr.check_stale(list(runs.values()), tmp_path, HEAD)
    assert runs["SAM"]["code_status"] == "at HEAD" and runs["SGD"]["code_status"] == "not checked"
    lines = fr.runs_section(list(runs.values()))
    assert any("| seed0/proto/runs/SGD_s0 | protocol | 0 | commit unknown | not checked |" in x
               for x in lines)  # fmt: skip
    assert any("| seed0/proto/runs/SAM_s0 | protocol | 0 | c0ffeec0ffee | at HEAD |" in x
               for x in lines)  # fmt: skip


def test_a_run_whose_replay_differs_is_stale_and_left_out_of_the_verdicts(tmp_path):
    fr = _module()
    stamp_old = {"launches": [{"text": "0123456789ab", "src": "s0", "torch": "t"}]}
    for seed, (g, s, k) in enumerate(zip(SGD5, SAM5, _keeping(1.0))):
        _write(tmp_path, "SGD", "sgd", seed, g)
        _write(tmp_path, "SAM", "sam", seed, s)
        _write(tmp_path, "RST", "rst", seed, k, stamp=stamp_old, loss=2.0 + seed)
    runs = fr.collect(tmp_path)
    calls = []

    def replay(run):  # RST seed 4's first epoch comes out differently with the code now
        calls.append(run["run"])
        record = json.loads(Path(run["run_dir"], "metrics.jsonl").read_text())
        if run["label"] == "RST" and run["seed"] == 4:
            record["train_loss"] *= 1 + 1e-5
        return record

    stale = fr.check_stale(runs, tmp_path, HEAD, check=True, replay=replay)
    assert len(calls) == 15
    assert [(r["label"], r["seed"]) for r in stale] == [("RST", 4)]
    assert stale[0]["code"] == "0123456789ab" and stale[0]["stale_diff"][0].startswith(
        "train_loss 6 -> 6.00006"
    )
    # the stale run is left out: RST has 4 seeds of the 5 its claim needs
    rows = fr.rows_of(fr._fresh(runs, "protocol"), ["sgd", "sam", "rst"])
    v = fr.protocol_verdicts("noisy", rows)["rst"]
    assert v["status"] == "undecided" and v["reason"] == "4 seeds of 5"
    assert rows[2]["code"] == "0123456789ab: at HEAD"
    text = "\n".join(fr.stale_section(stale, runs))
    assert "| RST | 4 | 0123456789ab | train_loss 6 -> 6.00006 |" in text
    # cached per run and code: not replayed again; new code: replayed again
    runs = fr.collect(tmp_path)
    fr.check_stale(runs, tmp_path, HEAD, check=True, replay=replay)
    assert len(calls) == 15 and sum(r["code_status"] == "stale" for r in runs) == 1
    fr.check_stale(fr.collect(tmp_path), tmp_path, {**HEAD, "key": "s2|torch t"}, check=True,
                   replay=replay)  # fmt: skip
    assert len(calls) == 30


def test_report_only_over_the_protocols_stamps_and_stale_rows(tmp_path, monkeypatch):
    """main --protocol all --report-only on fake runs: every file carries the commit, a run
    without a stamp is 'commit unknown', a (cached) stale run is listed apart and left out
    of the verdicts and targets."""
    fr = _module()
    monkeypatch.setattr(fr, "code_stamp", lambda: dict(HEAD))
    speeds = tmp_path / "speeds.json"
    speeds.write_text(json.dumps(THROUGHPUT))
    work = tmp_path / "work"
    at_head = {"launches": [{"text": "c0ffeec0ffee", "src": "s1", "torch": "t"}]}
    for p in fr.ALL:
        fr.use_protocol(p)
        tag, name = fr.PROTOCOLS[p][1], fr.protocol_name()
        for seed, (g, s, k) in enumerate(zip(SGD5, SAM5, _keeping(1.0))):
            for label, opt, acc, stamp, sa in (("SGD", "sgd", g, None, 0.0),
                                               ("SAM", "sam", s, at_head, 1.0),
                                               ("RST", "rst", k, None, 0.1)):  # fmt: skip
                d = work / tag / f"seed{seed}" / name / "runs" / f"{label}_s{seed}"
                d.mkdir(parents=True)
                (d / "summary.json").write_text(json.dumps(_run(label, opt, seed, acc, sa=sa)))
                if stamp:
                    (d / "frontier-stamp.json").write_text(json.dumps(stamp))
    cache = work / "cifar10" / fr.STALE_CACHE
    fr.use_protocol("frontier")
    run = f"seed4/{fr.protocol_name()}/runs/RST_s4"
    cache.write_text(json.dumps({run: {HEAD["key"]: {"status": "stale", "differs": ["x"]}}}))
    out = tmp_path / "out"
    argv = ["--protocol", "all", "--report-only", "--work", str(work), "--out", str(out),
            "--speeds", str(speeds)]  # fmt: skip
    assert fr.main(argv) == 0
    summary = next(out.glob("frontier-summary-*.md")).read_text()
    frontier = next(out.glob("frontier-cifar10-cpu*.md")).read_text()
    for text in (summary, frontier):
        assert f"Code: {HEAD['commit']} " in text
    for path in out.glob("*.json"):
        assert json.loads(path.read_text())["code"]["commit"] == HEAD["commit"], path
    assert "| SGD | 30 | 5 |" in frontier and "commit unknown: not checked |" in frontier
    assert "| seed4/cifar10_cpu_frontier/runs/RST_s4 | RST | 4 | commit unknown | x |" in frontier
    assert "| RST | 30 | 4 |" in frontier  # the stale seed is out of the table
    assert "undecided (frontier: 4 seeds of 5)" in summary
    assert "UNDECIDED target 1" in summary and "UNDECIDED target 3" in summary
    assert "## Runs (every protocol, in finish order)" in summary
    # without the stale run's check, RST keeps SAM's accuracy everywhere at 1.82x
    cache.unlink()
    assert fr.main(argv) == 0
    summary = next(out.glob("frontier-summary-*.md")).read_text()
    assert "- PASS target 1" in summary and "- PASS target 2" in summary
    assert "| RST | 1.82 | 1.10 | keeps; share 1.00" in summary


# ----------------------------------------------------------------------------- real runs


def test_first_epoch_replay_of_a_digits_run_is_exact(tmp_path):
    fr = _module()
    proc = subprocess.run(
        [sys.executable, "-m", "effsam", "compare", "--optimizers", "esam", "--seeds", "0",
         "--epochs", "1", "--threads", "1", "--out", str(tmp_path), "--name", "c", "--quiet",
         "--no-plot"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = fr.collect(tmp_path)
    replayed = fr.replay_first_epoch(run)
    saved = fr.first_epoch(Path(run["run_dir"]))
    assert replayed["train_loss"] == saved["train_loss"]  # bit for bit on CPU, 1 thread
    assert fr.fingerprint_diff(saved, replayed) == []
    assert fr.fingerprint_diff(saved, {**replayed, "train_loss": saved["train_loss"] * 1.00001})


_NOT_THE_PROJECT = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _project_files() -> dict[Path, tuple[int, int]]:
    """Every file of the checkout (caches, the environment and git left out): its
    modification time and size."""
    found = {}
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).parts
        if any(part in _NOT_THE_PROJECT or part.endswith(".egg-info") for part in rel):
            continue
        if path.is_file():
            st = path.stat()
            found[path] = (st.st_mtime_ns, st.st_size)
    return found


def test_frontier_smoke_writes_reports_stamps_and_plot(tmp_path):
    project_before = _project_files()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "frontier.py"),
            "--smoke",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    out = tmp_path / "out"
    md = next(out.glob("frontier-smoke-*.md")).read_text()
    for label in ("SGD", "SAM", "SAM-LATE", "SAM-INTERVAL", "RST", "AE-SAM", "LOOKSAM", "MSAM",
                  "KSAM", "ESAM", "ESAM-MIX", "ESAM-RANDOM", "ESAM-WHOLEBATCH"):  # fmt: skip
        assert f"| {label} | 2 | 2 |" in md, label
    assert "ESAM's diagnosis" in md and "## Runs (in finish order)" in md
    head = _head()
    summary = next(out.glob("frontier-summary-smoke-*.md")).read_text()
    for text in (md, summary):
        assert f"Code: {head}" in text
    assert (
        json.loads(next(out.glob("frontier-summary-smoke-*.json")).read_text())["code"]["commit"]
        == head
    )
    assert "target 1" in summary and "target 2" in summary and "target 3" in summary
    stamps = list((tmp_path / "work").glob("**/runs/*/frontier-stamp.json"))
    assert len(stamps) == 26
    stamp = json.loads(stamps[0].read_text())
    assert stamp["launches"][0]["commit"] == head and stamp["finished"]
    assert next(out.glob("frontier-smoke-*.png")).stat().st_size > 10_000
    # a smoke run writes under its --work and --out only, nothing into the project
    project_after = _project_files()
    changed = sorted(
        str(p.relative_to(ROOT))
        for p in set(project_before) | set(project_after)
        if project_before.get(p) != project_after.get(p)
    )
    assert changed == [], changed


# ----------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("protocol", ["noisy", "frontier", "augment"])
def test_protocols_name_their_runs_and_narrow_shared_args_per_method(protocol):
    import yaml

    fr = _module()
    fr.use_protocol(protocol)
    assert fr.protocol_name() == yaml.safe_load(fr.CONFIG.read_text())["name"]
    title = fr.protocol_title(False)
    assert ("no augmentation" if protocol != "augment" else "augmentation cifar") in title
    assert ("30% of the training labels random" in title) == (protocol == "noisy")
    assert fr.method_order(False)[:2] == ["sgd", "sam"]
    # an equal-time run of one method passes only the shared args it takes: compare
    # refuses shared args none of its optimizers takes (SGD takes none of rho/beta/gamma)
    assert fr.shared_args_for("sgd") == {}
    assert fr.shared_args_for("rst") == {"rho": 0.1}
    assert fr.shared_args_for("esam-random") == {"rho": 0.1, "beta": 0.6, "gamma": 0.5}


def test_only_names_outside_the_protocol_exit_2_before_any_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--only", "sam", "adamw"]
        + ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--only ['adamw'] not in the protocol" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_a_seed_short_of_sam_decides_does_not_beat_at_any_seed_count():
    fr = _module()
    sam = {"by_seed": {s: 0.50 for s in fr.FULL_SEEDS}, "acc_std": 0.004}
    ahead = {"label": "X", "by_seed": {0: 0.52}}
    behind = {"label": "Y", "by_seed": {0: 0.49}}
    mixed = {"label": "Z", "by_seed": {0: 0.53, 1: 0.50, 2: 0.56}}  # one seed level with SAM
    assert fr.beats_sam(ahead, sam)["status"] == "undecided"
    assert fr.beats_sam(behind, sam)["status"] == "does not beat"
    assert fr.beats_sam(mixed, sam)["status"] == "does not beat"
    five = {"label": "W", "by_seed": {s: 0.52 for s in fr.FULL_SEEDS}}
    assert fr.beats_sam(five, sam)["status"] == "beats"


def test_equal_time_runs_go_seed_by_seed_and_stop_for_a_refuted_method():
    fr = _module()
    plan = [("sgd", "SGD", 60), ("msam-rel", "MSAM-rel", 60)]
    first = fr.equal_time_items(plan, set(), set(), set())
    assert first == [("sgd", "SGD", 60, 0), ("msam-rel", "MSAM-rel", 60, 0)]
    done = {("sgd", 60, 0), ("msam-rel", 60, 0)}
    # SGD fell short on seed 0: only MSAM-rel goes on, to seed 1, then seed 2
    nxt = fr.equal_time_items(plan, done, {("sgd", 60)}, set())
    assert nxt == [("msam-rel", "MSAM-rel", 60, 1)]
    done |= {("msam-rel", 60, 1), ("msam-rel", 60, 2)}
    # past the base seeds only a method that beats SAM so far goes on
    assert fr.equal_time_items(plan, done, {("sgd", 60)}, set()) is None
    assert fr.equal_time_items(plan, done, {("sgd", 60)}, {("msam-rel", 60)}) == [
        ("msam-rel", "MSAM-rel", 60, 3)
    ]


def test_the_equal_time_pool_lists_planned_methods_not_run_yet():
    fr = _module()
    sam = {"optimizer": "sam", "label": "SAM", "by_seed": {s: 0.5 for s in fr.FULL_SEEDS},
           "acc_std": 0.004, "speed": 1.0}  # fmt: skip
    g = {"rows": [sam], "equal": [], "planned": ["sgd", "msam-rel"]}
    pool = fr.equal_pool(g)
    assert {n: v["status"] for n, v in pool.items()} == {
        "sgd": "undecided",
        "msam-rel": "undecided",
    }
    # so a protocol with planned methods not run keeps target 3 open
    short = {"status": "does not beat", "reason": ""}
    status, _ = fr.equal_time_target({"noisy": {"sgd": short, **{"msam-rel": pool["msam-rel"]}}})
    assert status == "UNDECIDED"
