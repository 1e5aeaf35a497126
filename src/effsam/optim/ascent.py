"""The ascent: ascent policies and the one functional kernel that forms ε and loads θ + ε.

Every ascent here has the form, with a per-element preconditioner T (1 for SAM)::

    n = T ⊙ g                     the norm terms: ‖n‖₂ normalises the ascent
    a = T ⊙ n = T² ⊙ g            the direction
    ε = c · m ⊙ a / (‖n'‖₂ + δ)   c = ρ · scale per param group; m an optional 0/1 mask;
                                  n' = m ⊙ n when the mask policy normalises by the kept
                                  elements, else n

SAM (Foret et al., ICLR 2021): T = 1. ASAM (Kwon et al., ICML 2021): T = |θ| + η.

:func:`ascend_` works in place, in the torch/optim style: the tensors are grouped by device
and dtype, each group's per-tensor norms are taken in (at least) float32, the global norm
is formed once, and the coefficient is moved to each group's device. The pass-1 gradients
are consumed: ε is formed IN them (the caller discards them right after), and T is formed
in the θ-backup buffers before they receive θ. So a step allocates nothing of the size of
the parameters beyond the backup; element masks are applied as bool tensors (``where``,
which makes no float copy of them).

``foreach=True`` runs the ``torch._foreach_*`` kernels; ``foreach=False`` runs the same
operations tensor by tensor, kept as the readable reference (a test checks that the two
agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._validate import check_non_negative
from .policy import Policy

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class L2Ascent(Policy):
    """SAM's ascent (Foret et al., ICLR 2021): ε = ρ g / (‖g‖₂ + δ)  (T = 1)."""

    name = "l2"

    def scales_(self, params: Sequence[Tensor], out: Sequence[Tensor], foreach: bool) -> bool:
        """Write the preconditioner T of each parameter into ``out`` (same shapes and
        dtypes); return False when T = 1 (then ``out`` is left untouched)."""
        return False

    def mul_scales_(
        self, params: Sequence[Tensor], tensors: Sequence[Tensor], thetas: Sequence[Tensor]
    ) -> bool:
        """``tensors[i] ← tensors[i] ⊙ T_i`` with T computed from ``thetas[i]`` (the values
        of ``params[i]``, which may hold something else by now), a chunk at a time, so no
        parameter-sized temporary is made. Return False when T = 1 (nothing done)."""
        return False


class AdaptiveAscent(L2Ascent):
    """ASAM's ascent: with T = |θ| + η, ε = ρ T² g / (‖T g‖₂ + δ).

    Args:
        eta: offset added to |θ| (Kwon et al. use it so that zero weights can still be
            perturbed; their code's default is 0.01); the default 0 is the formula in the
            ASAM paper's main text.
        only: if given, the tensors T applies to; every other tensor gets T = 1. The ASAM
            authors' code makes only the parameters whose name contains ``"weight"``
            adaptive (biases get T = 1): :func:`effsam.asam_reference_params` selects them.
    """

    name = "adaptive"

    def __init__(self, eta: float = 0.0, only: Sequence[Tensor] | None = None) -> None:
        self.eta = check_non_negative(eta, "ASAM eta")
        self._only: set[int] | None = None if only is None else {id(p) for p in only}

    def scales_(self, params: Sequence[Tensor], out: Sequence[Tensor], foreach: bool) -> bool:
        if self._only is not None:
            for p, t in zip(params, out):
                if id(p) in self._only:
                    torch.abs(p, out=t)
                    if self.eta:
                        t.add_(self.eta)
                else:
                    t.fill_(1.0)
            return True
        if foreach:
            torch._foreach_copy_(list(out), list(params))
            torch._foreach_abs_(list(out))
            if self.eta:
                torch._foreach_add_(list(out), self.eta)
        else:
            for p, t in zip(params, out):
                torch.abs(p, out=t)
                if self.eta:
                    t.add_(self.eta)
        return True

    def mul_scales_(
        self, params: Sequence[Tensor], tensors: Sequence[Tensor], thetas: Sequence[Tensor]
    ) -> bool:
        for p, t, theta in zip(params, tensors, thetas):
            if self._only is not None and id(p) not in self._only:
                continue  # T = 1
            for tc, thc in zip(_chunks(t), _chunks(theta)):
                scale = torch.abs(thc)  # the same operations as scales_: |θ|, then + η
                if self.eta:
                    scale.add_(self.eta)
                tc.mul_(scale)
                del scale  # before the next chunk's is allocated
        return True

    def extra_repr(self) -> str:
        only = "" if self._only is None else f", only={len(self._only)} tensors"
        return f"eta={self.eta}{only}"


def _chunks(t: Tensor) -> list[Tensor]:
    """Views of ``t`` of about NORM_CHUNK elements covering it (along dim 0 when it is not
    contiguous, e.g. channels_last), for elementwise work in place."""
    if t.dim() == 0 or t.is_contiguous():
        return list(t.view(-1).split(NORM_CHUNK))
    return list(t.split(max(1, NORM_CHUNK // max(1, t[0].numel()))))


def asam_reference_params(model: torch.nn.Module) -> list[Tensor]:
    """The parameters the ASAM authors' code makes adaptive: those whose name contains
    ``"weight"`` (biases get T = 1). For ``AdaptiveAscent(only=...)`` /
    ``ASAM(adaptive_only=...)``."""
    return [p for name, p in model.named_parameters() if "weight" in name]


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), each group in the input order,
    the groups in order of first appearance."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    # Half precision: norms in float32 (a float16 norm overflows above 65 504 although
    # every element is finite); float32 and float64 in their own dtype.
    return torch.float32 if dtype in _LOW_PRECISION else None


#: Half-precision tensors get their float32 norm in chunks of at most this many elements
#: (and at most half the tensor), so the upcast never holds more than 256 kB, nor more than
#: the tensor's own bytes, at a time.
NORM_CHUNK = 1 << 16


def _norm_chunk(numel: int) -> int:
    return max(1, min(NORM_CHUNK, numel // 2))


def _scratch_f32(buf: Tensor | None) -> Tensor | None:
    """The bytes of a 2-byte (half-precision) buffer seen as float32 (half its element
    count), to upcast into; None when it cannot be (not contiguous, too small)."""
    if buf is None or buf.element_size() != 2 or not buf.is_contiguous() or buf.numel() < 2:
        return None
    flat = buf.view(-1)
    try:
        return flat[: flat.numel() // 2 * 2].view(torch.float32)
    except RuntimeError:  # a misaligned view
        return None


def _half_norm(t: Tensor, dtype: torch.dtype, scratch: Tensor | None) -> Tensor:
    """‖t‖ of a half-precision tensor accumulated in ``dtype``, a chunk at a time.

    With ``scratch`` (a float32 view of a buffer whose contents are free, e.g. the θ
    backup before the ascent writes it) each chunk is upcast into it: nothing is
    allocated. Without it, each chunk's upcast is a temporary of its size. Both give the
    same value bit for bit (the same chunks, the same float32 operands)."""
    chunks = t.reshape(-1).split(_norm_chunk(t.numel()))
    if scratch is not None and scratch.numel() < chunks[0].numel():
        scratch = None
    parts = []
    for c in chunks:
        if scratch is None:
            parts.append(torch.linalg.vector_norm(c, dtype=dtype))
        else:
            s = scratch[: c.numel()]
            s.copy_(c)
            parts.append(torch.linalg.vector_norm(s))
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def _tensor_norms(
    tensors: Sequence[Tensor], foreach: bool, scratch: Sequence[Tensor | None] | None = None
) -> list[Tensor]:
    """Per-tensor L2 norms, in the input order, each in (at least) float32. ``scratch``:
    per tensor a buffer of its size and dtype whose contents may be overwritten (used by
    half-precision tensors only, to upcast into without allocating)."""
    norms: list[Tensor | None] = [None] * len(tensors)
    for idx in group_by_device_and_dtype(tensors):
        dtype = _norm_dtype(tensors[idx[0]].dtype)
        if dtype is not None:
            # Half precision: float32 accumulation through linalg.vector_norm, in chunks
            # (torch._foreach_norm's dtype argument upcasts each whole tensor).
            for i in idx:
                buf = _scratch_f32(scratch[i]) if scratch is not None else None
                norms[i] = _half_norm(tensors[i], dtype, buf)
            continue
        group = [tensors[i] for i in idx]
        out = (
            torch._foreach_norm(group, 2)
            if foreach
            else [torch.linalg.vector_norm(t) for t in group]
        )
        for i, n in zip(idx, out):
            norms[i] = n
    return norms  # type: ignore[return-value]


def _stack_norm(norms: Sequence[Tensor]) -> Tensor:
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def global_norm(tensors: Sequence[Tensor], foreach: bool) -> Tensor:
    """One L2 norm over all tensors jointly (never per layer), as a 0-d tensor on the first
    tensor's device, accumulated in (at least) float32."""
    if not tensors:
        raise ValueError("global_norm of an empty list")
    return _stack_norm(_tensor_norms(tensors, foreach))


def _mask_(tensors: Sequence[Tensor], masks: Sequence[Tensor | None]) -> None:
    """t ← m ⊙ t for bool masks, in place (``where`` reads the bool mask as it is; a
    multiply would first make a float copy of it)."""
    for t, m in zip(tensors, masks):
        if m is not None:
            torch.where(m, t, t.new_zeros(()), out=t)


def _mul_(tensors: list[Tensor], factors: list[Tensor], foreach: bool) -> None:
    if not tensors:
        return
    if foreach:
        torch._foreach_mul_(tensors, factors)
    else:
        for t, f in zip(tensors, factors):
            t.mul_(f)


@torch.no_grad()
def ascend_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    *,
    coefs: Sequence[float],
    ascent: L2Ascent,
    masks: Sequence[Tensor | None] | None = None,
    normalise_masked: bool = True,
    eps_denominator: float = 1e-12,
    foreach: bool = True,
    check_finite: bool = True,
    keep_grads: bool = False,
) -> tuple[bool, Tensor]:
    """θ ← θ + ε in place; the θ copy goes into ``backups``.

    With T from ``ascent`` and c = ``coefs[i]`` (ρ · scale of tensor i's param group)::

        g ← T ⊙ g;  g ← m ⊙ g (if normalise_masked);  N = ‖g‖₂ over all tensors
        g ← T ⊙ g;  g ← m ⊙ g;  backup ← θ;  g ← (c / (N + δ)) · g;  θ ← θ + g

    Args:
        params: the tensors to perturb (θ).
        grads: their pass-1 gradients; CONSUMED: on return they hold ε (or, when the step
            is refused, intermediate values).
        backups: buffers of the parameters' shapes and dtypes; on success they hold θ.
        coefs: per tensor, ρ · scale of its group (the numerator of the coefficient).
        ascent: the ascent policy (T).
        masks: per tensor a bool mask, or None (no mask for that tensor / for all).
        normalise_masked: normalise by the masked norm terms (True) or by all of them.
        eps_denominator: δ.
        foreach: foreach kernels (True) or the per-tensor reference loop (False).
        check_finite: refuse the step when the norm is not finite.
        keep_grads: leave ``grads`` as they were: θ is copied into the backups first and
            ε is formed in the parameters themselves (T a chunk at a time, through the
            policy's ``mul_scales_``), so this too allocates nothing of the parameters'
            size; the result is the same, bit for bit.

    Returns:
        (done, N): ``done`` is False when the norm was not finite and ``check_finite``
        is set; then ``params`` are untouched and ``backups`` hold no θ.
    """
    params, grads, backups = list(params), list(grads), list(backups)
    if not params:
        raise ValueError("ascend_ needs at least one tensor")
    if not (len(params) == len(grads) == len(backups) == len(coefs)):
        raise ValueError("ascend_: params, grads, backups and coefs differ in length")
    if keep_grads:
        return _ascend_keeping_grads(
            params, grads, backups, coefs, ascent, masks, normalise_masked, eps_denominator,
            foreach, check_finite,
        )  # fmt: skip
    groups = group_by_device_and_dtype(params)
    scaled: list[bool] = []
    for idx in groups:
        ps = [params[i] for i in idx]
        bs = [backups[i] for i in idx]
        has_t = ascent.scales_(ps, bs, foreach)  # T into the backup buffers
        scaled.append(has_t)
        if has_t:
            _mul_([grads[i] for i in idx], bs, foreach)  # g ← T ⊙ g: the norm terms
    if masks is not None and normalise_masked:
        _mask_(grads, masks)
    # the backups are free work space unless they hold T: upcast half-precision chunks
    # for the norm into them (nothing allocated)
    scratch: list[Tensor | None] = list(backups)
    for idx, has_t in zip(groups, scaled):
        for i in idx if has_t else ():
            scratch[i] = None
    norm = _stack_norm(_tensor_norms(grads, foreach, scratch))
    if check_finite and not bool(torch.isfinite(norm)):
        return False, norm
    for idx, has_t in zip(groups, scaled):
        if has_t:
            _mul_([grads[i] for i in idx], [backups[i] for i in idx], foreach)  # T² ⊙ g
    if masks is not None:
        _mask_(grads, masks)
    denom = norm + eps_denominator
    for idx in groups:
        ps = [params[i] for i in idx]
        _copy_([backups[i] for i in idx], ps, foreach)
        by_coef: dict[float, list[int]] = {}
        for i in idx:
            by_coef.setdefault(coefs[i], []).append(i)
        device = ps[0].device
        for c, sub in by_coef.items():
            coef = (c / denom).to(device)
            gs = [grads[i] for i in sub]
            if foreach:
                torch._foreach_mul_(gs, coef)
                torch._foreach_add_([params[i] for i in sub], gs)
            else:
                for i, g in zip(sub, gs):
                    g.mul_(coef)
                    params[i].add_(g)
    return True, norm


def _copy_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    """dst ← src, tensor by tensor (one foreach kernel, or a loop)."""
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, t in zip(dst, src):
            d.copy_(t)


def _ascend_keeping_grads(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    coefs: Sequence[float],
    ascent: L2Ascent,
    masks: Sequence[Tensor | None] | None,
    normalise_masked: bool,
    eps_denominator: float,
    foreach: bool,
    check_finite: bool,
) -> tuple[bool, Tensor]:
    """:func:`ascend_` that leaves the gradients: the parameters are the work space.

    backup ← θ;  θ ← g;  θ ← T ⊙ θ;  θ ← m ⊙ θ (if normalise_masked);  N = ‖θ‖₂;
    θ ← T ⊙ θ;  θ ← m ⊙ θ;  θ ← (c / (N + δ)) · θ;  θ ← θ + backup.

    Each product is the one :func:`ascend_` forms in the gradients (the same operands in
    the same order, T recomputed from the backup), so the two agree bit for bit. A
    refused step copies θ back from the backup."""
    groups = group_by_device_and_dtype(params)
    for idx in groups:
        ps = [params[i] for i in idx]
        _copy_([backups[i] for i in idx], ps, foreach)
        _copy_(ps, [grads[i] for i in idx], foreach)
    scaled = [ascent.mul_scales_(params, params, backups)]
    if masks is not None and normalise_masked:
        _mask_(params, masks)
    norm = _stack_norm(_tensor_norms(params, foreach))
    if check_finite and not bool(torch.isfinite(norm)):
        for idx in groups:
            _copy_([params[i] for i in idx], [backups[i] for i in idx], foreach)
        return False, norm
    if scaled[0]:
        ascent.mul_scales_(params, params, backups)
    if masks is not None:
        _mask_(params, masks)
    denom = norm + eps_denominator
    for idx in groups:
        by_coef: dict[float, list[int]] = {}
        for i in idx:
            by_coef.setdefault(coefs[i], []).append(i)
        device = params[idx[0]].device
        for c, sub in by_coef.items():
            coef = (c / denom).to(device)
            ps = [params[i] for i in sub]
            bs = [backups[i] for i in sub]
            if foreach:
                torch._foreach_mul_(ps, coef)
                torch._foreach_add_(ps, bs)
            else:
                for p, b in zip(ps, bs):
                    p.mul_(coef)
                    p.add_(b)
    return True, norm
