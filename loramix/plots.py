"""Figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .io.outputs import atomic_write

if TYPE_CHECKING:  # check_figure_path runs before the work, and needs no pandas
    import pandas as pd


def check_figure_path(path: str | Path) -> None:
    """Refuse (one line naming it) a figure path whose extension matplotlib
    cannot write, before the work that the figure would show."""
    from matplotlib.backend_bases import FigureCanvasBase

    from .errors import OutputError

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise OutputError(path, f"cannot write a .{fmt} figure; use one of .{', .'.join(sorted(known))}")


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is at least ``x``
    (at least 1e-3: a colour scale for cosines)."""
    x = max(float(x), 1e-3)
    e = math.floor(math.log10(x))
    for m in (1, 2, 5):
        if m * 10.0**e >= x * (1 - 1e-12):
            return m * 10.0**e
    return 10.0 ** (e + 1)


#: longest tick label of the heatmap, in characters (longer names are shortened in the middle)
LABEL_CHARS = 32


def short_labels(names, width: int = LABEL_CHARS) -> list[str]:
    """Tick labels of at most ``width`` characters, still telling the names
    apart: a long one keeps its end (a path's folder and name, where names
    that collide are told apart), or its start and end where the ends alone
    collide; names that stay alike either way are kept whole."""
    names = [str(n) for n in names]
    for head in (0, width // 3):
        tail = width - 1 - head
        out = [n if len(n) <= width else n[:head] + "…" + n[-tail:] for n in names]
        if len(set(out)) == len(set(names)):
            return out
    return names


def similarity_heatmap(
    df: pd.DataFrame,
    path: str | Path,
    title: str = "RMS cosine similarity",
    vmin: float = 0.0,
    vmax: float | None = None,
    *,
    label: str = "RMS cosine",
    replace: bool = True,
) -> Path:
    """Write an annotated heatmap of a square matrix (e.g. ``SimilarityResult.rms``).

    The diagonal (each adapter with itself: 1) is drawn in grey, outside the
    colour scale, so the off-diagonal values use all of it: ``[vmin, vmax]``,
    with ``vmax`` by default the largest off-diagonal value rounded up to 1,
    2 or 5 times a power of ten (real adapters' cosines are often below 0.1,
    one flat colour on a 0-1 scale). Cells show the value to 2 decimals, 3
    where ``vmax < 0.1`` (``n/a`` for NaN: no shared module with a cosine),
    up to 25 adapters; above, cells are bare and a NaN one is white, which the
    colour bar's label says. The colour bar is labelled ``label``; names longer than
    :data:`LABEL_CHARS` are shortened (:func:`short_labels`). Use ``vmin=-1`` for the signed
    mean. Without ``replace``, a file at ``path`` when the figure is done
    (made meanwhile) is left as it is and an
    :class:`~loramix.errors.OutputError` raised.
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
    diag = np.eye(n, dtype=bool) & (df.index.to_numpy()[:, None] == df.columns.to_numpy()[None, :])
    off = vals[~diag & np.isfinite(vals)]
    if vmax is None:
        vmax = nice_ceiling(float(np.abs(off).max()) if off.size else 1.0)
    ax.imshow(np.where(diag, 1.0, np.nan), cmap="Greys", vmin=0, vmax=4)  # the diagonal: light grey
    im = ax.imshow(np.ma.masked_invalid(np.where(diag, np.nan, vals)), cmap="viridis", vmin=vmin, vmax=vmax)
    # Names that collide are told apart by their full paths: a label of 60+
    # characters took the whole figure and squeezed the matrix to nothing.
    ax.set_xticks(range(n), labels=short_labels(df.columns), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=short_labels(df.index))
    ax.set_title(title)
    # Annotate only while cells stay legible.
    if n <= 25:
        fs = 10 if n <= 8 else max(5, 10 - (n - 8) // 3)
        mid = (vmin + vmax) / 2
        digits = 2 if not off.size or np.abs(off).max() >= 0.1 else 3
        for i in range(n):
            for j in range(n):
                v = vals[i, j]
                text = "n/a" if math.isnan(v) else f"{v:.{digits}f}"
                light = diag[i, j] or math.isnan(v) or v > mid
                ax.text(
                    j, i, text, ha="center", va="center", color="black" if light else "white", fontsize=fs
                )
    # Above 25 adapters cells carry no text, so a pair with no cosine (white) needs the key.
    keys = ["diagonal: grey"] if diag.any() else []
    keys += ["white: n/a"] if n > 25 and np.isnan(vals[~diag]).any() else []
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label + (f" ({'; '.join(keys)})" if keys else ""))
    fig.tight_layout()
    # Written beside the target and renamed: never a half-written figure.
    try:
        with atomic_write(path, "wb", replace=replace) as f:
            fig.savefig(f, dpi=120, format=(path.suffix.lstrip(".") or "png"), bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
