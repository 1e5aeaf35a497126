"""SSAM's mask policies (Mi et al., NeurIPS 2022): perturb a sparse subset of the weights.

A binary mask m over parameter elements, of density 1 − s (s the sparsity), turns SAM's
ascent into

    ε = m ⊙ ρ g / (‖g‖₂ + δ)            normalisation="authors" (the authors' code): ‖ε‖ ≤ ρ
    ε = m ⊙ ρ g / (‖m ⊙ g‖₂ + δ)        normalisation="masked":                      ‖ε‖ = ρ

Pass 2 (the descent gradient) stays dense. Two ways to choose m:

* :class:`FisherMask` (SSAM-F): the k = round((1 − s) · N) elements with the largest
  diagonal empirical Fisher F_j = Σ_{i ≤ N_F} (∂ℓ_i/∂θ_j)², one global top-k over every
  perturbable element (not per layer), recomputed every ``update_interval`` steps.
  ``granularity="tensor"`` (an extension, not in the paper) keeps whole tensors instead,
  so pass 1 can skip the weight gradients of the others and sparsity saves real time.
* :class:`DynamicMask` (SSAM-D): a random mask of density 1 − s; every ``update_interval``
  steps the r_t fraction of live elements with the smallest |g| is dropped and as many
  elements dead before the drop regrow (at random, or by largest |g|),
  r_t = r_0 (1 + cos(π t / T)) / 2; the new mask is used from the next step.

N counts the elements of the optimizer's parameters that can be perturbed: those with
``requires_grad`` (and, for the Fisher mask, that belong to the model). The mask is kept
as one bool tensor per optimizer parameter, in the optimizer's order; it is saved in the
optimizer's ``state_dict``. Ties in any ranking go to the lower flat index (optimizer
order, row-major), so masks are deterministic.

Under ``torch.distributed`` the scores (Fisher or |g|) are summed over workers before the
ranking and random draws use generators seeded alike, so every worker holds the same mask.
"""

from __future__ import annotations

from .._ranking import largest_indices
from ..fisher import empirical_fisher
from .base import NORMALISATIONS, SparseMask
from .dynamic_mask import GROW_MODES, DynamicMask
from .fisher_mask import GRANULARITIES, FisherMask

__all__ = [
    "GRANULARITIES",
    "GROW_MODES",
    "NORMALISATIONS",
    "DynamicMask",
    "FisherMask",
    "SparseMask",
    "empirical_fisher",
    "largest_indices",
]
