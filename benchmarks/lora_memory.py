"""Memory and time of a sharpness-aware step on a LoRA model of 124M parameters, as ratios
to AdamW: SAM on LoRA, Flat-LoRA and a cheap ascent, side by side.

    python benchmarks/lora_memory.py                 # GPT-2 small, LoRA r=8 on every linear
    python benchmarks/lora_memory.py --dtype bf16    # the model stored in bf16

The model is GPT-2 small (124M parameters) built from its ``transformers`` config with
random weights (no download: only the cost is measured), wrapped with ``peft`` LoRA
(r = 8, α = 16) on every linear layer (``c_attn``, ``c_proj``, ``c_fc``: the Flat-LoRA
authors' "all" setting, the most layers Flat-LoRA perturbs). The optimizers are built over
the trainable (adapter) parameters only; all share the one model.

Memory, per method, with :func:`effsam.bench.memory.peak_allocated_bytes` (the CPU
profiler's allocation events; on CUDA the allocator's peak):

* ``state``: the optimizer's persistent tensors (AdamW's moments; SAM's θ backup);
* ``peak``: the most one step allocates beyond what was live before it (activations,
  gradients, ε, Flat-LoRA's chunk of W + ε);
* ``extra`` = (state + peak) − AdamW's (state + peak): what the method costs on top of
  AdamW, given in MiB, as a multiple of the trainable parameters' bytes and as a share of
  the base weights' bytes.

Time: seconds per step, the median over ``--rounds`` rounds in which every method takes
one step in turn (interleaved, so a slower moment of a shared machine hits all alike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from pathlib import Path

import torch
from _lora import run_header, torchvision_importable
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("adamw", "sam", "flat-lora", "sam-slice")


def build(dtype: torch.dtype, rank: int, layers: int):
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers)  # GPT-2 small: 12 layers, 768 wide
    model = transformers.GPT2LMHeadModel(cfg).to(dtype)
    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True, lora_dropout=0.0,
    )  # fmt: skip
    model = peft.get_peft_model(model, config).to(dtype)
    model.train()
    return model


def make(method: str, model, total_steps: int):
    import effsam
    from effsam.integrations.peft import trainable_parameters
    from effsam.optim.flatlora import FlatLoRA

    params = trainable_parameters(model)
    kw = {"lr": 1e-5, "weight_decay": 0.0}
    if method == "adamw":
        return torch.optim.AdamW(params, **kw)
    if method == "sam":
        return effsam.SAM(params, base=torch.optim.AdamW, rho=0.05, **kw)
    if method == "flat-lora":
        # constant σ: every timed step perturbs (the cosine's first steps would not)
        return FlatLoRA(
            params, base=torch.optim.AdamW, rho=0.05, model=model, sigma_schedule="constant",
            **kw,
        )  # fmt: skip
    return effsam.create_optimizer(params, method, base="adamw", rho=0.05, **kw)


def state_bytes(opt) -> int:
    from effsam.bench.memory import tensor_bytes

    total = tensor_bytes([dict(s) for s in opt.state.values()])
    base = getattr(opt, "base", None)
    if base is not None:
        total += tensor_bytes([dict(s) for s in base.state.values()])
    return total


def loss_fn(model, batch):
    out = model(input_ids=batch)
    logits = out.logits[:, :-1].float()
    return (
        F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        .view(batch.shape[0], -1)
        .mean(1)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torchvision_importable()
    import effsam
    from effsam.bench.memory import peak_allocated_bytes

    def ascent_memory(opt, model, batch, loss_fn):
        """SAM's ascent: its θ backups (the wrapper's own state) and first_step's peak."""
        from effsam.bench.memory import ascent_memory as measure
        from effsam.bench.memory import tensor_bytes

        a = measure(opt, model, batch, loss_fn)
        if a is None:
            return None
        theta = tensor_bytes([s.get("theta") for s in opt.state.values()])
        return types.SimpleNamespace(persistent_extra=theta, transient=a.transient)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build(dtype, args.rank, args.layers)
    n_total = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    base_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad
    )
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    opts = {m: make(m, model, 1000) for m in args.methods}
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }

    def step(m):
        return effsam.sharpness_aware_step(model, opts[m], batch, loss_fn)

    for m in args.methods:  # warm-up: states allocated, first-call costs paid
        step(m)
    mem = {}
    for m in args.methods:
        before = state_bytes(opts[m])
        peak = peak_allocated_bytes(lambda m=m: step(m))
        mem[m] = {"state": max(before, state_bytes(opts[m])), "peak": peak}
        print(
            f"{m}: state {mem[m]['state'] / 2**20:.2f} MiB, step peak {peak / 2**20:.1f} MiB",
            flush=True,
        )
    # The perturbation's own memory. SAM: the θ backup and the peak of
    # first_step (effsam.bench.memory.ascent_memory). Flat-LoRA: its step's peak minus the
    # peak of the same step at σ = 0 (the same code path with nothing installed).
    own = {}
    for m in args.methods:
        if m not in ("sam", "flat-lora"):
            continue  # the cheap ascent's is SAM's (the same backup and ε), not measured apart
        if m == "flat-lora":
            control = make(m, model, 1000)
            control.param_groups[0]["rho"] = 0.0
            effsam.sharpness_aware_step(model, control, batch, loss_fn)
            zero = peak_allocated_bytes(
                lambda c=control: effsam.sharpness_aware_step(model, c, batch, loss_fn)
            )
            own[m] = mem[m]["peak"] - zero + state_bytes(opts[m]) - state_bytes(control)
            del control
        else:
            a = ascent_memory(opts[m], model, batch, loss_fn)
            own[m] = None if a is None else a.persistent_extra + a.transient
        if own[m] is not None:
            print(f"{m}: the perturbation's own memory {own[m] / 2**20:.2f} MiB", flush=True)
    # Flat-LoRA's transient in isolation: the largest perturbed layer's forward and backward
    # on one token, with and without the perturbation (activations negligible): one chunk of
    # W + ε, never a tensor the size of the base weights.
    isolated = None
    if "flat-lora" in opts:
        fl = opts["flat-lora"]
        t = max(fl.targets, key=lambda t: t.module.weight.numel())
        x = torch.randn(1, t.weight.shape[1], dtype=dtype, requires_grad=True)
        plain = peak_allocated_bytes(lambda: t.module(x).sum().backward())
        with fl.first_pass():
            perturbed = peak_allocated_bytes(lambda: t.module(x).sum().backward())
        fl.abort_step()
        isolated = {
            "layer": t.name,
            "layer_weight_bytes": t.module.weight.numel() * t.module.weight.element_size(),
            "extra_bytes": perturbed - plain,
        }
        print(f"flat-lora, one layer in isolation: {isolated}", flush=True)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for _ in range(args.rounds):
        for m in args.methods:
            t0 = time.perf_counter()
            step(m)
            times[m].append(time.perf_counter() - t0)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"base weight {n} changed"
    ref = mem.get("adamw")
    ref_time = statistics.median(times["adamw"]) if "adamw" in times else None
    rows = []
    for m in args.methods:
        total = mem[m]["state"] + mem[m]["peak"]
        extra = total - (ref["state"] + ref["peak"]) if ref else None
        sec = statistics.median(times[m])
        rows.append({
            "method": m,
            "state_mib": mem[m]["state"] / 2**20,
            "step_peak_mib": mem[m]["peak"] / 2**20,
            "own_mib": None if m not in own or own[m] is None else own[m] / 2**20,
            "own_vs_trainable": None if own.get(m) is None else own[m] / train_bytes,
            "own_vs_base_weights": None if own.get(m) is None else own[m] / base_bytes,
            "extra_mib": None if extra is None else extra / 2**20,
            "extra_vs_trainable": None if extra is None else extra / train_bytes,
            "extra_vs_base_weights": None if extra is None else extra / base_bytes,
            "memory_vs_adamw": None if not ref else total / (ref["state"] + ref["peak"]),
            "seconds_per_step": sec,
            "time_vs_adamw": None if not ref_time else sec / ref_time,
            "step_times": times[m],
        })  # fmt: skip
    header = {
        **run_header("lora_memory.py", argv, args.threads),
        "model": (
            f"GPT-2 small from its config, random weights, {args.layers} layers, {n_total / 1e6:.1f}M "
            f"parameters in {args.dtype}; LoRA r={args.rank} alpha={2 * args.rank} on c_attn, "
            f"c_proj, c_fc: {n_train / 1e6:.2f}M trainable ({train_bytes / 2**20:.2f} MiB), "
            f"base weights {base_bytes / 2**20:.0f} MiB"
        ),
        "batch": f"{args.batch} sequences x {args.seq} tokens",
        "trainable_bytes": train_bytes,
        "base_weight_bytes": base_bytes,
    }
    tag = f"lora-memory-gpt2-{args.dtype}-cpu{args.threads}t-torch{torch.__version__.split('+')[0]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(
        json.dumps({**header, "rows": rows, "flat_lora_isolated_layer": isolated}, indent=2) + "\n"
    )
    f = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [
        "# Memory and time of a step on a 124M-parameter LoRA model, against AdamW",
        "",
        f"Command: `{header['command']}`  ",
        f"Code: {header['commit']}{'+dirty' if header['dirty'] else ''} (`git rev-parse HEAD`; "
        "+dirty: uncommitted changes under src/, configs/ or benchmarks/; src/ digest "
        f"{header.get('src', '?')})  ",
        f"Date: {header['date']}  ",
        f"Environment: torch {header['torch']}, {header['cpu']}, {args.threads} thread(s)  ",
        f"Model: {header['model']}  ",
        f"Batch: {header['batch']}; time: median of {args.rounds} interleaved rounds",
        "",
        "perturbation: the perturbation's own memory — SAM: the θ backup plus "
        "the peak of first_step; Flat-LoRA: its step's peak minus the same step's at σ = 0 — "
        "in MiB, as a multiple of the trainable parameters' bytes and as a share of the base "
        "weights' bytes. state: the optimizer's persistent tensors; step peak: the most one "
        "step allocates beyond what was live before it; memory vs AdamW: (state + step peak) "
        "over AdamW's. The base weights were checked bit-identical after every step.",
        "",
        "| method | perturbation MiB | / trainable | / base weights | state MiB | step peak MiB | memory vs AdamW | s / step | time vs AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {f(r['own_mib'], 3)} | {f(r['own_vs_trainable'])} | "
            f"{f(r['own_vs_base_weights'], 4)} | {f(r['state_mib'])} | "
            f"{f(r['step_peak_mib'], 1)} | {f(r['memory_vs_adamw'], 3)} | "
            f"{f(r['seconds_per_step'], 3)} | {f(r['time_vs_adamw'])} |"
        )
    if isolated is not None:
        lines += [
            "",
            f"Flat-LoRA's transient in isolation (the largest perturbed layer, `{isolated['layer']}`, "
            "forward and backward on one token, perturbed minus unperturbed): "
            f"{isolated['extra_bytes'] / 2**20:.2f} MiB, against {isolated['layer_weight_bytes'] / 2**20:.2f} "
            f"MiB for that layer's weight and {base_bytes / 2**20:.0f} MiB for all base weights.",
        ]
    (args.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
