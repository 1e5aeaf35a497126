"""Flat-LoRA (Li et al., ICML 2025): a random perturbation of the merged weight in the full
weight space, one forward/backward per step.

For every LoRA layer (a ``peft`` LoRA ``Linear``) with frozen base weight W and adapters
B A, scaling s = α/r, the merged weight is W' = W + s·B A (out × in). Each step::

    σ_t = σ · ½ (1 − cos(π t / T))                 # cosine rise from 0 to σ (the paper's)
    ε_ij = σ_t · ‖W'_i,:‖₂ / √n · z_ij,  z ~ N(0, 1)  # n = fan-in; row i = output unit
    g = ∇_{A,B} L(W + ε + s·B A)                    # the one forward/backward
    base step with g                                # ε gone, the weights never touched

The choices, each from the paper (and matching the authors' code, which was read to
confirm them):

* **Where** — ε lives on the merged weight W' of each LoRA layer, in the full out × in
  space, not on A and B (the paper's point: flatness of the full space that the merged
  model is deployed in). Only LoRA layers are perturbed (not a ``modules_to_save`` head).
* **Distribution** — Gaussian, independent per element, scaled per row (an output unit,
  a "filter") by the row's norm ‖W'_i,:‖ and by 1/√n with n the layer's fan-in, so that
  the variance of the perturbed pre-activation does not grow with the width. The norms are
  those of W' at the start of the step, taken without gradient.
* **Schedule** — σ rises from 0 to σ over the run on a cosine (``sigma_schedule="cosine"``,
  needs ``total_steps``), as the paper does; ``"constant"`` keeps σ_t = σ. σ = 0.05 is the
  authors' setting.
* **One draw per optimizer step** — shared by every micro-batch of an accumulated step.
* **Seeds, no stored ε** — each step's noise comes from a seed derived from (``seed``,
  step, layer); only the seed and the per-row scales (one number per output unit) are
  kept. The seed is deterministic (the authors take theirs from the clock): a resumed run
  continues bit-identically. z is drawn in float32 by the weight's device's generator: the
  same seed gives the same z for float32, bf16 and float64 weights, but a CUDA generator
  draws other numbers than the CPU's.

How the perturbation is applied: the authors add ε to W in place before the pass and
subtract a regenerated ε after it. In bf16 (or any floating format) ``W + ε − ε`` is not W,
so the frozen weights drift a little with every step, and restoring them exactly would need
a copy of every perturbed W — the size of the base model. Here the stored weight is never
written: during the pass each perturbed layer computes ``y = x (W + ε)ᵀ + b`` through a
custom autograd function that builds ``W + ε`` one row-chunk at a time from the seed, uses
it and frees it, and regenerates the same chunks in the backward for ``∂L/∂x = ∂L/∂y (W + ε)``
(no ε is saved for the backward). So:

* the weights after any number of steps are bit-identical to those before (any dtype);
* the extra memory is one chunk of W + ε at a time (at most ``chunk_elements`` elements,
  by default 2²² — or one layer's weight if smaller) plus the per-row scales: no tensor the
  size of the base weights;
* the cost is a draw of ε and an add, per perturbed element, in the forward and again in
  the backward — the layer's own matmuls are not doubled.

``rho`` is σ (the authors call it ``rho`` too); ρ = 0 — or σ_t = 0, the first step of the
cosine schedule — installs nothing: the step is exactly the base optimizer's.

On a model without LoRA layers the same perturbation is put on every ``nn.Linear`` (and
transformers' ``Conv1D``) whose weight is trainable: W' = W, and the gradient of W is taken
at W + ε (a random weight perturbation of full fine-tuning). LoRA layers of other kinds
(embedding, convolution, quantised) and LoRA variants (DoRA) are refused by name.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._validate import check_seed
from .sharpness_aware import SharpnessAware, resolve_base

#: how σ moves over training
SIGMA_SCHEDULES = ("cosine", "constant")

#: the authors' σ (their ``rho``) for LLM fine-tuning
AUTHORS_SIGMA = 0.05


def noise_seed(seed: int, step: int, layer: int) -> int:
    """The seed of one layer's noise at one step: a hash of (seed, step, layer), so that
    every step and every layer draws independent noise and a resumed run draws the same."""
    digest = hashlib.blake2b(f"{seed}:{step}:{layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def cosine_factor(step: int, total_steps: int) -> float:
    """½ (1 − cos(π t / T)), clamped to t ≤ T: 0 at the first step, 1 at the last."""
    t = min(max(step, 0), total_steps)
    return 0.5 * (1.0 - math.cos(math.pi * t / total_steps))


def _conv1d_type() -> type | None:
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _peft_lora() -> Any:
    """peft's LoRA layer module if peft has been imported (a model cannot hold peft layers
    otherwise), else None."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import layer
    except ImportError:  # pragma: no cover - a broken peft install
        return None
    return layer


@dataclass
class _Target:
    """One perturbed layer: ``module`` computes x Wᵀ + b (its forward is replaced during
    the pass); ``lora`` is the peft LoRA layer around it (None on a plain model)."""

    name: str
    module: nn.Module
    lora: nn.Module | None
    transposed: bool  # transformers' Conv1D: the weight is stored in × out

    @property
    def weight(self) -> Tensor:
        """The weight, out × in (a view for Conv1D)."""
        w = self.module.weight
        return w.t() if self.transposed else w


def _lora_deltas(lora: nn.Module) -> list[tuple[Tensor, Tensor, float]]:
    """(B, A, s) of each active, unmerged adapter of a peft LoRA layer: W' = W + Σ s B A."""
    if getattr(lora, "disable_adapters", False) or getattr(lora, "merged", False):
        return []  # adapters off, or already merged into W: W' = W
    out = []
    variants = getattr(lora, "lora_variant", {}) or {}
    for name in lora.active_adapters:
        if name not in lora.lora_A:
            continue
        if name in variants or getattr(lora, "use_dora", {}).get(name, False):
            raise NotImplementedError(
                f"Flat-LoRA: adapter {name!r} of this layer is a LoRA variant "
                f"({type(variants.get(name)).__name__}); its merged weight is not W + s·B A, "
                "so the perturbation would be scaled by the wrong norms. Use plain LoRA"
            )
        out.append((lora.lora_B[name].weight, lora.lora_A[name].weight, lora.scaling[name]))
    return out


def find_targets(model: nn.Module) -> list[_Target]:
    """The layers Flat-LoRA perturbs: the peft LoRA ``Linear`` layers with a trainable
    adapter if the model has any LoRA layer, else every ``nn.Linear`` / ``Conv1D`` with a
    trainable weight. Other LoRA layer kinds with trainable adapters are refused."""
    lora = _peft_lora()
    conv1d = _conv1d_type()
    if lora is not None and any(isinstance(m, lora.LoraLayer) for m in model.modules()):
        targets = []
        for name, m in model.named_modules():
            if not isinstance(m, lora.LoraLayer):
                continue
            base = m.get_base_layer()
            own = {id(p) for p in base.parameters()}
            if not any(p.requires_grad for p in m.parameters() if id(p) not in own):
                continue  # no trainable adapter
            if type(m) is not lora.Linear or not (
                isinstance(base, nn.Linear) or (conv1d is not None and isinstance(base, conv1d))
            ):
                raise NotImplementedError(
                    f"Flat-LoRA perturbs LoRA Linear layers over nn.Linear or Conv1D weights; "
                    f"{name!r} is a {type(m).__module__}.{type(m).__name__} over a "
                    f"{type(base).__name__} (embedding, convolution and quantised LoRA layers "
                    "are not supported)"
                )
            _lora_deltas(m)  # refuses variants now rather than at the first step
            transposed = conv1d is not None and isinstance(base, conv1d)
            targets.append(_Target(name, base, m, transposed))
        if not targets:
            raise ValueError(
                "Flat-LoRA: the model has LoRA layers but none with a trainable adapter"
            )
        return targets
    types: tuple[type, ...] = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    targets = [
        _Target(name, m, None, conv1d is not None and isinstance(m, conv1d))
        for name, m in model.named_modules()
        if isinstance(m, types) and m.weight.requires_grad
    ]
    if not targets:
        raise ValueError(
            "Flat-LoRA found nothing to perturb: no peft LoRA layer and no nn.Linear / Conv1D "
            "with a trainable weight"
        )
    return targets


class LayerNoise:
    """One layer's noise for one step: the seed and the per-row scales σ_t‖W'_i‖/√n.

    :meth:`chunks` yields ``(rows, W[rows] + ε[rows])`` in a fixed order, drawing ε from a
    generator seeded with :attr:`seed`; every call draws the same numbers, so the forward
    and the backward see the same ε and nothing of it is stored."""

    def __init__(self, seed: int, scale: Tensor, chunk_elements: int) -> None:
        self.seed = seed
        self.scale = scale  # [out], in the generation dtype
        self.chunk_elements = chunk_elements

    def rows_per_chunk(self, fan_in: int) -> int:
        return max(1, self.chunk_elements // max(fan_in, 1))

    def chunks(self, weight: Tensor) -> Iterator[tuple[slice, Tensor]]:
        out_features, fan_in = weight.shape
        gen = torch.Generator(device=weight.device)
        gen.manual_seed(self.seed)
        step = self.rows_per_chunk(fan_in)
        for start in range(0, out_features, step):
            rows = slice(start, min(start + step, out_features))
            # drawn in float32 whatever the weight's dtype (so a float64 model and a float32
            # one draw the same z from the same seed); kept in float64 for float64 weights
            z = torch.randn(
                rows.stop - start, fan_in, generator=gen, device=weight.device,
                dtype=torch.float32,
            ).to(self.scale.dtype)  # fmt: skip
            yield rows, z.mul_(self.scale[rows, None]).add_(weight[rows])

    def materialise(self, weight: Tensor) -> Tensor:
        """ε in full (out × in, the generation dtype) — for tests and inspection only."""
        return torch.cat([w - weight[rows].to(w.dtype) for rows, w in self.chunks(weight)])


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


class _PerturbedLinear(torch.autograd.Function):
    """y = x (W + ε)ᵀ + b with ε regenerated from the seed in the backward (nothing of the
    size of W is saved). ``weight`` is the stored parameter; ``transposed`` for Conv1D."""

    @staticmethod
    def forward(ctx, x, weight, bias, noise, transposed):  # type: ignore[override]
        dt = _compute_dtype(x, weight)
        w_out = weight.t() if transposed else weight
        xd = x.to(dt)
        bd = bias.to(dt) if bias is not None else None
        parts = [
            nn.functional.linear(xd, w.to(dt), None if bd is None else bd[rows])
            for rows, w in noise.chunks(w_out)
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        ctx.noise, ctx.transposed, ctx.dt = noise, transposed, dt
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dt = ctx.dt
        gy = grad_out.to(dt)
        gx = gw = gb = None
        w_out = weight.t() if ctx.transposed else weight
        if ctx.needs_input_grad[0]:
            for rows, w in ctx.noise.chunks(w_out):
                part = torch.matmul(gy[..., rows], w.to(dt))
                gx = part if gx is None else gx.add_(part)
            gx = gx.to(ctx.x_dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.to(dt).reshape(-1, x.shape[-1])
            g = gy2.t().matmul(x2)  # out × in
            gw = (g.t() if ctx.transposed else g).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = gy2.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None, None


def _perturbed_forward(module: nn.Module, noise: LayerNoise, transposed: bool, x: Tensor):
    return _PerturbedLinear.apply(x, module.weight, module.bias, noise, transposed)


class FlatLoRA(SharpnessAware):
    """Flat-LoRA: a seeded Gaussian perturbation of each LoRA layer's merged weight
    W + s·B A, scaled per row by its norm; one forward/backward per step (see the module
    docstring for every choice).

    Args:
        params: the trainable parameters (the adapters) or an optimizer instance; or use
            ``base=`` as for :class:`effsam.SAM`.
        rho: σ, the noise level (the authors' 0.05). 0: exactly the base optimizer.
        model: the model holding the LoRA layers (a ``peft`` model, or any module: then
            its trainable ``nn.Linear`` / ``Conv1D`` layers are perturbed).
        total_steps: the optimizer steps of the run (the cosine schedule's T).
        sigma_schedule: ``"cosine"`` (the paper's rise from 0 to σ) or ``"constant"``.
        seed: the noise seed (each step's and layer's seed is derived from it).
        chunk_elements: the most elements of W + ε held at once.
    """

    single_pass = True

    def __init__(
        self,
        params: Any = None,
        rho: float = AUTHORS_SIGMA,
        *,
        base: Any = None,
        model: nn.Module,
        total_steps: int | None = None,
        sigma_schedule: str = "cosine",
        seed: int = 0,
        chunk_elements: int = 1 << 22,
        **kwargs: Any,
    ) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        for key in ("mask", "selection", "ascent"):
            if kwargs.get(key) is not None:
                raise ValueError(f"Flat-LoRA takes no {key} policy: its perturbation is random")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Flat-LoRA needs the model (an nn.Module), got {model!r:.80}")
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(
                f"Invalid Flat-LoRA sigma_schedule: {sigma_schedule!r} (choose from "
                f"{', '.join(SIGMA_SCHEDULES)})"
            )
        if sigma_schedule == "cosine" and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(
                "Flat-LoRA's σ rises from 0 to σ on a cosine over the run (the paper's "
                f"schedule): give total_steps (an int >= 1, got {total_steps!r}), or "
                "sigma_schedule='constant'"
            )
        check_seed(seed, "Flat-LoRA")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int):
            raise TypeError(f"Invalid chunk_elements: {chunk_elements!r} (an int >= 1)")
        if chunk_elements < 1:
            raise ValueError(f"Invalid chunk_elements: {chunk_elements!r} (an int >= 1)")
        super().__init__(base, rho, **kwargs)
        self.targets = find_targets(model)
        mine = {id(p) for p in self.params}
        for t in self.targets:
            if t.lora is not None:
                owned = [*t.lora.lora_A.parameters(), *t.lora.lora_B.parameters()]
            else:
                owned = [t.module.weight]
            if not any(id(p) in mine for p in owned if p.requires_grad):
                raise ValueError(
                    f"Flat-LoRA: the trainable parameters of layer {t.name!r} are not in the "
                    "optimizer (build it over the model's trainable parameters)"
                )
        self.total_steps = total_steps
        self.sigma_schedule = sigma_schedule
        self.seed = seed
        self.settings = {"flat_lora": {"seed": seed, "sigma_schedule": sigma_schedule}}
        self.chunk_elements = chunk_elements
        #: σ_t of the last perturbation (None: none yet)
        self.last_sigma: float | None = None
        self._noise: list[LayerNoise] = []
        self._patched: list[nn.Module] = []

    # ------------------------------------------------------------------ σ_t
    def _sigma(self) -> float:
        rhos = {self._rho(g) for g in self.param_groups}
        if len(rhos) != 1:
            raise ValueError(
                f"Flat-LoRA takes one σ for the whole model; the param groups have {sorted(rhos)}"
            )
        return self.sigma_at(self.steps, rhos.pop())

    def sigma_at(self, step: int, sigma: float | None = None) -> float:
        """σ_t at optimizer step ``step`` (0-based), for σ (default: ``rho``)."""
        if sigma is None:
            sigma = self.defaults["rho"]
        if self.sigma_schedule == "cosine":
            assert self.total_steps is not None
            sigma *= cosine_factor(step, self.total_steps)
        return sigma

    # ------------------------------------------------------------------ the perturbation
    @torch.no_grad()
    def row_scales(self, target: _Target, sigma: float) -> Tensor:
        """σ ‖W'_i,:‖₂ / √n for each row i of the layer's merged weight W' = W + Σ s B A,
        computed one row-chunk at a time (no W-sized temporary beyond a chunk)."""
        w = target.weight
        out_features, fan_in = w.shape
        dtype = torch.promote_types(w.dtype, torch.float32)
        deltas = _lora_deltas(target.lora) if target.lora is not None else []
        norms = torch.empty(out_features, dtype=dtype, device=w.device)
        step = max(1, self.chunk_elements // max(fan_in, 1))
        for start in range(0, out_features, step):
            rows = slice(start, min(start + step, out_features))
            merged = w[rows].to(dtype, copy=True)
            for b, a, s in deltas:
                merged.addmm_(b[rows].to(dtype), a.to(dtype), alpha=s)
            norms[rows] = torch.linalg.vector_norm(merged, dim=1)
        return norms.mul_(sigma / math.sqrt(fan_in))

    def noise_for(self, index: int) -> LayerNoise | None:
        """The noise of target ``index`` this step (None outside a perturbed pass)."""
        return self._noise[index] if self._noise else None

    @torch.no_grad()
    def _pre_pass1_perturb(self) -> None:
        self._open_step().pre_pass1_done = True
        sigma = self._sigma()
        self.last_sigma = sigma
        if sigma == 0:
            return  # nothing installed: exactly the base step
        noise = [
            LayerNoise(
                noise_seed(self.seed, self.steps, i), self.row_scales(t, sigma), self.chunk_elements
            )
            for i, t in enumerate(self.targets)
        ]
        self._noise = noise
        try:
            for t, n in zip(self.targets, noise):
                if "forward" in t.module.__dict__:
                    raise RuntimeError(
                        f"Flat-LoRA: layer {t.name!r} already has its forward replaced (an "
                        "offloading or device-map hook?); it cannot be perturbed"
                    )
                t.module.forward = functools.partial(_perturbed_forward, t.module, n, t.transposed)
                self._patched.append(t.module)
        except BaseException:
            self.restore()
            raise

    def _on_restore(self) -> None:
        """Put every perturbed layer's own forward back (the weights were never changed)."""
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched = []
        self._noise = []

    def _single_pass_done(self) -> bool:
        moved = bool(self._patched)
        result = super()._single_pass_done()
        self._open_step().single_pass_moved = moved
        return result

    def extra_repr(self) -> str:
        total = f", total_steps={self.total_steps}" if self.sigma_schedule == "cosine" else ""
        return (
            f"sigma_schedule={self.sigma_schedule}{total}, seed={self.seed}, "
            f"{len(self.targets)} layers"
        )
