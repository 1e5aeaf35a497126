"""Pictures of a :class:`~effsam.analysis.landscape.Landscape` (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from .landscape import Landscape

__all__ = ["plot_landscape"]


def plot_landscape(result: Landscape, path: str | Path, title: str = "") -> None:
    """Writes a 1D landscape as a line and a 2D one as a filled contour plot.

    The trained weights (the origin) are marked. The format follows the file name's
    extension (PNG, PDF, SVG, …).

    Args:
        result: What :func:`loss_landscape_1d` or :func:`loss_landscape_2d` returned.
        path: The image file to write.
        title: Shown above the plot.
    """
    # Imported here so the rest of the package works without matplotlib. A Figure with
    # its own Agg canvas draws off-screen without pyplot, so the caller's backend and
    # pyplot's figure list are left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    alphas = result.alphas.numpy()
    if result.betas is None:
        ax.plot(alphas, result.losses.numpy(), marker="o", markersize=3)
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("α (filter-normalised direction)")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
    else:
        # losses[i, j] is at (alphas[i], betas[j]): rows along x, so transpose for contourf
        filled = ax.contourf(alphas, result.betas.numpy(), result.losses.numpy().T, levels=20)
        fig.colorbar(filled, ax=ax, label="loss")
        ax.plot([0.0], [0.0], marker="+", color="white", markersize=10)
        ax.set_xlabel("α (first direction)")
        ax.set_ylabel("β (second direction)")
        ax.set_aspect("equal")
    ax.set_title(title or f"loss landscape ({result.dims}D, seed {result.seed})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
