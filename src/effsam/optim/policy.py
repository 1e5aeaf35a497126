"""The common base of the ascent, mask and selection policies."""

from __future__ import annotations

from typing import Any


class Policy:
    """A named, optionally stateful piece of a :class:`~effsam.SharpnessAware` optimizer.

    Stateful policies (SWP's generator, SSAM's mask) override ``state_dict`` and
    ``load_state_dict``; the optimizer saves them with its own state.
    """

    name = "policy"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_repr(self) -> str:
        return ""
