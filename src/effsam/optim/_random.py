"""Seeded random streams of the policies that draw (SWP, SSAM-D, RST, the random-subset
control, the ascent slice).

Every such policy owns one CPU generator. Its seed is *derived* from the seed the user
gives (the optimizer's ``seed`` / ``ascent_seed``) and the policy's stream name, so that
two policies of one optimizer never draw the same numbers even when they are given the
same seed (ESAM's SWP mask and its random-subset control, RST's schedule and SWP at their
default seed 0). Equal seeds still give equal streams on every data-parallel worker.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validate import check_seed

__all__ = ["SeededPolicy", "cpu_generator_state", "stream_seed"]


def stream_seed(seed: int, stream: str) -> int:
    """The generator seed of the stream ``stream`` of a run seeded ``seed``: 64 bits of a
    hash of (seed, stream), so that distinct streams are independent for one seed."""
    digest = hashlib.blake2b(f"effsam:{stream}:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def cpu_generator_state(state: Any, who: str) -> Tensor:
    """A CPU generator's state as ``Generator.set_state`` wants it: a CPU uint8 tensor.

    Frameworks move a whole optimizer state dict to the training device before loading it
    (accelerate's ``prepare`` does), which would otherwise make ``set_state`` fail.
    """
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        raise TypeError(
            f"Invalid {who} generator state: expected a uint8 tensor, got "
            f"{getattr(state, 'dtype', type(state).__name__)}"
        )
    return state.detach().to("cpu")


class SeededPolicy:
    """A policy that owns one seeded CPU generator (:attr:`generator`), its stream named
    :attr:`stream`. :attr:`seed` is the seed the user gave; the generator's own seed is
    :func:`stream_seed` (seed, stream)."""

    #: the name of the policy's random stream (distinct for every seeded policy class)
    stream: ClassVar[str]
    seed: int
    generator: torch.Generator

    def _seed_stream(self, seed: Any, who: str) -> None:
        """Check ``seed`` (errors name ``who``) and build the policy's generator from it."""
        self.seed = check_seed(seed, who)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(stream_seed(self.seed, self.stream))

    def _load_generator(self, state: Any, who: str) -> None:
        """Set the generator to a saved state (type-checked, moved to the CPU)."""
        self.generator.set_state(cpu_generator_state(state, who))
