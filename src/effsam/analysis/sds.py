"""ESAM's data-selection diagnostics, as a training option (``train.sds_diagnostics: N``).

Every N-th step, on a copy of the model (training itself is untouched: same weights, BN
statistics and random streams as without the diagnostics), with the batch B, the
perturbation ε = ρ g / ‖g‖ of the clean gradient (dense: SWP's random tensor subset is left
out, so that the probe measures the selection alone), the sharpness s_i = ℓ_i(θ + ε) − ℓ_i(θ),
B⁺ the k = round(γ b) samples of largest s_i, B⁻ the rest and R a uniformly random subset
of size k:

* Du et al. (ICLR 2022), Fig. 5: L_{B⁺} and L_{B⁻} at θ and at θ + ε;
* Fig. 6: the cosine similarity of ∇L_{B⁺}(θ + ε), ∇L_{B⁻}(θ + ε) and ∇L_R(θ + ε) with the
  full batch's ∇L_B(θ + ε) (one forward of B at θ + ε, the subsets' gradients taken from it);

and at every step, from the selection the optimizer really made:

* coverage: how often each training sample was selected this epoch, the share never
  selected, and the share of misclassified samples (by pass 1's predictions) among the
  never-selected against the share among all samples.

Per epoch the means are returned (and the toolkit writes them to ``sds_diagnostics.jsonl``
in the run directory and plots them to ``sds_diagnostics.png``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..optim.masks import round_half_up

#: What one probe measures (the per-epoch record holds the mean of each).
PROBE_KEYS = (
    "loss_top_theta",
    "loss_rest_theta",
    "loss_top_perturbed",
    "loss_rest_perturbed",
    "cos_top",
    "cos_rest",
    "cos_random",
)


def _losses(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _cos(a: list[Tensor], b: list[Tensor]) -> float:
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float((x.double() ** 2).sum()) for x in a))
    nb = math.sqrt(sum(float((y.double() ** 2).sum()) for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


class SDSDiagnostics:
    """Collects the diagnostics of one run; see the module docstring.

    Args:
        num_train: training-set size (for the coverage counts).
        gamma: the selection ratio γ of the optimizer under study.
        rho: ρ of the probe's perturbation (the optimizer's).
        every: probe every N-th step (N ≥ 1).
        seed: seed of the random subset R.
    """

    def __init__(self, num_train: int, gamma: float, rho: float, every: int, seed: int = 0):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid sds_diagnostics interval: {every!r} (an int >= 1)")
        self.num_train = num_train
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.every = every
        self.generator = torch.Generator().manual_seed(seed)
        # over the whole run: seen, and selected at least once
        self.ever_seen = torch.zeros(num_train, dtype=torch.bool)
        self.ever_selected = torch.zeros(num_train, dtype=torch.bool)
        self.start_epoch()

    def start_epoch(self) -> None:
        self._probes: list[dict[str, float]] = []
        self.counts = torch.zeros(self.num_train, dtype=torch.long)
        self.seen = torch.zeros(self.num_train, dtype=torch.long)
        self.wrong = torch.zeros(self.num_train, dtype=torch.bool)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def probe(self, model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Any]) -> None:
        """The Fig. 5 and Fig. 6 quantities on this batch, on a copy of the model."""
        m = copy.deepcopy(model)
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        with torch.enable_grad():
            before = _losses(loss_fn(m, batch))
            g = torch.autograd.grad(before.mean(), params)
        b = before.numel()
        k = max(1, min(b - 1, round_half_up(self.gamma * b)))
        norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in g))
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(gi, alpha=self.rho / (norm + 1e-12))
        with torch.enable_grad():
            after = _losses(loss_fn(m, batch))
        before = before.detach()
        after_values = after.detach()
        sharp = (after_values - before).double()
        order = torch.sort(sharp, descending=True, stable=True).indices
        top, rest = order[:k], order[k:]
        rand = torch.randperm(b, generator=self.generator)[:k].to(before.device)

        def grad_of(idx: Tensor | None) -> list[Tensor]:
            loss = after.mean() if idx is None else after[idx].mean()
            return list(torch.autograd.grad(loss, params, retain_graph=True))

        full = grad_of(None)
        self._probes.append(
            {
                "loss_top_theta": float(before[top].mean()),
                "loss_rest_theta": float(before[rest].mean()),
                "loss_top_perturbed": float(after_values[top].mean()),
                "loss_rest_perturbed": float(after_values[rest].mean()),
                "cos_top": _cos(grad_of(top), full),
                "cos_rest": _cos(grad_of(rest), full),
                "cos_random": _cos(grad_of(rand), full),
            }
        )

    def record(self, sample_ids: Tensor, selected: Tensor | None, correct: Tensor) -> None:
        """After a real step: the batch's sample ids, the indices the optimizer selected
        within the batch (None: all) and pass 1's per-sample correctness."""
        ids = sample_ids.cpu()
        self.seen[ids] += 1
        self.wrong[ids] = ~correct.cpu()
        chosen = ids if selected is None else ids[selected.cpu()]
        self.counts[chosen] += 1
        self.ever_seen[ids] = True
        self.ever_selected[chosen] = True

    def end_epoch(self) -> dict[str, Any]:
        """The epoch's means and coverage; starts the next epoch."""
        out: dict[str, Any] = {"probes": len(self._probes)}
        for key in PROBE_KEYS:
            vals = [p[key] for p in self._probes if not math.isnan(p[key])]
            out[key] = sum(vals) / len(vals) if vals else None
        seen = self.seen > 0
        never = seen & (self.counts == 0)
        n_seen = int(seen.sum())
        out["samples_seen"] = n_seen
        out["never_selected"] = int(never.sum()) / n_seen if n_seen else None
        out["mean_selections"] = float(self.counts[seen].double().mean()) if n_seen else None
        wrong = self.wrong & seen
        out["misclassified_all"] = int(wrong.sum()) / n_seen if n_seen else None
        n_never = int(never.sum())
        out["misclassified_never_selected"] = (
            int((wrong & never).sum()) / n_never if n_never else None
        )
        # a sample visited once an epoch is selected 0 or 1 times in it; over the run so
        # far the question is whether some samples are never selected at all
        never_run = self.ever_seen & ~self.ever_selected
        n_ever = int(self.ever_seen.sum())
        out["never_selected_so_far"] = int(never_run.sum()) / n_ever if n_ever else None
        n_never_run = int(never_run.sum())
        out["misclassified_never_selected_so_far"] = (
            int((self.wrong & never_run).sum()) / n_never_run if n_never_run else None
        )
        hist = torch.bincount(self.counts[seen], minlength=1)
        out["selection_histogram"] = hist.tolist()
        self.start_epoch()
        return out


def write_record(run_dir: str | Path, epoch: int, record: dict[str, Any]) -> None:
    """Append the epoch's record to ``sds_diagnostics.jsonl`` (an epoch seen again after a
    resume replaces the old line)."""
    path = Path(run_dir) / "sds_diagnostics.jsonl"
    lines = []
    if path.exists():
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    lines = [x for x in lines if x["epoch"] != epoch] + [{"epoch": epoch, **record}]
    lines.sort(key=lambda x: x["epoch"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(path)


def plot_records(run_dir: str | Path, title: str = "") -> Path | None:
    """``sds_diagnostics.png``: the losses (Fig. 5), the cosines (Fig. 6), the coverage."""
    path = Path(run_dir) / "sds_diagnostics.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    ax = axes[0]
    for key, label, style in (
        ("loss_top_theta", "B+ at θ", "-"),
        ("loss_top_perturbed", "B+ at θ+ε", "--"),
        ("loss_rest_theta", "B− at θ", "-"),
        ("loss_rest_perturbed", "B− at θ+ε", "--"),
    ):
        ax.plot(ep, [r.get(key) for r in recs], style, marker=".", label=label)
    ax.set_title("losses of the selected (B+) and left-out (B−) samples")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean cross-entropy")
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, label in (("cos_top", "B+"), ("cos_rest", "B−"), ("cos_random", "random subset")):
        ax.plot(ep, [r.get(key) for r in recs], marker=".", label=label)
    ax.set_title("cosine with the full batch's gradient at θ+ε")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
    ax = axes[2]
    for key, label in (
        ("never_selected", "not selected this epoch"),
        ("never_selected_so_far", "never selected since the start"),
        ("misclassified_never_selected", "misclassified, among those not selected"),
        ("misclassified_all", "misclassified, all"),
    ):
        if any(key in r for r in recs):  # (records written before a field existed)
            ax.plot(ep, [100 * (r.get(key) or 0) for r in recs], marker=".", label=label)
    ax.set_title("per-sample coverage of the selection")
    ax.set_xlabel("epoch")
    ax.set_ylabel("% of training samples")
    ax.legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(run_dir) / "sds_diagnostics.png"
    fig.savefig(out)
    plt.close(fig)
    return out
