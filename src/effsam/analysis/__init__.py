"""Sharpness analysis: Hessian eigenvalue and trace, loss landscapes, plots.

Every function takes ``(model, batch, loss_fn)`` with the convention of
:func:`effsam.sharpness_aware_step`: ``loss_fn(model, batch)`` returns per-sample losses (or a
tuple whose first element is that) and their mean is analysed, with the model in eval mode.

Example:
    >>> from effsam.analysis import hessian_top_eigenvalue, loss_landscape_1d, plot_landscape
    >>> lam = hessian_top_eigenvalue(model, (x, y), loss_fn, iters=50)
    >>> plot_landscape(loss_landscape_1d(model, (x, y), loss_fn), "landscape.png")

The package is the measurements alone: it imports nothing of the toolkit
(:mod:`effsam.train`). Measuring a trained run directory (``effsam analyze RUN_DIR``) is the
toolkit's :func:`effsam.train.analyze_run`. See docs/analysis.md.
"""

from __future__ import annotations

import warnings
from typing import Any

from .evaluation import LossFn, eval_mode
from .hessian import hessian_top_eigenvalue, hessian_trace, hessian_trace_samples
from .landscape import (
    Landscape,
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
)
from .plot import plot_landscape

__all__ = [
    "Landscape",
    "LossFn",
    "eval_mode",
    "filter_normalized_direction",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_trace_samples",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscape",
]


def __getattr__(name: str) -> Any:
    # The one name kept from 0.2, when the run-directory analysis lived here: it resolves
    # to the toolkit's function on first use, with a DeprecationWarning. Nothing in this
    # package imports the toolkit otherwise.
    if name == "analyze_run":
        warnings.warn(
            "effsam.analysis.analyze_run moved to effsam.train.analyze_run (the toolkit); "
            "the old name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        from effsam.train.analyze import analyze_run

        return analyze_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
