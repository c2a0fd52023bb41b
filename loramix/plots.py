"""Figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .io.outputs import atomic_write


def check_figure_path(path: str | Path) -> None:
    """Refuse (one line naming it) a figure path whose extension matplotlib
    cannot write, before the work that the figure would show."""
    from matplotlib.backend_bases import FigureCanvasBase

    from .errors import OutputError

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise OutputError(path, f"cannot write a .{fmt} figure; use one of .{', .'.join(sorted(known))}")


def similarity_heatmap(
    df: pd.DataFrame,
    path: str | Path,
    title: str = "RMS cosine similarity",
    vmin: float = 0.0,
    vmax: float = 1.0,
    *,
    replace: bool = True,
) -> Path:
    """Write an annotated heatmap of a square matrix (e.g. ``SimilarityResult.rms``).

    Cells show the value to 2 decimals (``n/a`` for NaN: no shared module
    with a cosine). The colour range is fixed to ``[vmin, vmax]`` so figures
    of different runs compare; use ``vmin=-1`` for the signed mean. Without
    ``replace``, a file at ``path`` when the figure is done (made meanwhile)
    is left as it is and an :class:`~loramix.errors.OutputError` raised.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    n = len(df)
    size = max(4.0, min(0.55 * n + 2.5, 30.0))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    vals = df.to_numpy(dtype=float)
    im = ax.imshow(np.ma.masked_invalid(vals), cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(
        range(n), labels=[str(c) for c in df.columns], rotation=45, ha="right", rotation_mode="anchor"
    )
    ax.set_yticks(range(n), labels=[str(i) for i in df.index])
    ax.set_title(title)
    # Annotate only while cells stay legible.
    if n <= 25:
        fs = 10 if n <= 8 else max(5, 10 - (n - 8) // 3)
        mid = (vmin + vmax) / 2
        for i in range(n):
            for j in range(n):
                v = vals[i, j]
                text = "n/a" if math.isnan(v) else f"{v:.2f}"
                color = "black" if (not math.isnan(v) and v > mid) else "white"
                if math.isnan(v):
                    color = "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fs)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    # Written beside the target and renamed: never a half-written figure.
    try:
        with atomic_write(path, "wb", replace=replace) as f:
            fig.savefig(f, dpi=120, format=(path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path
