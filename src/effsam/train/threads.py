"""The CPU thread policy of ``effsam train``, ``effsam compare`` and ``effsam analyze`` (one
rule for all three).

``train.threads`` (``--threads N``) wins when given. Otherwise a model with fewer than
:data:`SMALL_MODEL_WEIGHTS` weights runs on one thread, and a larger one on torch's default
(one per core). A small model's operations are too short to split: torch's threads spend
the step waiting for each other, and on a shared machine a thread that loses its core
stalls all of them (on a busy 2-core machine the 24k-weight digits CNN trained 14× slower
on two threads than on one, a ResNet-18 at width 1/4 4–5× slower). The rule depends on the
model alone, not on the machine's load, so a run's numbers do not change from one
invocation to the next, and every run of a comparison (same model) uses the same count.
"""

from __future__ import annotations

import torch

#: Models with fewer weights than this run on one thread unless train.threads says otherwise.
SMALL_MODEL_WEIGHTS = 1_000_000


def resolve_threads(requested: int | None, weights: int) -> tuple[int, str]:
    """The thread count for a model of ``weights`` weights, and why (for env.json)."""
    if requested is not None:
        return requested, "train.threads"
    if weights < SMALL_MODEL_WEIGHTS:
        return 1, f"1 thread: a model under {SMALL_MODEL_WEIGHTS:,} weights"
    return torch.get_num_threads(), f"torch's default: a model of {SMALL_MODEL_WEIGHTS:,}+ weights"


def set_threads(requested: int | None, model: torch.nn.Module) -> tuple[int, str]:
    """Applies the policy to ``model``'s size; returns what :func:`resolve_threads` does."""
    threads, why = resolve_threads(requested, sum(p.numel() for p in model.parameters()))
    torch.set_num_threads(threads)
    return threads, why
