"""Schedule policies: whether a step is sharpness-aware or a plain base-optimizer step.

A schedule (the :class:`effsam.optim.policy.Schedule` protocol) is asked once per step,
``decide(grad_sq_norm)``:

* before pass 1 (``decide(None)``, by :meth:`SharpnessAware.begin_step`), for every
  schedule whose decision does not depend on this step's gradient — a plain step is then
  ONE forward and ONE backward, exactly the base optimizer's step, and SWP switches
  nothing off in pass 1;
* or after pass 1 (``needs_grad_norm = True``: ``decide(‖g‖²)`` with the squared norm of
  the pass-1 gradient; AE-SAM). Pass 1 is then dense (the plain branch needs every
  gradient), so SWP's pass-1 saving is lost; its ε is unchanged.

``t`` counts the steps decided so far (skipped steps included, a step that raised
excluded: :meth:`SharpnessAware.abort_step` rolls the schedule back). Every piece of state
that a decision depends on — ``t``, a generator, running statistics — is in
``state_dict``, so a resumed run decides exactly as an uninterrupted one.

* :class:`EveryStep` — SAM at every step (the default).
* :class:`Interval` — every k-th step (MosaicML composer's SAM ``interval``).
* :class:`Late` — plain steps, then sharpness-aware from a fraction of training on
  (Zhou et al., ICLR 2025).
* :class:`Randomized` — a Bernoulli trial per step with a scheduled probability
  (RST / G-RST, Zhao et al., 2022).
* :class:`AdaptiveSchedule` — AE-SAM (Jiang et al., ICLR 2023): sharpness-aware when the
  squared gradient norm is high relative to its running mean and variance.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._random import SeededPolicy
from ._ranking import round_half_up
from ._validate import check_fraction, check_int
from .policy import Policy


class EveryStep(Policy):
    """Every step is sharpness-aware (SAM, ESAM, SSAM as published)."""

    name = "every-step"
    #: True: the decision needs this step's pass-1 gradient norm (``decide(‖g‖²)``, after
    #: pass 1); False: ``decide(None)``, before it.
    needs_grad_norm = False
    #: True: the schedule needs the run's total number of steps.
    needs_total_steps = False

    def __init__(self) -> None:
        self.t = 0

    def decide(self, grad_sq_norm: float | None = None) -> bool:
        """Step ``t``: sharpness-aware (True) or a plain base step (False). ``grad_sq_norm``
        is ‖g‖² of pass 1 for a ``needs_grad_norm`` schedule, None (before pass 1) for the
        others, which ignore it."""
        return True

    def commit(self) -> None:
        """The step decided last has finished (stepped or skipped)."""
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])


class Interval(EveryStep):
    """Sharpness-aware on every k-th step: steps t with t mod k = offset.

    composer's SAM (``interval=k``) runs SAM when (t + 1) mod k = 0, i.e. ``offset = k - 1``
    (the default); LookSAM refreshes on t mod k = 0 (``offset = 0``).
    """

    name = "interval"

    def __init__(self, every: int = 10, offset: int | None = None) -> None:
        super().__init__()
        self.every = check_int(every, "interval", 1)
        offset = self.every - 1 if offset is None else offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < every:
            raise ValueError(f"Invalid interval offset: {offset!r} (must be in [0, {every}))")
        self.offset = offset

    def decide(self, grad_sq_norm: float | None = None) -> bool:
        return self.t % self.every == self.offset

    def extra_repr(self) -> str:
        return f"every={self.every}, offset={self.offset}"


class Late(EveryStep):
    """Plain steps until ``start · total_steps``, then sharpness-aware to the end.

    Zhou et al. (ICLR 2025) switch from SGD to SAM at epoch 175 of 200 (``start = 0.875``,
    the default) with the learning-rate schedule running on unchanged. The switch step is
    round(start · T), rounding half up; ``start = 0`` is SAM throughout, ``start = 1``
    never perturbs.
    """

    name = "late"
    needs_total_steps = True

    def __init__(self, start: float = 0.875, total_steps: int | None = None) -> None:
        super().__init__()
        self.start = check_fraction(start, "late start", "[0, 1]")
        if total_steps is None:
            raise ValueError(
                "the late schedule needs total_steps (epochs x steps per epoch); the toolkit "
                "passes it, a hand-built optimizer must give it"
            )
        self.total_steps = check_int(total_steps, "total_steps", 1)
        self.switch = round_half_up(self.start * self.total_steps)

    def decide(self, grad_sq_norm: float | None = None) -> bool:
        return self.t >= self.switch

    def extra_repr(self) -> str:
        return f"start={self.start}, total_steps={self.total_steps}, switch={self.switch}"


#: G-RST's scheduling functions p(t) of the progress x = t / T (Zhao et al., 2022).
PROBABILITY_SCHEDULES = ("constant", "linear", "step")


class Randomized(EveryStep, SeededPolicy):
    """RST / G-RST: step t is sharpness-aware with probability p(t) (a Bernoulli trial).

    p(t) with x = t / T and the schedule's bounds p_min ≤ p_max:

    * ``"constant"``: p(t) = p_max;
    * ``"linear"``:   p(t) = p_min + (p_max − p_min) · x;
    * ``"step"``:     p(t) = p_min for x < 1/2, p_max afterwards.

    The trial draws from a generator owned by the schedule (seedable; in ``state_dict``);
    under data parallel every worker draws the same decision from equal seeds.
    """

    name = "random"
    stream = "rst"

    def __init__(
        self,
        probability: float = 0.5,
        *,
        probability_schedule: str = "constant",
        min_probability: float = 0.0,
        total_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        schedule = probability_schedule
        if schedule not in PROBABILITY_SCHEDULES:
            raise ValueError(
                f"Invalid RST probability_schedule: {schedule!r} (choose from "
                f"{', '.join(PROBABILITY_SCHEDULES)})"
            )
        self.p_max = check_fraction(probability, "RST probability", "[0, 1]")
        self.p_min = check_fraction(min_probability, "RST min_probability", "[0, 1]")
        if self.p_min > self.p_max:
            raise ValueError(
                f"Invalid RST probabilities: min_probability {min_probability!r} > "
                f"probability {probability!r}"
            )
        self.schedule = schedule
        if schedule != "constant" and total_steps is None:
            raise ValueError(f"the {schedule!r} RST schedule needs total_steps")
        self.total_steps = None if total_steps is None else check_int(total_steps, "total_steps", 1)
        self._seed_stream(seed, "RST")

    @property
    def needs_total_steps(self) -> bool:  # type: ignore[override]
        return self.schedule != "constant"

    def probability(self, t: int) -> float:
        """p(t) of the schedule."""
        if self.schedule == "constant":
            return self.p_max
        assert self.total_steps is not None
        x = min(1.0, t / self.total_steps)
        if self.schedule == "linear":
            return self.p_min + (self.p_max - self.p_min) * x
        return self.p_min if x < 0.5 else self.p_max

    def decide(self, grad_sq_norm: float | None = None) -> bool:
        u = torch.rand((), generator=self.generator, dtype=torch.float64)
        return bool(u < self.probability(self.t))

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self._load_generator(state["generator"], "RST")

    def extra_repr(self) -> str:
        return (
            f"probability={self.p_max}, schedule={self.schedule!r}, "
            f"min_probability={self.p_min}, seed={self.seed}"
        )


class AdaptiveSchedule(EveryStep):
    """AE-SAM (Jiang et al., ICLR 2023): SAM where the squared gradient norm is high.

    With x_t = ‖g_t‖² of this step's pass-1 gradient and δ the EMA rate::

        μ_t  = δ μ_{t−1} + (1 − δ) x_t
        σ²_t = δ σ²_{t−1} + (1 − δ) (x_t − μ_t)²
        c_t  = (t / T) λ1 + (1 − t / T) λ2
        step t is sharpness-aware  ⇔  x_t ≥ μ_t + c_t σ_t

    With the defaults λ1 = −1, λ2 = 1 the threshold falls from μ + σ to μ − σ over
    training, so sharpness-aware steps become more frequent late in training. μ is updated
    with x_t before σ², and both before the comparison; μ and σ² start at 0 (the first step
    is sharpness-aware). A non-finite x_t does not enter the statistics (that step is
    skipped anyway).
    """

    name = "adaptive"
    needs_grad_norm = True
    needs_total_steps = True

    def __init__(
        self,
        *,
        total_steps: int | None = None,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
    ) -> None:
        super().__init__()
        if total_steps is None:
            raise ValueError("the adaptive (AE-SAM) schedule needs total_steps")
        self.total_steps = check_int(total_steps, "total_steps", 1)
        if not (isinstance(delta, (int, float)) and 0.0 <= delta < 1.0):
            raise ValueError(f"Invalid AE-SAM delta: {delta!r} (must be in [0, 1))")
        for name, v in (("lambda1", lambda1), ("lambda2", lambda2)):
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"Invalid AE-SAM {name}: {v!r} (must be a finite number)")
        self.delta = float(delta)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.mean = 0.0
        self.var = 0.0

    def threshold(self, t: int) -> float:
        """c_t, linear in the progress t / T: λ2 at the start, λ1 at the end."""
        x = min(1.0, t / self.total_steps)
        return x * self.lambda1 + (1.0 - x) * self.lambda2

    def decide(self, grad_sq_norm: float | None = None) -> bool:
        if grad_sq_norm is None:
            raise RuntimeError(
                "the adaptive schedule decides after pass 1, from its squared gradient norm: "
                "decide(grad_sq_norm)"
            )
        x = float(grad_sq_norm)
        if not math.isfinite(x):
            return True  # the step is skipped; the statistics stay clean
        d = self.delta
        self.mean = d * self.mean + (1.0 - d) * x
        self.var = d * self.var + (1.0 - d) * (x - self.mean) ** 2
        return x >= self.mean + self.threshold(self.t) * math.sqrt(self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])

    def extra_repr(self) -> str:
        return (
            f"delta={self.delta}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"total_steps={self.total_steps}"
        )


#: Schedules by name, for ``create_optimizer(..., schedule="late", start=0.8)`` and configs.
SCHEDULES: dict[str, type[EveryStep]] = {
    "every-step": EveryStep,
    "interval": Interval,
    "late": Late,
    "random": Randomized,
    "adaptive": AdaptiveSchedule,
}
