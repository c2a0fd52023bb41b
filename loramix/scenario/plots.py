"""The scenario report's figures (matplotlib, Agg backend, PNG).

* ``delta_vs_cosine``: delta_ppl% of the naive sum against the composition's
  RMS cosine, one point per composition (mean over seeds, bars = one standard
  deviation; marker by composition size), labelled, with the least-squares
  line of the fit.
* ``cosine_by_layer``: the RMS cosine of each domain pair per layer
  (``sqrt(mean cos_m^2)`` over the pair's modules in that layer).
* ``delta_by_method``: delta_ppl% per composition for every merge method.
* ``predicted_vs_measured``: held-out predictions of the best predictor with
  their intervals against the measured target.
* ``interference_by_method``: the targets' spread per merge method (box plots).
* ``plan_vs_random``: the retention % of random groupings (a histogram) and of
  ``loramix plan``'s grouping (a line).
* ``kept_gain_heatmap``: per adapter label, the share of the worse member's
  gain each pair's best merge keeps, domain x domain (:mod:`.compose`).
* ``cluster_order``: the clustered order of the similarity heatmap.

The similarity heatmap is :func:`loramix.plots.similarity_heatmap`.
:func:`drawn` keeps each figure's PNG in the scenario cache, keyed by what it
is drawn from, so a rerun of a finished study copies them instead of
drawing them (and imports no matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

_K_MARKERS = {2: "o", 3: "^", 4: "s"}
_K_NAMES = {2: "pairs", 3: "triples"}
#: pairs named in a panel of cosine_by_layer's legend (the most similar ones)
LEGEND_PAIRS = 10
#: Okabe and Ito's eight colours, told apart with a red-green colour deficiency (tab10's
#: green, red, orange and brown are not): the kinds', the labels' and the merges' colours
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")
_PALETTE = OKABE_ITO[:5]


def _kind_names() -> list[str]:
    """The adapter kinds in the palette's order: ``lora`` first, then by name
    (:func:`loramix.discovery.kind_names`)."""
    from ..discovery import kind_names

    return sorted(kind_names(), key=lambda n: (n != "lora", n))


def _kind_color(name: str) -> str | None:
    """One colour per adapter kind (fixed by :func:`_kind_names`), None for other labels."""
    names = _kind_names()
    return _PALETTE[names.index(name) % len(_PALETTE)] if name in names else None


def _label_colors(labels) -> dict[str, str]:
    """A distinct colour for each adapter label: a plain kind keeps its own
    (:func:`_kind_color`), the others (``lora:data``, ``lora@16``, ...) take
    the palette's unused colours in order, so no two labels share one."""
    labels = list(dict.fromkeys(labels))
    out = {lab: c for lab in labels if (c := _kind_color(lab)) is not None}
    from matplotlib.colors import to_hex

    # then the rest of Okabe-Ito's, then tab10's, compared as colours
    used = {to_hex(c) for c in out.values()}
    free = []
    for c in [*OKABE_ITO, *(f"C{i}" for i in range(10))]:
        if to_hex(c) not in used:
            used.add(to_hex(c))
            free.append(c)
    extra = iter(free)
    for lab in labels:
        if lab not in out:
            out[lab] = next(extra, "0.3")
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: the least room between a figure's suptitle and the panels' titles below it, in points
TITLE_GAP_PT = 8.0


def _titled_layout(fig, title: str) -> None:
    """``fig.suptitle(title)`` and ``tight_layout``, the panels then lowered
    until the suptitle clears everything below it by :data:`TITLE_GAP_PT`:
    tight_layout alone left d2-vs-lora's three stacked panels (13.8 in tall)
    with 3 px between the suptitle and the first panel's title. A title wider
    than the figure is wrapped onto lines that fit."""
    sup = fig.suptitle(title, fontsize=11)
    renderer = fig.canvas.get_renderer()
    wide = sup.get_window_extent(renderer).width / (0.96 * fig.bbox.width)
    if wide > 1:  # one panel's width: a study's name and label ran off both edges (plan_vs_random)
        import textwrap

        sup.set_text("\n".join(textwrap.wrap(title, max(20, int(len(title) / wide)))))
    fig.tight_layout()
    top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)
    short = TITLE_GAP_PT * fig.dpi / 72 - (sup.get_window_extent(renderer).y0 - top)
    if short > 0:
        fig.tight_layout(rect=(0, 0, 1, 1 - short / fig.bbox.height))


def _saved(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` and free it (pyplot keeps every open figure)."""
    fig.savefig(path)
    _plt().close(fig)
    return path


def _plain(x):
    """``x`` as JSON for a figure's key: a DataFrame as its values, index,
    columns and dtypes (floats as ``repr``, exact)."""
    if isinstance(x, pd.DataFrame):
        return {"split": x.to_dict(orient="split"), "dtypes": [str(t) for t in x.dtypes]}
    return x


def drawn(cache, fn, path: Path, *args, **kw) -> Path:
    """``fn(*args, path=path, **kw)``, one of the report's figures, by way of
    the scenario cache (:meth:`~loramix.scenario.cache.Cache.derived`, kind
    ``figure``): the PNG drawn from the same arguments by the same code, with
    the same matplotlib and the same adapter kinds registered (their
    colours), is copied from there, else drawn there and copied; without
    ``cache``, drawn at ``path``. The copy is the bytes a first run drew: a
    rerun's report is the same, and takes no second of drawing."""
    if cache is None:
        return fn(*args, path=path, **kw)
    import shutil

    from ..environment import package_version

    name = Path(path).name
    inputs = {"figure": f"{fn.__module__}.{fn.__qualname__}", "file": name, "args": [_plain(a) for a in args],
              "kw": {k: _plain(v) for k, v in kw.items()}, "matplotlib": package_version("matplotlib"),
              "kinds": _kind_names()}  # fmt: skip

    def make(tmp: Path):
        fn(*args, path=tmp / name, **kw)

    folder = cache.derived("figure", inputs, make, label=name)
    shutil.copyfile(folder / name, path)
    return Path(path)


#: where a point's label may go, tried in order: (dx, dy) offset in points, ha, va
_LABEL_SPOTS = ((6, 0, "left", "center"), (-6, 0, "right", "center"), (5, 5, "left", "bottom"),
                (5, -5, "left", "top"), (-5, 5, "right", "bottom"), (-5, -5, "right", "top"),
                (0, 6, "center", "bottom"), (0, -6, "center", "top"))  # fmt: skip


def _place_labels(ax, labels: list[tuple], marker_pt: float = 7.0) -> None:
    """Annotate points ``(x, y, text, colour)``: each label a few points
    beside its point (right, left, the four diagonals, above, below), at
    the first place where its measured text box stays inside the axes and
    covers no label already placed, no marker and no error bar; a label with no free place is left
    out rather than piled on the others (every value is in results.csv).

    Call it once the axes' limits are final (after every line, axhline
    included): the labels are anchored to their points in data coordinates,
    offset in points, so they stay beside them however the axes are later
    resized. (Placed in axes fractions before the y = 0 line widened the
    limits, labels drifted up to a third of the axes away from their points.)
    """
    from matplotlib.collections import LineCollection
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    ax.set_xlim(ax.get_xlim())  # fixed from here: what is measured is what is drawn
    ax.set_ylim(ax.get_ylim())
    inside = ax.get_window_extent(renderer)
    pts = ax.transData.transform([(x, y) for x, y, _, _ in labels]) if labels else np.empty((0, 2))
    r = marker_pt / 2 * ax.figure.dpi / 72
    taken = [
        Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in pts if np.isfinite([px, py]).all()
    ]
    for coll in ax.collections:  # the error bars: a label across one hides where it ends
        if isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                (sx0, sy0), (sx1, sy1) = ax.transData.transform(seg[[0, -1]])
                taken.append(
                    Bbox.from_extents(
                        min(sx0, sx1) - 1, min(sy0, sy1) - 1, max(sx0, sx1) + 1, max(sy0, sy1) + 1
                    )
                )
    for (x, y, text, color), (px, py) in sorted(zip(labels, pts), key=lambda t: (t[0][0], t[0][1])):
        if not np.isfinite([px, py]).all():
            continue
        for dx, dy, ha, va in _LABEL_SPOTS:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                              color=color, ha=ha, va=va)  # fmt: skip
            box = ann.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(b) for b in taken):
                taken.append(box)
                break
            ann.remove()


def delta_vs_cosine(summary: pd.DataFrame, fits: list[dict], path: Path, title: str) -> Path:
    """``summary``: rows of merge method ``sum`` with ``adapter_method``,
    ``composition``, ``rms_cosine``, ``rms_cosine_std``, ``delta_ppl_pct``,
    ``delta_ppl_pct_std``. ``fits``: dicts with ``adapter_method``, ``slope``,
    ``intercept``, ``pearson_r``, ``r2``, ``loo_rmse``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.8), dpi=130)  # 0.6 inches more for the legend below
    ks = sorted(set(summary["k"].astype(int))) if "k" in summary else [2]
    labels: list[tuple] = []
    colors = _label_colors(summary["adapter_method"])
    for method, g in summary.groupby("adapter_method", sort=False):
        color = colors[method]
        for k in ks:
            gk = g[g["k"].astype(int) == k] if "k" in g else g
            if gk.empty:
                continue
            x, y = gk["rms_cosine"].to_numpy(float), gk["delta_ppl_pct"].to_numpy(float)
            xerr = gk["rms_cosine_std"].fillna(0).to_numpy(float)
            yerr = gk["delta_ppl_pct_std"].fillna(0).to_numpy(float)
            label = f"{method}, {_K_NAMES.get(k, f'{k} adapters')}" if len(ks) > 1 else method
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=_K_MARKERS.get(k, "D"), color=color, ms=7, capsize=3,
                        label=label, zorder=3)  # fmt: skip
            labels += [(xi, yi, lab, color) for xi, yi, lab in zip(x, y, gk["composition"])]
        fit = next((f for f in fits if f["adapter_method"] == method and f.get("slope") is not None), None)
        xs = g["rms_cosine"].to_numpy(float)
        if fit is not None and np.isfinite(xs).any():
            # over this method's own cosines only: drawn across every method's
            # range, a fit of points at 0.005-0.05 ran on to 0.2 and claimed a
            # Δppl % there that nothing measured
            lo, hi = np.nanmin(xs), np.nanmax(xs)
            pad = 0.08 * (hi - lo if hi > lo else max(abs(hi), 1e-3))
            grid = np.linspace(lo - pad, hi + pad, 50)
            r = fit.get("pearson_r")
            loo = fit.get("loo_rmse")
            lab = f"{method} fit: {fit['slope']:.3g}·cos {fit['intercept']:+.3g}"
            lab += f" (r={r:.2f}" if r is not None else " ("
            lab += f", LOO RMSE {loo:.2g})" if loo is not None else ")"
            ax.plot(grid, fit["slope"] * grid + fit["intercept"], "-", color=color, alpha=0.6, label=lab)
    ax.axhline(0, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("RMS cosine similarity of the summed adapters")
    ax.set_ylabel("Δppl % (naive sum vs merged-data adapter)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.25)
    # Below the axes, in the figure: inside, "best" ignored the error bars and
    # with forty labelled points found no free corner (real-14-domains: over
    # the label science+bash). Two columns: the fit entries are long.
    handles, names = ax.get_legend_handles_labels()
    leg = fig.legend(handles, names, fontsize=8, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.005))
    below = (leg.get_window_extent(fig.canvas.get_renderer()).height + 4) / fig.bbox.height
    fig.tight_layout(rect=(0, below, 1, 1))  # the axes' final size, before labels are measured against it
    _place_labels(ax, labels)
    return _saved(fig, path)


#: panels of cosine_by_layer share a y axis while their peaks differ by at most this factor
SHARE_Y_WITHIN = 3.0


def _share_y(by_layer: pd.DataFrame) -> bool:
    """Whether cosine_by_layer's panels share one y axis: only while the
    adapter methods' largest cosines are within :data:`SHARE_Y_WITHIN` of
    each other (the quickstart's lora at 0.5 beside lora:data at 0.03
    flattened the latter near 0)."""
    peaks = by_layer.groupby("adapter_method", sort=False)["rms_cosine"].max().to_numpy(float)
    peaks = peaks[np.isfinite(peaks)]
    return peaks.size < 2 or peaks.min() * SHARE_Y_WITHIN >= peaks.max()


#: pairs drawn as bars in cosine_by_layer's panels of a single layer (the most similar ones)
BAR_PAIRS = 24


def _one_layer_panel(ax, g: pd.DataFrame) -> None:
    """A panel of cosine_by_layer for a study of one adapted layer: one bar
    per pair, the most similar at the top (at most :data:`BAR_PAIRS`), named
    on the y axis; a single column of dots over one x tick before."""
    cos = g.groupby("pair", sort=False)["rms_cosine"].mean().dropna().sort_values(ascending=False)
    shown = cos.iloc[:BAR_PAIRS][::-1]  # barh draws bottom-up
    ax.barh(np.arange(len(shown)), shown.to_numpy(float), color="tab:blue", height=0.7)
    ax.set_yticks(np.arange(len(shown)), labels=shown.index, fontsize=8)
    ax.set_ylim(-0.6, len(shown) - 0.4)
    layer = g["layer"].dropna().unique()
    where = f"layer {int(layer[0])}" if len(layer) else "the layer"
    label = f"RMS cosine over {where}'s modules"
    if len(cos) > len(shown):
        label += f"\n(the {len(shown)} largest of {len(cos)} pairs; all in similarity_per_module.csv)"
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.25)


def _named_pairs(g: pd.DataFrame) -> list[str]:
    """The pairs a panel of cosine_by_layer names: a legend of more than
    LEGEND_PAIRS pairs covers the panel, so the most similar ones only, the
    others drawn in grey (every value is in similarity_per_module.csv)."""
    peak = g.groupby("pair", sort=False)["rms_cosine"].max()
    top = set(peak.nlargest(LEGEND_PAIRS).index)
    return [p for p in peak.index if p in top]


def _pair_styles(by_layer: pd.DataFrame) -> dict[str, tuple]:
    """One ``(colour, line style, marker)`` per pair named in any panel, the
    same in every panel and no two alike: the ``i``-th pair takes colour
    ``i mod 8`` of :data:`OKABE_ITO` and line style and marker ``i div 8`` of
    :data:`_PAIR_DASHES` and :data:`_PAIR_MARKERS`, so pairs of one colour
    differ in both, and 8 x 5 = 40 pairs are told apart. tab20's twenty colours
    (its light shades beside its dark ones, the 21st pair on a new marker)
    separated no more than ten; coloured panel by panel, real-14-domains'
    law+history was pink in one panel and economics+nq_open in the other."""
    pairs = list(dict.fromkeys(p for _, g in by_layer.groupby("adapter_method", sort=False)
                               for p in _named_pairs(g)))  # fmt: skip
    n = len(OKABE_ITO)
    return {p: (OKABE_ITO[i % n], _PAIR_DASHES[(i // n) % len(_PAIR_DASHES)],
                _PAIR_MARKERS[(i // n) % len(_PAIR_MARKERS)]) for i, p in enumerate(pairs)}  # fmt: skip


#: cosine_by_layer's line styles and markers, one of each per eight named pairs (a colour each):
#: solid, dashed, dotted, dash-dot, dash-dot-dot
_PAIR_DASHES = ("-", "--", ":", "-.", (0, (5, 1.5, 1, 1.5, 1, 1.5)))
_PAIR_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _layers_panel(ax, g: pd.DataFrame, styles: dict) -> int:
    """A panel of cosine_by_layer: one line per pair across the layers, the
    named ones (:func:`_named_pairs`) in their ``styles`` (colour, line style, marker),
    the others grey (their count returned)."""
    peak = g.groupby("pair", sort=False)["rms_cosine"].max()
    named = set(_named_pairs(g))
    for pair, gp in g.groupby("pair", sort=False):
        gp = gp.sort_values("layer")
        if pair in named:
            color, dashes, marker = styles[pair]
            ax.plot(gp["layer"], gp["rms_cosine"], linestyle=dashes, marker=marker, ms=4, label=pair,
                    color=color, zorder=3)  # fmt: skip
        else:
            ax.plot(gp["layer"], gp["rms_cosine"], "-", color="0.8", lw=0.8, zorder=2)
    layers = sorted(g["layer"].dropna().unique())
    if layers and len(layers) <= 24:
        ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.grid(alpha=0.25)
    return len(peak) - len(named)


def _one_legend(axes, others: list[int]) -> None:
    """One legend of cosine_by_layer's named pairs, beside the last panel: a
    pair has one style in every panel (:func:`_pair_styles`), and a legend
    beside each panel repeated the same names (d2-vs-lora: three alike,
    25 in wide); ``others``: each panel's count of grey pairs."""
    handles: dict = {}
    for ax in axes:
        for ln in ax.lines:
            if not ln.get_label().startswith("_"):
                handles.setdefault(ln.get_label(), ln)
    names = list(handles)
    if any(others):
        grey = f"the other {others[0]} pairs" if len(set(others)) == 1 else "the other pairs of each panel"
        names.append(grey)
        handles[grey] = axes[0].plot([], [], "-", color="0.8")[0]
    # handles long enough to show a line style: pairs of one colour differ in it
    axes[-1].legend([handles[n] for n in names], names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    handlelength=3, borderaxespad=0.0, ncol=1 if len(names) <= 16 else 2)  # fmt: skip


def cosine_by_layer(by_layer: pd.DataFrame, path: Path, title: str) -> Path:
    """``by_layer``: ``adapter_method``, ``pair``, ``layer``, ``rms_cosine``
    (mean over seeds), one panel per adapter method; the cosine axis from 0,
    shared by the panels where their scales are alike (:func:`_share_y`).
    With one adapted layer, each panel is a bar chart of the pairs
    (:func:`_one_layer_panel`), else a line per pair across the layers."""
    plt = _plt()
    methods = list(dict.fromkeys(by_layer["adapter_method"]))
    share = _share_y(by_layer)
    one = by_layer["layer"].dropna().nunique() <= 1
    if one:
        bars = min(BAR_PAIRS, max(by_layer.groupby("adapter_method")["pair"].nunique().max(), 1))
        fig, axes = plt.subplots(1, len(methods), figsize=(6.4 * len(methods), 0.24 * bars + 1.8), dpi=130,
                                 squeeze=False, sharex=share)  # fmt: skip
    else:
        # a panel as wide as its layers need (a few layers drew 8.4 in, as many as 30), and the legend's column
        width = len(methods) * min(8.4, 4.4 + 0.15 * by_layer["layer"].nunique()) + 2.4
        fig, axes = plt.subplots(1, len(methods), figsize=(width, 4.4), dpi=130, squeeze=False, sharey=share)
    styles = _pair_styles(by_layer)
    others = []
    for ax, method in zip(axes[0], methods):
        g = by_layer[by_layer["adapter_method"] == method]
        _one_layer_panel(ax, g) if one else others.append(_layers_panel(ax, g, styles))
        ax.set_title(f"{method}" if share else f"{method} (own {'x' if one else 'y'} scale)", fontsize=10)
    if not one:
        _one_legend(list(axes[0]), others)
        axes[0][0].set_ylabel("RMS cosine over the layer's modules")
        # RMS cosines are >= 0: from 0, set once every panel is drawn. Set in the loop,
        # it froze the shared axis at the first panel's top and cut the next panel's lines
        for ax in axes[0]:
            ax.set_ylim(bottom=0)
    _titled_layout(fig, title)
    return _saved(fig, path)


#: the kinds' panels of :func:`delta_by_method` side by side where that row is at most this wide
#: (in), else stacked: d2-vs-lora's one composition stacked three kinds 13.8 in tall, one bar a panel
ROW_MAX_WIDTH = 10.0


def _row_panel_width(n_comps: int, n_merges: int) -> float:
    """A panel's width (in) in :func:`delta_by_method`'s row: a composition's
    slot as wide as the stacked figure's level one, and the axis' labels."""
    return max(2.4, n_comps * 1.3 * max(1, n_merges / 2) + 0.7)


def _method_bars(ax, g: pd.DataFrame, merges: list, comps: list, colors, handles: dict, slant: bool) -> None:
    """One kind's bars in :func:`delta_by_method`: a group per composition, a
    bar per merge (its colour ``colors[k]`` in every panel, hatched from the ninth
    merge on, when the colours repeat; ``handles`` gets it)."""
    width = 0.8 / max(len(merges), 1)
    for k, mm in enumerate(merges):
        gm = g[g["merge_method"] == mm].set_index("composition").reindex(comps)
        if gm["delta_ppl_pct"].isna().all():
            continue
        x = np.arange(len(comps)) + (k - (len(merges) - 1) / 2) * width
        err = gm["delta_ppl_pct_std"]
        handles[mm] = ax.bar(x, gm["delta_ppl_pct"], width, yerr=None if err.isna().all() else err.fillna(0),
                             capsize=2, label=mm, color=colors[k % len(colors)],
                             hatch="//" if k >= len(colors) else None)  # fmt: skip
    ax.axhline(0, color="0.3", lw=0.8)
    # each composition its whole slot: fitted to the bars, one composition
    # with one merge filled the panel and left its name at an edge
    ax.set_xlim(-0.5, len(comps) - 0.5)
    ax.set_xticks(np.arange(len(comps)))
    if slant:
        ax.set_xticklabels(comps, fontsize=8, rotation=35, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticklabels(comps, fontsize=9)


def delta_by_method(summary: pd.DataFrame, path: Path, title: str) -> Path:
    """Grouped bars: compositions on x, one bar per merge method (mean over
    seeds, error bar = standard deviation), one panel per adapter method:
    side by side on one y axis where that row is at most :data:`ROW_MAX_WIDTH`
    wide (a few compositions), else stacked."""
    plt = _plt()
    methods = list(dict.fromkeys(summary["adapter_method"]))
    merges = list(dict.fromkeys(summary["merge_method"]))
    comps = list(dict.fromkeys(summary["composition"]))
    longest = max(map(len, comps), default=0)
    panel = _row_panel_width(len(comps), len(merges))
    row = len(methods) * panel + 1.4 <= ROW_MAX_WIDTH
    if row:
        # a name slanted where it is wider than its slot (about 0.075 in a character at 9 pt)
        slant = 0.075 * longest > (panel - 0.7) / max(len(comps), 1)
        fig, axes = plt.subplots(1, len(methods), figsize=(len(methods) * panel + 1.4, 4.2 if slant else 3.6),
                                 dpi=130, squeeze=False, sharey=True)  # fmt: skip
        panels = list(axes[0])
    else:
        # long names (math_geometry+finance) overlap when level: slant them and
        # give each composition less width
        slant = longest > 12
        per = (0.7 if slant else 1.3) * max(1, len(merges) / 2)
        fig, axes = plt.subplots(len(methods), 1, figsize=(max(6.5, per * len(comps) + 1.5),
                                 (4.6 if slant else 3.8) * len(methods)), dpi=130, squeeze=False)  # fmt: skip
        panels = list(axes[:, 0])
    handles: dict = {}  # merge method -> its bars, for the one legend of every panel
    for ax, method in zip(panels, methods):
        _method_bars(
            ax, summary[summary["adapter_method"] == method], merges, comps, OKABE_ITO, handles, slant
        )
        if not row or ax is panels[0]:  # a row shares the first panel's y axis
            ax.set_ylabel("Δppl % vs merged-data")
        ax.set_title(method, fontsize=10)
        ax.grid(axis="y", alpha=0.25)
    # One legend beside the top (or last) panel (a merge has one colour in every panel):
    # inside a panel it lay across the bars wherever they filled it (one composition)
    order = [m for m in merges if m in handles]
    panels[-1 if row else 0].legend([handles[m] for m in order], order, fontsize=8, loc="upper left",
                                    bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # fmt: skip
    _titled_layout(fig, title)
    return _saved(fig, path)


def cluster_order(sim: np.ndarray) -> list[int]:
    """A leaf order for a similarity matrix: average-linkage agglomeration
    (repeatedly join the two clusters with the highest mean pairwise
    similarity, NaN counted as 0), the joined orders concatenated, so that
    clusters sit in contiguous blocks."""
    s = np.nan_to_num(np.asarray(sim, dtype=float))
    clusters = [[i] for i in range(len(s))]
    while len(clusters) > 1:
        best, pair = -np.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                v = s[np.ix_(clusters[a], clusters[b])].mean()
                if v > best:
                    best, pair = v, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return clusters[0]


def _shown_range(points: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> tuple[float, float]:
    """One range for both axes of :func:`predicted_vs_measured`: the points'
    (measured and predicted values) ``[p0, p1]``, widened to the intervals'
    ends by at most half the points' span on each side, plus 4 % padding.
    A single interval of -79..+74 around points within +-2 set the range
    before, and flattened every point."""
    p0, p1 = float(np.min(points)), float(np.max(points))
    span = p1 - p0 if p1 > p0 else max(abs(p1), 1.0) * 0.1
    lo = max(min(p0, float(np.min(lows, initial=p0))), p0 - span / 2)
    hi = min(max(p1, float(np.max(highs, initial=p1))), p1 + span / 2)
    pad = 0.04 * (hi - lo)
    return lo - pad, hi + pad


#: the summary's column names as a reader reads them (a target is ``"COLUMN (merge)"``)
_READABLE = {"retention_pct": "retention %", "delta_ppl_pct": "Δppl %", "worst_pct": "worst member %"}


def readable(name: str) -> str:
    """``name`` with a leading summary column name (``retention_pct``) as its
    reader reads it (``retention %``): an axis said "retention_pct (sum)"."""
    head, _, rest = name.partition(" ")
    return _READABLE.get(head, head) + (" " + rest if rest else "")


def predicted_vs_measured(pred: pd.DataFrame, path: Path, title: str, ylabel: str) -> Path:
    """Held-out predictions (leave-one-domain-out) against the measured values:
    one point per (composition, held-out domain), the bar its prediction
    interval; the diagonal is a perfect prediction. Both axes show the same
    range (:func:`_shown_range`) at the same scale (a square), so the
    diagonal runs corner to corner at 45 degrees; an interval cut at the
    axes' edge ends in an arrowhead just inside it (named in the legend,
    which lies below the axes)."""
    plt = _plt()
    from matplotlib.transforms import offset_copy

    fig, ax = plt.subplots(figsize=(6.4, 7.0), dpi=130)  # 1.2 inches below the square for the legend
    lo = pred["low"].astype(float).to_numpy()
    hi = pred["high"].astype(float).to_numpy()
    y, yh = pred["y"].astype(float).to_numpy(), pred["y_hat"].astype(float).to_numpy()
    ok = np.isfinite(y) & np.isfinite(yh)
    y, yh, lo, hi = y[ok], yh[ok], lo[ok], hi[ok]
    has = np.isfinite(lo) & np.isfinite(hi)
    if not ok.any():  # nothing to show: an empty plot with its labels
        r0, r1 = 0.0, 1.0
    else:
        r0, r1 = _shown_range(np.concatenate([y, yh]), lo[has], hi[has])
    # the bars cut at the range: matplotlib would clip them too, but the arrowheads need the cut ends
    clo, chi = np.clip(lo, r0, r1), np.clip(hi, r0, r1)
    ax.errorbar(y[has], yh[has], yerr=[yh[has] - clo[has], chi[has] - yh[has]], fmt="o", ms=3, alpha=0.55,
                elinewidth=0.6, capsize=0, color="tab:blue", label="held-out prediction, interval")  # fmt: skip
    ax.plot(y[~has], yh[~has], "o", ms=3, color="tab:blue", alpha=0.55)
    up, down = has & (hi > r1), has & (lo < r0)
    if up.any() or down.any():
        ms, cut = 5, "interval cut at the axes' edge"
        kw = dict(ls="none", ms=ms, color="tab:blue", zorder=4)
        # drawn half a marker inside the edge: centred on it, the top ones
        # stuck out of the axes and touched the title
        inward = {s: offset_copy(ax.transData, fig=fig, y=s * ms / 2, units="points") for s in (-1, 1)}
        ax.plot(y[up], np.full(up.sum(), r1), "^", label=cut if up.any() else "_", transform=inward[-1], **kw)
        ax.plot(
            y[down], np.full(down.sum(), r0), "v", label="_" if up.any() else cut, transform=inward[1], **kw
        )
    ax.plot([r0, r1], [r0, r1], color="0.3", lw=0.8, label="measured = predicted")
    ax.set_xlim(r0, r1)
    ax.set_ylim(r0, r1)
    ax.set_aspect("equal")
    name = readable(ylabel)
    ax.set_xlabel(f"measured {name}")
    ax.set_ylabel(f"predicted {name}, fit without the held-out domain")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.25)
    # below the axes: inside, "best" weighed the points but not the interval
    # bars (a LineCollection, which it ignores); beside them it left a blank
    # column under it as tall as the figure
    handles, names = ax.get_legend_handles_labels()
    leg = fig.legend(handles, names, fontsize=8, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.005))
    below = (leg.get_window_extent(fig.canvas.get_renderer()).height + 4) / fig.bbox.height
    fig.tight_layout(rect=(0, below, 1, 1))
    return _saved(fig, path)


def interference_by_method(summary: pd.DataFrame, path: Path, title: str, worst: bool = False) -> Path:
    """Each composition's retention % (the worst member % too with ``worst``,
    and Δppl % where measured) per merge method, as box plots with the points
    over them; one panel per target."""
    plt = _plt()
    cols = [("retention_pct", "retention % vs own adapters"), ("delta_ppl_pct", "Δppl % vs merged-data")]
    if worst:
        cols.insert(1, ("worst_pct", "worst member % vs own adapter"))
    cols = [(c, lab) for c, lab in cols if c in summary and summary[c].notna().any()]
    labels = [
        f"{am}/{mm}" for am, mm in dict.fromkeys(zip(summary["adapter_method"], summary["merge_method"]))
    ]
    width = max(5.2, 0.6 * len(labels) + 1.5)  # 2 kinds x 4 merges: 8 boxes need more than 5.2 inches
    fig, axes = plt.subplots(1, len(cols), figsize=(width * len(cols), 4.4), dpi=130, squeeze=False)
    for ax, (col, lab) in zip(axes[0], cols):
        data = []
        for name in labels:
            am, mm = name.split("/")
            g = summary[(summary["adapter_method"] == am) & (summary["merge_method"] == mm)][col]
            data.append(g.dropna().to_numpy(dtype=float))
        ax.boxplot(data, showfliers=False)
        rng = np.random.default_rng(0)  # jitter only, fixed for identical figures
        for k, d in enumerate(data, start=1):
            ax.plot(k + rng.uniform(-0.15, 0.15, len(d)), d, "o", ms=2.5, alpha=0.5, color="tab:blue")
        ax.set_xticks(range(1, len(labels) + 1), labels=labels, fontsize=9)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylabel(lab)
        ax.grid(axis="y", alpha=0.25)
    _titled_layout(fig, title)
    # names such as lora:data/dare-ties still run into each other level: slant them
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axes[0][0].get_xticklabels()]
    if any(a.x1 > b.x0 for a, b in zip(boxes, boxes[1:])):
        for ax in axes[0]:
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
        _titled_layout(fig, title)  # the same suptitle, laid out again
    return _saved(fig, path)


def plan_vs_random(
    panels: list[tuple[str, float, list[float]]], path: Path, title: str, what: str = "retention %"
) -> Path:
    """One panel per way of merging (``(name, plan value, random values)``): the
    measured ``what`` (the grouping's retention % or worst member %) of the
    random groupings (histogram) and of the plan's grouping (a vertical line);
    lower is better."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), dpi=130, squeeze=False)
    for ax, (name, value, values) in zip(axes[0], panels):
        r = np.asarray(values, dtype=float)
        ax.hist(r, bins=max(5, min(20, len(r) // 2)), color="tab:blue", alpha=0.6,
                label=f"{len(r)} random groupings (same sizes)")  # fmt: skip
        ax.axvline(float(r.mean()), color="tab:blue", lw=1, ls="--", label=f"random mean {r.mean():.2f}")
        ax.axvline(value, color="tab:red", lw=2, label=f"loramix plan {value:.2f}")
        ax.set_xlabel(f"{what} of the grouping (lower is better)")
        ax.set_ylabel("groupings")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.25 of a grouping
        ax.set_title("merged as proposed" if name == "plan" else f"merged by {name}", fontsize=10)
        ax.grid(alpha=0.25)
    _titled_layout(fig, title)
    _legends_below(fig, axes[0], title)
    return _saved(fig, path)


def _legends_below(fig, axes, title: str) -> None:
    """Each panel's legend under its x axis label, and the figure laid out
    again: inside, "best" found no free corner over a few tall bars and lay
    across one; beside each panel, the legends left 2.4 in of blank between
    plan_vs_random's two panels."""
    from matplotlib.transforms import offset_copy

    renderer = fig.canvas.get_renderer()
    for ax in axes:
        # the x axis' depth below the axes (ticks and label), the same however the axes are resized
        depth = ax.get_window_extent(renderer).y0 - ax.xaxis.get_tightbbox(renderer).y0 + 4
        ax.legend(fontsize=8, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.0),
                  bbox_transform=offset_copy(ax.transAxes, fig=fig, y=-depth, units="dots"))  # fmt: skip
    _titled_layout(fig, title)


def _ink(rgba) -> str:
    """Black or white text, whichever reads on a cell of colour ``rgba``
    (relative luminance, sRGB weights, below 0.45: white)."""
    r, g, b = rgba[:3]
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.45 else "black"


def threshold_text(x: float, thresholds) -> str:
    """``x`` to 0 decimals, or to as many more (up to 6) as keep it on its own
    side of every threshold ``t`` (``x >= t`` as the verdicts compare): a
    worst member at 49.6 printed "50" beside "does not compose"."""
    for nd in range(7):
        text = f"{x:.{nd}f}"
        if all((float(text) >= t) == (x >= t) for t in thresholds):
            return text
    return text


def _kept_panel(
    ax, names: list[str], kept, method, noisy, several: bool, cmap, norm, fs: float, thresholds
) -> bool:
    """One panel of :func:`kept_gain_heatmap` (each value on its verdict's
    side of ``thresholds``: :func:`threshold_text`; ``several``: the panel's
    pairs have more than one best method, each written under its value);
    True where a cell has no pair."""
    from matplotlib.patches import Rectangle

    from ..plots import short_labels

    n = len(names)
    vals = np.array([[np.nan if x is None else x for x in row] for row in kept], dtype=float)
    diag = np.eye(n, dtype=bool)
    ax.imshow(np.where(diag, 1.0, np.nan), cmap="Greys", vmin=0, vmax=4)  # the diagonal: light grey
    ax.imshow(np.ma.masked_invalid(np.where(diag, np.nan, vals)), cmap=cmap, norm=norm)
    for i in range(n):
        for j in range(n):
            if not diag[i, j] and not np.isfinite(vals[i, j]):  # hatched: white was also a kept gain near 50
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="0.6", hatch="//",
                                       lw=0))  # fmt: skip
            if diag[i, j] or not np.isfinite(vals[i, j]):
                continue
            noise = bool(noisy and noisy[i][j])
            value = threshold_text(vals[i, j], thresholds)
            text = ("~" if noise else "") + value + (f"\n{method[i][j]}" if several else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=fs if not several else fs - 1,
                    color=_ink(cmap(norm(vals[i, j]))), linespacing=0.9,
                    style="italic" if noise else "normal")  # fmt: skip
    ax.set_xticks(range(n), labels=short_labels(names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=short_labels(names))
    return bool(np.isnan(vals[~diag]).any())


def kept_gain_heatmap(panels: list[tuple], path: Path, title: str, thresholds: tuple[float, float]) -> Path:
    """One panel per adapter label, ``(label, names, kept, method[, noisy])``: an
    ``N x N`` heatmap of the share (%) of the worse member's gain over the
    base that the pair's best merge keeps (``kept``, None where the pair was
    not merged), its best method written under the value where the panel has
    several, the domains in ``names``' order (the similarity heatmap's).
    Colour from red (0: no better than the base) through yellow (50) to blue
    (100: as good as each member's own adapter), clipped beyond: ColorBrewer's
    RdYlBu, which readers with a red-green colour deficiency tell apart (its
    RdYlGn ends look alike to them); the colour
    bar marks ``thresholds`` (the verdicts' bounds). ``noisy``: ``N x N``
    booleans, a verdict within eval noise (:mod:`.compose`), whose value is
    written ``~`` and in italics."""
    plt = _plt()
    from matplotlib.colors import Normalize

    n = max(len(p[1]) for p in panels)
    size = max(4.0, min(0.55 * n + 2.5, 30.0))
    fs = 10 if n <= 8 else max(5, 10 - (n - 8) // 3)
    # the colour bar in a narrow column of its own: laid out with the panels, its label is never cut
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=((size + 0.6) * len(panels) + 1.0, size + 0.4), dpi=110,
                             gridspec_kw={"width_ratios": [1.0] * len(panels) + [0.04]})  # fmt: skip
    cmap, norm = plt.get_cmap("RdYlBu"), Normalize(0.0, 100.0)
    blank = noise = False
    for ax, (label, names, kept, method, *noisy) in zip(axes[:-1], panels):
        noisy = noisy[0] if noisy else None
        noise |= bool(noisy) and any(any(row) for row in noisy)
        ones = sorted({m for row in method for m in row if m})  # the panel's best methods
        blank |= _kept_panel(ax, names, kept, method, noisy, len(ones) > 1, cmap, norm, fs, thresholds)
        # one method throughout: named in the title, or the panel never says which merge it shows
        head = f"{label} (best method under each value)" if len(ones) > 1 else label
        head += f" (best method: {ones[0]})" if len(ones) == 1 else ""
        ax.set_title(head, fontsize=10)
    lo, hi = thresholds
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=axes[-1], extend="both")
    bar.set_ticks(sorted({0.0, lo, hi, 100.0}))
    for t in (lo, hi):
        bar.ax.axhline(t, color="black", lw=1.2)
    # a line each: in one, the key of a four-domain map (5 in tall) ran past the bar and the figure
    key = ["kept gain % of the worse member", f"≥{hi:g} composes, {lo:g}–{hi:g} partly, <{lo:g} does not"]
    key += ["hatched: not merged"] if blank else []
    bar.set_label("\n".join(key + (["~ italic: within eval noise"] if noise else [])), fontsize=9)
    _titled_layout(fig, title)
    _bar_beside(fig, axes[-2], axes[-1])
    return _saved(fig, path)


#: room between the last map of kept_gain and its colour bar, in inches
BAR_PAD_IN = 0.25


def _bar_beside(fig, panel, cax) -> None:
    """Move the colour bar ``cax`` to :data:`BAR_PAD_IN` right of ``panel``
    and narrow ``fig`` by what that frees, every axes keeping its size in
    inches: tight_layout spaces every column alike, so the bar stood as far
    from the last map as a map from the next one's tick names (1.0 in of
    blank in quickstart's kept_gain.png)."""
    w, h = fig.get_size_inches()
    shift = cax.get_position().x0 - panel.get_position().x1 - BAR_PAD_IN / w  # figure fraction
    # never narrower than the suptitle (a one-map figure's title is its widest line)
    sup = fig.get_suptitle() and fig._suptitle.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
    shift = min(shift, (w - (sup or 0.0) - 0.3) / w)
    if shift <= 0:
        return
    narrow = w - shift * w
    boxes = [(ax, ax.get_position()) for ax in fig.axes]
    fig.set_size_inches(narrow, h)
    for ax, b in boxes:
        x0 = b.x0 - (shift if ax is cax else 0.0)
        ax.set_position([x0 * w / narrow, b.y0, b.width * w / narrow, b.height])


#: kept_by_size's lowest y: a worst member far below the base (the sum of four real adapters
#: reached -704 %) is drawn on this floor as a downward triangle, so the others stay legible
KEPT_FLOOR = -100.0


def kept_by_size(
    panels: list[tuple[str, dict]], path: Path, title: str, thresholds: tuple[float, float]
) -> Path:
    """One panel per adapter label, ``(label, {method: {size: [kept gain %, ...]}})``:
    each composition's worst-member kept gain (%) under each merge method, by
    composition size (the sizes side by side, the methods side by side within
    a size), its mean over the size's compositions a black bar. Points and
    means below :data:`KEPT_FLOOR` lie on the floor as downward triangles,
    their number written under it. Dashed lines mark ``thresholds`` (the
    verdicts' bounds), the solid one 0 (no better than the base)."""
    plt = _plt()
    methods = list(dict.fromkeys(m for _, by in panels for m in by))
    colors = dict(zip(methods, [*OKABE_ITO, *(f"C{i}" for i in range(10))]))
    sizes = sorted({k for _, by in panels for per in by.values() for k in per})
    width = max(5.2, 0.55 * len(sizes) * len(methods) + 1.8)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.6), dpi=130, squeeze=False)
    rng = np.random.default_rng(0)  # jitter only, fixed for identical figures
    step = 0.8 / len(methods)
    for ax, (label, by) in zip(axes[0], panels):
        values = [
            v for per in by.values() for vs in per.values() for v in vs if v is not None and np.isfinite(v)
        ]
        floor = max(KEPT_FLOOR, min([0.0, *values]) - 5.0)
        below, sunk, named = 0, False, set()
        for j, m in enumerate(methods):
            for i, k in enumerate(sizes):
                vs = np.array(
                    [v for v in by.get(m, {}).get(k, []) if v is not None and np.isfinite(v)], dtype=float
                )
                if not len(vs):
                    continue
                x = i + (j - (len(methods) - 1) / 2) * step
                low = vs < floor
                below += int(low.sum())
                xs = x + rng.uniform(-0.3, 0.3, len(vs)) * step
                # each name once in the legend, on the first size the method has (its marker even if empty)
                ax.plot(xs[~low], vs[~low], "o", ms=3.5, alpha=0.6, color=colors[m],
                        label=None if m in named else m)  # fmt: skip
                ax.plot(xs[low], np.full(low.sum(), floor), "v", ms=5, color=colors[m])
                mean = float(vs.mean())
                ax.plot([x - 0.4 * step, x + 0.4 * step], [max(mean, floor)] * 2, color="black", lw=2,
                        label=None if "mean" in named else "mean")  # fmt: skip
                named |= {m, "mean"}
                if mean < floor:  # the bar on the floor, its value under it
                    ax.plot(x, floor, "v", ms=7, color="black")
                    ax.annotate(f"{mean:.0f}", (x, floor), xytext=(0, -7), textcoords="offset points",
                                ha="center", va="top", fontsize=7)  # fmt: skip
                    sunk = True
        for t in thresholds:
            ax.axhline(t, color="0.4", lw=0.8, ls="--")
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_ylim(floor - (14.0 if sunk else 4.0), max(105.0, max(values, default=100.0) + 5.0))
        ax.set_xticks(range(len(sizes)), labels=[str(k) for k in sizes])
        ax.set_xlabel("composition size (adapters merged)")
        ax.set_ylabel("kept gain % of the worst member")
        head = label + (f" ({below} below {floor:g}: on the floor, ▼)" if below else "")
        ax.set_title(head, fontsize=10)
        ax.grid(axis="y", alpha=0.25)
    _titled_layout(fig, title)
    _legends_below(fig, axes[0], title)
    return _saved(fig, path)
