"""What a study and its readers are told: scenario check before a run, the
report's answer and setup lines, its plots, predict's extrapolation notes,
and the Ray executor's --address and SIGTERM (each test failed before its fix)."""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from loramix.cli import main

from .factories import make_peft_adapter, tiny_gpt2
from .test_scenario import GOOD  # the smallest valid scenario


def test_check_never_says_ok_before_a_data_error(tmp_path, capsys):
    """`scenario check` printed "FILE: ok — scenario ..." and the domains, then
    refused the data (too few records, an empty file, a missing field)."""
    (tmp_path / "small.jsonl").write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3))
    )
    p = tmp_path / "s.toml"
    p.write_text(GOOD.replace('data = "synthetic:units"', 'data = "small.jsonl"'))
    rc = main(["scenario", "check", str(p), "--cache", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == "", out
    assert err.startswith(f"loramix: error: {p}: domains.b.train:") and err.count("\n") == 1, err


def test_check_says_when_predictors_cannot_be_validated(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text(GOOD + "[predictors]\ntokens = 16\n")
    rc = main(["scenario", "check", str(p), "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "no predictors section and no predictors.json" in out, out


def _summary():
    # four pairs; Δppl % (merged-data) only for three of them, the widest cosine without
    rows = [
        ("a+b", 0.01, 1.0, 2.0),
        ("a+c", 0.02, 2.0, 3.0),
        ("b+c", 0.03, 4.0, 5.0),
        ("a+d", 0.50, 9.0, None),
    ]
    return pd.DataFrame([{"adapter_method": "lora", "merge_method": "sum", "composition": c, "k": 2,
                          "rms_cosine": x, "retention_pct": r, "delta_ppl_pct": np.nan if d is None else d}
                         for c, x, r, d in rows])  # fmt: skip


def test_answer_ranges_are_over_the_pairs_of_r():
    """'r of Δppl % over 3 pairs (... cosine from A to B)' quoted the cosine
    range of every pair, also those without a merged-data adapter."""
    from loramix.scenario.answer import _similarity_lines

    lines = _similarity_lines(_summary())
    d = next(line for line in lines if "Δppl %" in line)
    assert "over 3 pairs" in d and "cosine from 0.010 to 0.030" in d, d
    r = next(line for line in lines if "retention %" in line)
    assert "over 4 pairs" in r and "cosine from 0.010 to 0.500" in r, r


def test_setup_does_not_promise_a_predictors_file_that_is_not_written():
    from loramix.scenario.answer import setup_lines

    pred = {"tokens": 64, "max_len": 128, "level": 0.9, "target": "retention", "method": "sum"}
    sc = {"adapters": {}, "eval": {}, "predictors": pred}
    report = {
        "scenario": sc,
        "validations": [],
        "results": [{"composition": c} for c in ("a+b", "a+c", "b+c")],
    }
    (line,) = [x for x in setup_lines(report, SimpleNamespace(sc=sc)) if x.startswith("- Predictors")]
    assert "`predictors.json` holds" not in line and "no `predictors.json`" in line, line


def test_each_adapter_label_gets_its_own_colour():
    """lora:data / lora:shared / lora@16 had no colour: their points took
    matplotlib's first colour, the same blue as lora's."""
    from loramix.scenario.plots import _label_colors

    c = _label_colors(["lora", "lora:data", "d2lora", "lora@16"])
    assert len(set(c.values())) == 4 and None not in c.values()


def test_labels_stay_inside_the_axes():
    """Crowded point labels were pushed below the x axis, over its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loramix.scenario.plots import _place_labels

    fig, ax = plt.subplots()
    x = np.full(30, 0.01) + np.linspace(0, 1e-3, 30)
    y = np.linspace(-1, 1, 30)
    ax.plot(x, y, "o")
    ax.set_ylim(-1.1, 1.1)
    _place_labels(ax, [(a, b, f"p{i}", "k") for i, (a, b) in enumerate(zip(x, y))])
    fig.canvas.draw()
    inside = ax.get_window_extent()
    assert ax.texts
    for t in ax.texts:
        box = t.get_window_extent()
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, (
            t.get_text(),
            box,
        )
    plt.close(fig)


def test_ray_address_where_nothing_listens_is_refused_at_once():
    """`--executor ray --address HOST:PORT` with no cluster there retried for
    minutes inside ray.init, a warning every few seconds."""
    pytest.importorskip("ray")
    from loramix.errors import UsageError
    from loramix.scenario.executors import make_executor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match="no Ray cluster answers"):
        make_executor("ray", address=f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 15
    with socket.socket() as s:  # something listens: left to ray.init
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert make_executor("ray", address=f"127.0.0.1:{s.getsockname()[1]}").address


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("aud")
    model = tiny_gpt2()
    return [make_peft_adapter(model, d / n, seed=i, r=4, lora_alpha=8) for i, n in enumerate("abc")]


def test_predict_flags_a_composition_larger_than_the_fit_saw(three, tmp_path, capsys):
    """A fit on pairs only predicted a triple with no note ("extrapolation": false)."""
    from loramix.fit import fit_line

    x, y = [0.0, 0.5, 1.0, 0.2, 0.8], [1.0, 2.0, 4.0, 1.5, 3.0]
    fits = [{"adapter_method": "lora", "merge_method": "sum",
             **fit_line(x, y, labels=["a+b", "a+c", "b+c", "a+d", "b+d"]).to_dict()}]  # fmt: skip
    p = tmp_path / "fit.json"
    p.write_text(json.dumps({"scenario": "t", "prediction_level": 0.95, "fits": fits}))
    rc = main(["predict", *map(str, three), "--fit", str(p), "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["extrapolation"] is True and out["fitted_sizes"] == [2]
    main(["predict", *map(str, three), "--fit", str(p)])
    assert "extrapolates it in size" in capsys.readouterr().out
    main(["predict", *map(str, three[:2]), "--fit", str(p)])
    assert "extrapolates it in size" not in capsys.readouterr().out


def test_ray_executor_keeps_loramix_sigterm_handler(monkeypatch):
    """ray.init replaced loramix's SIGTERM handler: a kill during a Ray run
    printed Ray's stack dump and aborted (exit 134) instead of unwinding
    ("loramix: terminated", 143)."""
    import signal
    import sys
    import types

    from loramix.scenario.executors import RayExecutor

    fake = types.ModuleType("ray")
    state = {"up": False}

    def init(**kw):
        state["up"] = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what Ray's own handler does to ours

    fake.init = init
    fake.is_initialized = lambda: state["up"]
    fake.shutdown = lambda: state.update(up=False)
    fake.remote = lambda **kw: lambda f: types.SimpleNamespace(remote=f)
    fake.put = lambda x: x
    monkeypatch.setitem(sys.modules, "ray", fake)

    def ours(signum, frame):  # stands for loramix.cli's handler
        raise RuntimeError

    before = signal.signal(signal.SIGTERM, ours)
    try:
        ctx = types.SimpleNamespace(device="cpu", payload=lambda: {})
        RayExecutor(1, 1, None).run([], ctx, lambda st, o: None)
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)


def _two_kinds_summary():
    """A delta_vs_cosine summary of two adapter kinds at different cosines
    (independent initialisation near 0.01, shared near 0.2), one seed."""
    rows = []
    for method, x0, x1 in (("lora", 0.005, 0.05), ("lora:shared", 0.04, 0.21)):
        for i, x in enumerate(np.linspace(x0, x1, 6)):
            rows.append(dict(adapter_method=method, composition=f"dom{i}+other{i}", k=2, rms_cosine=x,
                             rms_cosine_std=np.nan, delta_ppl_pct=-12 + 100 * x, delta_ppl_pct_std=np.nan))  # fmt: skip
    fits = [dict(adapter_method=m, slope=s, intercept=-12.0, pearson_r=0.7, r2=0.5, loo_rmse=7.0)
            for m, s in (("lora", 580.0), ("lora:shared", 130.0))]  # fmt: skip
    return pd.DataFrame(rows), fits


@pytest.fixture(autouse=True)
def _close_figures():
    """Close the figures a test kept open (after monkeypatch's teardown, which
    this fixture precedes): one per test made pyplot warn of more than 20."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def _saved_figure(monkeypatch, draw):
    """Run ``draw()`` and return the first figure it saves (drawn, still open: a
    closed figure loses its renderer; :func:`_close_figures` closes it):
    compose.write_files saves the kept-gain map, then, with several sizes,
    kept_by_size."""
    import matplotlib.figure

    seen = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        seen.setdefault("fig", fig)
        out = real(fig, *a, **k)
        fig.canvas.draw()
        return out

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda *a, **k: None)
    draw()
    return seen["fig"]


def test_a_fit_line_spans_its_own_points_only(tmp_path, monkeypatch):
    """real-14-domains: lora's fit (points at cosine 0.005-0.05) was drawn
    across lora:shared's range too, up to 0.22, where it claimed a Δppl % of
    +116 that nothing measured."""
    from loramix.scenario.plots import delta_vs_cosine

    summary, fits = _two_kinds_summary()
    fig = _saved_figure(monkeypatch, lambda: delta_vs_cosine(summary, fits, tmp_path / "d.png", "t"))
    lines = {
        ln.get_label().split(" fit")[0]: ln.get_xdata()
        for ln in fig.axes[0].lines
        if " fit:" in ln.get_label()
    }
    assert set(lines) == {"lora", "lora:shared"}
    for method, xd in lines.items():
        x = summary.loc[summary["adapter_method"] == method, "rms_cosine"]
        pad = 0.1 * (x.max() - x.min())
        assert x.min() - pad <= min(xd) and max(xd) <= x.max() + pad, (method, min(xd), max(xd))


def test_point_labels_stay_beside_their_points(tmp_path, monkeypatch):
    """d2-vs-lora: the points lie near Δppl -10 %, the y = 0 line drawn after
    the labels widened the axes, and labels placed in axes fractions drifted
    6 points of Δppl above their points, nearer to nothing. Each label now
    sits within a few points of its own point, on no other label."""
    from loramix.scenario.plots import delta_vs_cosine

    summary = pd.DataFrame([
        dict(adapter_method=m, composition="math+medicine", k=2, rms_cosine=x, rms_cosine_std=sx,
             delta_ppl_pct=y, delta_ppl_pct_std=sy)
        for m, x, sx, y, sy in (("lora", 0.0094, 0.0033, -9.2, 0.6), ("lora@16", 0.0126, 0.0043, -9.4, 1.1),
                                ("d2lora", 0.0077, 0.002, -10.9, 1.1))])  # fmt: skip
    summary = pd.concat([summary, _two_kinds_summary()[0]], ignore_index=True)
    fig = _saved_figure(monkeypatch, lambda: delta_vs_cosine(summary, [], tmp_path / "d.png", "t"))
    ax = fig.axes[0]
    texts = [t for t in ax.texts if "+" in t.get_text()]
    assert len(texts) >= 8
    boxes = [t.get_window_extent() for t in texts]
    inside = ax.get_window_extent()
    for t, box in zip(texts, boxes):
        px, py = ax.transData.transform(t.xy)
        # the box's nearest edge within 12 points of its point
        gap = np.hypot(max(box.x0 - px, 0, px - box.x1), max(box.y0 - py, 0, py - box.y1))
        assert gap <= 12 * fig.dpi / 72, (t.get_text(), gap)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1 :]), texts[i].get_text()


def test_box_plot_names_do_not_run_into_each_other(tmp_path, monkeypatch):
    """quickstart: 2 adapter kinds x 4 merges side by side, and the tick
    labels (lora:data/dare-ties ...) overprinted one another."""
    from loramix.scenario.plots import interference_by_method

    rng = np.random.default_rng(0)
    summary = pd.DataFrame([
        dict(adapter_method=am, merge_method=mm, composition=f"c{i}", retention_pct=rng.normal(5, 3),
             delta_ppl_pct=rng.normal(8, 3))
        for am in ("lora", "lora:data") for mm in ("sum", "ties", "dare-ties", "svd") for i in range(6)])  # fmt: skip
    fig = _saved_figure(monkeypatch, lambda: interference_by_method(summary, tmp_path / "i.png", "t"))
    for ax in fig.axes:
        ticks = ax.get_xticklabels()
        boxes = [t.get_window_extent() for t in ticks]
        assert len(boxes) == 8
        for t, a, b in zip(ticks, boxes, boxes[1:]):
            if t.get_rotation() == 0:
                assert not a.overlaps(b), (a, b)
            else:  # slanted, parallel lines: apart by the step times the sine of the slant
                step = b.x1 - a.x1  # right-aligned: their ends are one tick apart
                line = t.get_fontsize() * fig.dpi / 72
                assert step * np.sin(np.radians(t.get_rotation())) >= line, (t.get_text(), step)


def test_one_composition_keeps_its_bars_under_its_name(tmp_path, monkeypatch):
    """d2-vs-lora: one composition, and a panel with one of the two merges
    was one bar filling the whole panel, its name under the right edge."""
    from loramix.scenario.plots import delta_by_method

    summary = pd.DataFrame([
        dict(adapter_method=am, merge_method=mm, composition="math+medicine", delta_ppl_pct=-9.0,
             delta_ppl_pct_std=0.6)
        for am, mm in (("lora", "sum"), ("d2lora", "sum"), ("d2lora", "d2-signed"))])  # fmt: skip
    fig = _saved_figure(monkeypatch, lambda: delta_by_method(summary, tmp_path / "b.png", "t"))
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert lo <= -0.45 and hi >= 0.45, (ax.get_title(), lo, hi)  # the name's tick (0) in the middle
        for bar in ax.patches:
            assert -0.5 <= bar.get_x() and bar.get_x() + bar.get_width() <= 0.5


def test_one_composition_puts_the_kinds_side_by_side(tmp_path, monkeypatch, request):
    """d2-vs-lora's delta_by_method (one composition, three kinds) stacked
    three panels 13.8 in tall, each bar filling its panel: now one row on one
    y axis, every text inside the figure, every bar inside its axis; the
    many-composition figure (real-14-domains) stays stacked, at its size."""
    from pathlib import Path

    from matplotlib._pylab_helpers import Gcf

    from loramix.scenario.plots import delta_by_method

    root = Path(__file__).resolve().parents[1] / "reports"

    def figure(study):
        s = pd.DataFrame(json.loads((root / study / "report.json").read_text())["summary"])
        s = s[np.isfinite(s["delta_ppl_pct"].astype(float))]
        fig = _saved_figure(monkeypatch, lambda: delta_by_method(s, tmp_path / "b.png", f"{study}: t"))
        request.addfinalizer(lambda: Gcf.destroy_fig(fig))  # kept open to be read, closed after
        return fig

    fig = figure("d2-vs-lora")
    w, h = fig.get_size_inches()
    assert len(fig.axes) == 3 and h <= 4.5 and w <= 10.0, (w, h)
    boxes = [ax.get_position() for ax in fig.axes]
    assert len({round(b.y0, 6) for b in boxes}) == 1 and [b.x0 for b in boxes] == sorted(b.x0 for b in boxes)
    assert len({ax.get_ylim() for ax in fig.axes}) == 1  # one y axis: the kinds compared by eye
    assert [ax.get_ylabel() != "" for ax in fig.axes] == [True, False, False]
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert all(lo <= b.get_y() + b.get_height() and b.get_y() <= hi for b in ax.patches)
    _every_text_inside(fig)
    fig = figure("real-14-domains")  # 20 compositions: stacked, as before
    assert len({round(ax.get_position().x0, 6) for ax in fig.axes}) == 1 and len(fig.axes) == 2
    assert tuple(np.round(fig.get_size_inches() * fig.dpi)) == (2015, 1196)


def test_the_bars_legend_lies_on_no_bar(tmp_path, monkeypatch):
    """delta_by_method: one legend for every panel, beside them: inside a panel
    (d2-vs-lora's d2lora panel, one composition) it lay across the bars."""
    from loramix.scenario.plots import delta_by_method

    summary = pd.DataFrame([
        dict(adapter_method=am, merge_method=mm, composition="math+medicine", delta_ppl_pct=-9.0,
             delta_ppl_pct_std=0.6)
        for am, mm in (("lora", "sum"), ("d2lora", "sum"), ("d2lora", "d2-signed"))])  # fmt: skip
    fig = _saved_figure(monkeypatch, lambda: delta_by_method(summary, tmp_path / "b.png", "t"))
    legends = [lg for ax in fig.axes for lg in [ax.get_legend()] if lg is not None]
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == ["sum", "d2-signed"]
    r = fig.canvas.get_renderer()
    box = legends[0].get_window_extent(r)
    assert box.x1 <= fig.bbox.x1 + 1  # inside the saved figure
    for ax in fig.axes:
        assert not any(box.overlaps(bar.get_window_extent(r)) for bar in ax.patches), ax.get_title()


def _quickstart_best_predictions() -> pd.DataFrame:
    """The committed quickstart report's held-out predictions of its best
    predictor: the figure it drew had interval tops running into the legend."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "reports" / "quickstart"
    best = json.loads((folder / "predictors.json").read_text())
    pred = pd.read_csv(folder / "predictions.csv")
    keep = (pred["adapter_method"] == best["adapter_method"]) & (pred["target"] == best["target_name"])
    keep &= (pred["merge_method"] == best["merge_method"]) & (pred["predictor"] == best["best"])
    return pred[keep]


def test_predictions_legend_covers_no_point_or_interval(tmp_path, monkeypatch):
    """predicted_vs_measured: the legend, placed "best" inside the axes, saw
    the points but not the interval bars (matplotlib's "best" ignores a
    LineCollection), and the quickstart's interval tops ran through it. The
    legend's box now meets no point and no interval."""
    from matplotlib.collections import LineCollection
    from matplotlib.transforms import Bbox

    from loramix.scenario.plots import predicted_vs_measured

    pred = _quickstart_best_predictions()
    assert len(pred) >= 10
    fig = _saved_figure(
        monkeypatch, lambda: predicted_vs_measured(pred, tmp_path / "p.png", "t", "retention_pct (sum)")
    )
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    (box,) = [lg.get_window_extent(r) for lg in [ax.get_legend(), *fig.legends] if lg is not None]
    assert (
        fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 - 1 <= box.y0
    )  # saved whole
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert bars
    for seg in (s for c in bars for s in c.get_segments()):
        (x0, y0), (x1, y1) = ax.transData.transform(seg[[0, -1]])
        assert not box.overlaps(Bbox.from_extents(min(x0, x1) - 1, min(y0, y1), max(x0, x1) + 1, max(y0, y1)))
    points = ax.transData.transform(pred[["y", "y_hat"]].to_numpy(float))
    assert not any(box.contains(px, py) for px, py in points)


def test_plan_histogram_legend_covers_no_bar_and_counts_are_whole(tmp_path, monkeypatch):
    """plan_vs_random of a 4-domain study of real data (5 random groupings,
    two of them the plan's own grouping): the legend, placed "best" inside
    the axes, lay across a bar of the histogram, and the count axis was
    ticked 0.25, 0.5, ... groupings."""
    from loramix.scenario.plots import plan_vs_random

    rand = [-0.78091837, -2.45620825, -0.78091837, -2.45620825, 0.37306851]
    panels = [("plan", -2.45616395, rand), ("sum", -2.45616395, rand)]
    fig = _saved_figure(monkeypatch, lambda: plan_vs_random(panels, tmp_path / "p.png", "t"))
    r = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_legend().get_window_extent(r)
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1  # inside the saved figure
        bars = [p for p in ax.patches if p.get_height() > 0]
        assert bars
        assert not any(box.overlaps(p.get_window_extent(r)) for p in bars), ax.get_title()
        ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
        assert all(float(t).is_integer() for t in ticks), ticks


def test_fit_legend_covers_no_point_label_or_bar(tmp_path, monkeypatch):
    """delta_vs_cosine of the committed real-14-domains report: the legend,
    placed "best" inside the axes, lay over the point label science+bash
    (lora:shared, lower right). The legend now meets no point, no point label
    and no error bar."""
    from pathlib import Path

    from matplotlib.collections import LineCollection
    from matplotlib.transforms import Bbox

    from loramix.scenario.plots import delta_vs_cosine

    rep = json.loads(
        (Path(__file__).resolve().parents[1] / "reports/real-14-domains/report.json").read_text()
    )
    summary = pd.DataFrame(rep["summary"])
    sums = summary[(summary["merge_method"] == "sum") & np.isfinite(summary["delta_ppl_pct"].astype(float))]
    fits = [f for f in rep["fits"] if f["merge_method"] == "sum"]
    assert len(sums) == 40
    fig = _saved_figure(monkeypatch, lambda: delta_vs_cosine(sums, fits, tmp_path / "d.png", "t"))
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    legends = [lg for lg in [ax.get_legend(), *fig.legends] if lg is not None]
    assert len(legends) == 1 and len(legends[0].get_texts()) == 4
    box = legends[0].get_window_extent(r)
    assert (
        fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 - 1 <= box.y0
    )  # saved whole
    taken = [t.get_window_extent(r) for t in ax.texts]
    assert len(taken) >= 20
    rad = 3.5 * fig.dpi / 72  # a marker of 7 points
    for px, py in ax.transData.transform(sums[["rms_cosine", "delta_ppl_pct"]].to_numpy(float)):
        taken.append(Bbox.from_extents(px - rad, py - rad, px + rad, py + rad))
    for seg in (s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()):
        (x0, y0), (x1, y1) = ax.transData.transform(seg[[0, -1]])
        taken.append(Bbox.from_extents(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    hit = [b for b in taken if box.overlaps(b)]
    assert not hit, hit


def test_predictions_plot_names_its_adapters(tmp_path, monkeypatch):
    """The quickstart validates lora and lora:data adapters; its
    predicted_vs_measured.png (lora's) named the predictor, not the adapters."""
    from pathlib import Path

    from loramix.scenario.answer import write_predictor_files

    rep = json.loads((Path(__file__).resolve().parents[1] / "reports/quickstart/report.json").read_text())
    assert {v["adapter_method"] for v in rep["validations"]} == {"lora", "lora:data"}
    import matplotlib.figure

    titles, real = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (titles.append(fig.axes[0].get_title()), real(fig, *a, **k))[1])  # fmt: skip
    write_predictor_files(tmp_path, rep)
    (title,) = [t for t in titles if "held out" in t]
    assert title.startswith("quickstart: ols:subspace_overlap, lora adapters"), title


def test_one_wide_interval_does_not_flatten_the_predictions(tmp_path, monkeypatch):
    """predicted_vs_measured: one held-out interval of -79..+74 around points
    within a few units set the y axis, and every point lay on a flat line.
    Both axes now span the points (the same range: the diagonal is the
    diagonal), every point inside, and a cut interval ends in a marker at
    the axes' edge that the legend names."""
    from loramix.scenario.plots import predicted_vs_measured

    pred = _quickstart_best_predictions().copy()
    pred.iloc[0, pred.columns.get_loc("low")] = -79.0
    pred.iloc[0, pred.columns.get_loc("high")] = 74.0
    fig = _saved_figure(
        monkeypatch, lambda: predicted_vs_measured(pred, tmp_path / "p.png", "t", "retention_pct (sum)")
    )
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert (x0, x1) == (y0, y1)
    pts = pred[["y", "y_hat"]].to_numpy(float)
    p0, p1 = pts.min(), pts.max()
    assert p0 - (p1 - p0) <= y0 <= p0 and p1 <= y1 <= p1 + (p1 - p0), (y0, y1, p0, p1)
    inside = ax.get_window_extent()
    for px, py in ax.transData.transform(pts):
        assert inside.contains(px, py)
    edges = [ln for ln in ax.lines if ln.get_marker() in ("^", "v") and len(ln.get_xdata())]
    assert {ln.get_marker() for ln in edges} == {"^", "v"}
    for ln in edges:
        assert set(ln.get_ydata()) == {y1 if ln.get_marker() == "^" else y0}
    assert any("cut" in t.get_text() for t in fig.legends[0].get_texts())


def test_cut_intervals_end_inside_a_square_of_readable_axes(tmp_path, monkeypatch):
    """The quickstart's predicted_vs_measured.png: the arrowheads of the
    intervals cut at the top were centred on the axes' edge, half above it,
    touching the title; the axes were named "retention_pct (sum)", and a
    legend beside them left a blank column as tall as the figure. The
    arrowheads now lie inside the axes, which are square (one scale: the
    diagonal at 45 degrees), named as the report names them, the legend
    below."""
    from loramix.scenario.plots import predicted_vs_measured

    pred = _quickstart_best_predictions()
    fig = _saved_figure(
        monkeypatch, lambda: predicted_vs_measured(pred, tmp_path / "p.png", "t", "retention_pct (sum)")
    )
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    inside = ax.get_window_extent(r)
    tops = [ln for ln in ax.lines if ln.get_marker() == "^" and len(ln.get_xdata())]
    assert tops  # the quickstart's intervals run past the top
    for ln in tops:
        half = ln.get_markersize() / 2 * fig.dpi / 72
        for _px, py in ln.get_transform().transform(ln.get_xydata()):
            assert inside.y0 <= py - half and py + half <= inside.y1 + 0.5, (py + half, inside.y1)
    assert abs(inside.width - inside.height) <= 1, inside
    assert ax.get_xlabel() == "measured retention % (sum)" and "_pct" not in ax.get_ylabel()
    (leg,) = fig.legends
    assert leg.get_window_extent(r).y1 <= ax.xaxis.get_tightbbox(r).y0
    _drawn_inside(fig)


def _quickstart_by_layer() -> pd.DataFrame:
    from pathlib import Path

    rep = json.loads((Path(__file__).resolve().parents[1] / "reports/quickstart/report.json").read_text())
    return pd.DataFrame(rep["cosine_by_layer"])


def test_each_layer_panel_fills_its_own_scale(tmp_path, monkeypatch):
    """quickstart's cosine_by_layer: the panels shared a y axis, lora's
    cosines reached 0.5, and lora:data's (at most 0.03) lay flat near 0.
    Each panel's largest cosine now reaches at least half its y axis."""
    from loramix.scenario.plots import cosine_by_layer

    by_layer = _quickstart_by_layer()
    assert set(by_layer["adapter_method"]) == {"lora", "lora:data"}
    fig = _saved_figure(monkeypatch, lambda: cosine_by_layer(by_layer, tmp_path / "c.png", "t"))
    for ax in fig.axes:
        method = ax.get_title().split(" ")[0]
        peak = by_layer.loc[by_layer["adapter_method"] == method, "rms_cosine"].max()
        lo, hi = ax.get_ylim()
        assert lo <= 0 and peak >= (hi - lo) / 2, (method, peak, lo, hi)
        assert any(t.get_text() for t in ax.get_yticklabels()), method  # its own scale is labelled


def test_one_adapted_layer_is_a_bar_per_pair(tmp_path, monkeypatch):
    """A study with top_layers = 1: cosine_by_layer was a single column of
    dots over one x tick, told apart by a legend of ten colours. Each panel
    is now one bar per pair, named on its axis, largest at the top, and the
    names stay inside the figure and apart."""
    from loramix.scenario.plots import cosine_by_layer

    by_layer = _quickstart_by_layer()
    one = by_layer[by_layer["layer"] == by_layer["layer"].max()]
    fig = _saved_figure(monkeypatch, lambda: cosine_by_layer(one, tmp_path / "c.png", "t"))
    for ax in fig.axes:
        method = ax.get_title().split(" ")[0]
        want = one[one["adapter_method"] == method].set_index("pair")["rms_cosine"].sort_values()
        names = [t.get_text() for t in ax.get_yticklabels()]
        assert names == list(want.index), (method, names)
        assert [p.get_width() for p in ax.patches] == list(want), method
        boxes = [t.get_window_extent() for t in ax.get_yticklabels()]
        assert all(fig.bbox.x0 <= b.x0 for b in boxes)
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1 :]), names[i]


def test_the_suptitle_clears_the_first_panel_title(tmp_path, monkeypatch):
    """d2-vs-lora's delta_by_method (three panels stacked, 13.8 in tall, before they were put in a row):
    tight_layout left 3 px between the figure's title and the first panel's
    title, which read as one line run into the other."""
    from pathlib import Path

    from loramix.scenario.plots import TITLE_GAP_PT, delta_by_method

    rep = json.loads((Path(__file__).resolve().parents[1] / "reports/d2-vs-lora/report.json").read_text())
    summary = pd.DataFrame(rep["summary"])
    summary = summary[np.isfinite(summary["delta_ppl_pct"].astype(float))]
    fig = _saved_figure(
        monkeypatch,
        lambda: delta_by_method(summary, tmp_path / "b.png", "d2-vs-lora: Δppl % by merge method"),
    )
    assert len(fig.axes) == 3
    r = fig.canvas.get_renderer()
    sup = fig._suptitle.get_window_extent(r)
    assert sup.y1 <= fig.bbox.y1
    for ax in fig.axes:
        gap = sup.y0 - ax.get_tightbbox(r).y1
        assert gap >= TITLE_GAP_PT * fig.dpi / 72 - 0.5, (ax.get_title(), gap)


def test_every_layer_line_lies_inside_its_panel(tmp_path, monkeypatch):
    """real-14-domains' cosine_by_layer (lora up to 0.21, lora:shared up to
    0.31, one shared y axis): the y axis set from 0 in the first panel froze
    its top at 0.22 and cut lora:shared's most similar pairs off the top."""
    from pathlib import Path

    from loramix.scenario.plots import cosine_by_layer

    rep = json.loads(
        (Path(__file__).resolve().parents[1] / "reports/real-14-domains/report.json").read_text()
    )
    by_layer = pd.DataFrame(rep["cosine_by_layer"])
    fig = _saved_figure(monkeypatch, lambda: cosine_by_layer(by_layer, tmp_path / "c.png", "t"))
    assert len(fig.axes) == 2
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        ys = np.concatenate([np.asarray(ln.get_ydata(), float) for ln in ax.lines])
        assert lo <= 0 and lo <= ys.min() and ys.max() <= hi, (ax.get_title(), ys.max(), hi)


def test_a_pair_has_one_colour_in_every_layer_panel(tmp_path, monkeypatch):
    """real-14-domains' cosine_by_layer coloured each panel's named pairs in
    its own order: law+history was grey in lora's panel and pink in
    lora:shared's, where pink had been economics+nq_open."""
    from pathlib import Path

    from matplotlib.colors import to_hex

    from loramix.scenario.plots import cosine_by_layer

    rep = json.loads(
        (Path(__file__).resolve().parents[1] / "reports/real-14-domains/report.json").read_text()
    )
    by_layer = pd.DataFrame(rep["cosine_by_layer"])
    fig = _saved_figure(monkeypatch, lambda: cosine_by_layer(by_layer, tmp_path / "c.png", "t"))
    seen: dict[str, tuple] = {}
    for ax in fig.axes:  # a pair's style: its colour, line style and marker
        named = {ln.get_label(): (to_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker())
                 for ln in ax.lines if "+" in ln.get_label()}  # fmt: skip
        assert len(named) == 10 and len(set(named.values())) == 10, named  # apart within a panel
        for pair, color in named.items():
            assert seen.setdefault(pair, color) == color, pair
    by_colour: dict[str, set] = {}
    for pair, color in seen.items():
        by_colour.setdefault(color, set()).add(pair)
    assert all(len(p) == 1 for p in by_colour.values()), by_colour  # and across them


def test_layer_panels_name_their_pairs_in_one_legend(tmp_path, monkeypatch):
    """d2-vs-lora's cosine_by_layer: three panels, each with a legend beside it
    naming the same six pairs in the same colours, 25 in wide. One legend now
    names each pair once, beside the last panel, and the figure is narrower."""
    from pathlib import Path

    from loramix.scenario.plots import cosine_by_layer

    rep = json.loads((Path(__file__).resolve().parents[1] / "reports/d2-vs-lora/report.json").read_text())
    by_layer = pd.DataFrame(rep["cosine_by_layer"])
    fig = _saved_figure(monkeypatch, lambda: cosine_by_layer(by_layer, tmp_path / "c.png", "t"))
    legends = [lg for ax in fig.axes for lg in [ax.get_legend()] if lg is not None]
    assert len(fig.axes) == 3 and len(legends) == 1 and fig.axes[-1].get_legend() is legends[0]
    names = [t.get_text() for t in legends[0].get_texts()]
    assert sorted(names) == sorted(set(by_layer["pair"])), names
    assert fig.get_size_inches()[0] <= 18
    _drawn_inside(fig)


def test_plan_legends_lie_under_their_panels(tmp_path, monkeypatch):
    """real-14-domains' plan_vs_random.png: each panel's legend beside it, and
    tight_layout's even spacing left 2.4 in of blank between the panels. The
    legends now lie under their panels' x axis labels, inside the figure."""
    from pathlib import Path

    from loramix.scenario.plots import plan_vs_random

    rep = json.loads(
        (Path(__file__).resolve().parents[1] / "reports/real-14-domains/report.json").read_text()
    )
    ms = [m for m in rep["plan_validation"]["by_method"] if m["comparison"] is not None]
    panels = [(m["how"], m["plan"]["retention_pct"], [x["retention_pct"] for x in m["random"]]) for m in ms]
    assert len(panels) == 2
    fig = _saved_figure(monkeypatch, lambda: plan_vs_random(panels, tmp_path / "p.png", "t"))
    r = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        box, axis = ax.get_legend().get_window_extent(r), ax.xaxis.get_tightbbox(r)
        assert box.y1 <= axis.y0 and fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, ax.get_title()
        boxes.append(box)
    assert not boxes[0].overlaps(boxes[1])
    _drawn_inside(fig)


def test_a_long_title_over_one_panel_is_wrapped_inside_the_figure(tmp_path, monkeypatch):
    """merge-groups-14-domains' plan_vs_random.png has one panel, 5.2 in wide;
    its title (the study's name, the label and the seed) ran off both edges.
    A title wider than the figure is now wrapped onto lines that fit; a short
    one stays one line."""
    from loramix.scenario.plots import plan_vs_random

    panels = [("plan", 4.31, [5.0, 9.5, 16.1, 7.2, 10.3])]
    title = "merge-groups-14-domains: loramix plan against random groupings (lora, seed 0)"
    fig = _saved_figure(monkeypatch, lambda: plan_vs_random(panels, tmp_path / "p.png", title))
    assert fig._suptitle.get_text().count("\n") >= 1 and " ".join(fig._suptitle.get_text().split()) == title
    _drawn_inside(fig)
    fig = _saved_figure(monkeypatch, lambda: plan_vs_random(panels, tmp_path / "q.png", "short"))
    assert fig._suptitle.get_text() == "short"


def test_forty_named_pairs_are_told_apart_by_colour_and_line_style(tmp_path, monkeypatch):
    """Four panels of ten different named pairs each. tab20 gave them twenty
    colours, its light shades beside its dark ones (the 1st and 11th pair dark
    and light blue, both solid with round markers), and the 21st pair on the
    1st's colour with another marker: no set of twenty colours separates
    them. Now at most eight colours, and pairs of one colour differ in line
    style and in marker: each pair's (colour, line style, marker) is its own,
    and the legend names the forty pairs in their order."""
    from matplotlib.colors import to_hex

    from loramix.scenario.plots import cosine_by_layer

    rows = [{"adapter_method": m, "pair": f"{m}{i}+x", "layer": layer, "rms_cosine": 0.01 * (i + 1) + 0.001 * layer}
            for m in ("a", "b", "c", "d") for i in range(10) for layer in (0, 1)]  # fmt: skip
    fig = _saved_figure(monkeypatch, lambda: cosine_by_layer(pd.DataFrame(rows), tmp_path / "c.png", "t"))
    # the dash pattern itself: get_linestyle() says "--" for any custom one (matplotlib has no public getter)
    lines = {ln.get_label(): (to_hex(ln.get_color()), str(ln._unscaled_dash_pattern), ln.get_marker())
             for ax in fig.axes for ln in ax.lines if "+" in ln.get_label()}  # fmt: skip
    assert len(lines) == 40 and len(set(lines.values())) == 40, lines
    colours = {c for c, _, _ in lines.values()}
    assert len(colours) <= 8, colours
    for c in colours:
        same = [(d, m) for cc, d, m in lines.values() if cc == c]
        assert len({d for d, _ in same}) == len(same) and len({m for _, m in same}) == len(same), (c, same)
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert legend == [f"{m}{i}+x" for m in "abcd" for i in range(10)], legend


# ---------------------------------------------------------------- which adapters compose?


def _compose_report() -> dict:
    """A one-seed study of three domains by hand: base ppl 10 on each; own
    adapters a 5 (a gain of 5), b 12 and c 11 (no gain: worse than the base)."""
    base, own = {"a": 10.0, "b": 10.0, "c": 10.0}, {"a": 5.0, "b": 12.0, "c": 11.0}
    merged = {("sum", "a+b"): {"a": 6.0, "b": 9.0}, ("ties", "a+b"): {"a": 7.0, "b": 8.0},
              ("sum", "b+c"): {"b": 9.0, "c": 9.0}, ("ties", "b+c"): {"b": 9.5, "c": 9.5}}  # fmt: skip
    ev = [
        {"adapter_method": "lora", "seed": 0, "model": "base", "domain": d, "ppl": p} for d, p in base.items()
    ]
    ev += [{"adapter_method": "lora", "seed": 0, "model": f"adapter:{d}", "domain": d, "ppl": p}
           for d, p in own.items()]  # fmt: skip
    ev += [{"adapter_method": "lora", "seed": 0, "model": f"merge:{m}:{c}", "domain": d, "ppl": p}
           for (m, c), ps in merged.items() for d, p in ps.items()]  # fmt: skip
    summary = [{"adapter_method": "lora", "composition": c, "k": 2, "merge_method": m, "retention_pct": 1.0,
                "retention_pct_std": None} for m, c in merged]  # fmt: skip
    return {"evaluations": ev, "summary": summary, "scenario": {"name": "hand", "seeds": [0]}}


def test_a_figure_is_printed_on_its_verdicts_side(tmp_path, monkeypatch):
    """qa-three-domains' math+medicine: its worst member kept 49.6 %, and the
    table and the pair map printed "50" beside "does not compose". A figure
    now takes the decimals that keep it on its verdict's side of 50 and 90."""
    from loramix.scenario import compose
    from loramix.scenario.plots import threshold_text
    from loramix.scenario.report import _View

    assert [threshold_text(x, (50.0, 90.0)) for x in (49.6, 89.5, 89.96, 89.9996, 90.0, 50.4, 91.2, -3.7)] == [
        "49.6", "89.5", "89.96", "89.9996", "90", "50", "91", "-4"]  # fmt: skip
    report = _compose_report()
    for e in report["evaluations"]:
        if e["model"] in ("merge:sum:a+b", "merge:ties:a+b") and e["domain"] == "a":
            # a keeps 100 (10 - 7.52) / (10 - 5) = 49.6 % by sum, 40 % by ties
            e["ppl"] = 7.52 if "sum" in e["model"] else 8.0
    ab = compose.compute(report)[0]
    assert ab["kept_worst_pct"] == pytest.approx(49.6) and ab["verdict"] == "does not compose"
    text = "\n".join(compose.section(report, _View({**report, "environment": {}})))
    assert "| 1 | a+b | does not compose | `sum` | 49.6 |" in text
    report["similarity_mean"] = [
        {"adapter_method": "lora", "names": ["a", "b", "c"], "rms": np.eye(3).tolist()}
    ]
    fig = _saved_figure(monkeypatch, lambda: compose.write_files(tmp_path, report, cache=None))
    assert "49.6" in [t.get_text().split("\n")[0] for t in fig.axes[0].texts]


def test_a_member_with_no_gain_has_none_to_keep():
    """A member whose own adapter does not beat the base has no gain to keep:
    left out of its composition's figure (named in ``no_gain``), and a
    composition of such members only is ranked last with that verdict."""
    from loramix.io.outputs import json_safe
    from loramix.scenario import compose
    from loramix.scenario.report import _View

    report = _compose_report()
    rows = compose.compute(report)
    assert [(r["composition"], r["rank"]) for r in rows] == [("a+b", 1), ("b+c", 2)]
    ab, bc = rows
    # a keeps 100 (10 - 6) / (10 - 5) = 80 % by sum, 60 % by ties
    assert ab["best_method"] == "sum" and ab["kept_worst_pct"] == pytest.approx(80.0)
    assert (ab["worst_member"], ab["no_gain"], ab["verdict"], ab["runner_up"]) == ("a", "b", "partly", "ties")
    assert ab["by_method"] == {"sum": pytest.approx(80.0), "ties": pytest.approx(60.0)}
    assert bc["verdict"] == "no gain to keep" and bc["worst_member"] is None and bc["no_gain"] == "b+c"
    json.dumps(json_safe(rows), allow_nan=False)  # report.json takes them
    text = "\n".join(compose.section(report, _View({**report, "environment": {}})))
    assert "**lora**, 2 compositions: 0 compose, 1 partly, 0 do not, 1 have no gain to keep" in text
    assert "| 2 | b+c | no gain to keep | `sum` | — | — |" in text


def test_a_kind_with_several_sizes_gets_a_by_size_table():
    """Compositions of two sizes: each method's worst-member kept gain averaged
    per size (a composition with no gain to keep left out), the verdicts and
    the best methods counted per size; one size has no such table."""
    from loramix.scenario import compose
    from loramix.scenario.report import _View

    report = _compose_report()
    one_size = "\n".join(compose.section(report, _View({**report, "environment": {}})))
    assert "By size" not in one_size
    # a keeps 100 (10 - 7) / 5 = 60 % by sum, 100 (10 - 6.5) / 5 = 70 % by ties; b and c have no gain
    for m, p in (("sum", 7.0), ("ties", 6.5)):
        report["evaluations"] += [{"adapter_method": "lora", "seed": 0, "model": f"merge:{m}:a+b+c", "domain": d,
                                   "ppl": q} for d, q in (("a", p), ("b", 9.0), ("c", 9.0))]  # fmt: skip
        report["summary"].append({"adapter_method": "lora", "composition": "a+b+c", "k": 3, "merge_method": m,
                                  "retention_pct": 1.0, "retention_pct_std": None})  # fmt: skip
    got = compose.size_rows(compose.compute(report))
    assert [(g["k"], g["n"], g["partly"], g["no gain to keep"]) for g in got] == [(2, 2, 1, 1), (3, 1, 1, 0)]
    assert got[0]["kept"] == {"sum": pytest.approx(80.0), "ties": pytest.approx(60.0)}
    assert got[1]["kept"] == {"sum": pytest.approx(60.0), "ties": pytest.approx(70.0)}
    assert (got[0]["best"], got[1]["best"]) == ({"sum": 1, "ties": 0}, {"sum": 0, "ties": 1})
    text = "\n".join(compose.section(report, _View({**report, "environment": {}})))
    assert "| 2 | 2 | 0 / 1 / 0 | 80.0 | 60.0 | `sum` 1 |" in text
    assert "| 3 | 1 | 0 / 1 / 0 | 60.0 | 70.0 | `ties` 1 |" in text
    assert f"![kept gain by size]({compose.SIZE_PNG})" in text
    # the figure's panels: each composition's figure per method and size (b+c: no gain, None)
    ((label, by),) = compose.size_panels(compose.compute(report))
    assert label == "lora" and list(by) == ["sum", "ties"]
    assert by["sum"] == {2: [pytest.approx(80.0), None], 3: [pytest.approx(60.0)]}
    assert by["ties"] == {2: [pytest.approx(60.0), None], 3: [pytest.approx(70.0)]}


def test_kept_by_size_puts_the_points_far_below_the_base_on_its_floor(tmp_path, monkeypatch):
    """merge-groups-14-domains: the sum of four real adapters left its worst
    member at -704 %, which would squeeze every other point into a sliver.
    Points (and means) below KEPT_FLOOR lie on it as triangles, counted in the
    panel's title, a floored mean's value written under it; the rest keep
    their values; everything inside the figure."""
    from loramix.scenario.plots import KEPT_FLOOR, kept_by_size

    by = {"sum": {2: [80.0, -20.0, None], 4: [-704.0, 10.0]}, "tsv": {2: [90.0, 85.0], 4: [50.0, 40.0]}}
    fig = _saved_figure(
        monkeypatch, lambda: kept_by_size([("lora", by)], tmp_path / "s.png", "t", (50.0, 90.0))
    )
    (ax,) = fig.axes
    assert ax.get_title() == f"lora (1 below {KEPT_FLOOR:g}: on the floor, ▼)"
    ys = sorted(
        float(y) for line in ax.get_lines() if line.get_marker() in ("o", "v") for y in line.get_ydata()
    )
    assert ys[0] == KEPT_FLOOR and -704.0 not in ys and {-20.0, 10.0, 40.0, 80.0, 90.0} <= set(ys)
    assert ax.get_ylim()[0] < KEPT_FLOOR and [t.get_text() for t in ax.texts] == ["-347"]  # sum's mean at 4
    assert (tmp_path / "s.png").is_file()
    _drawn_inside(fig)
    # each method named once in the legend: one whose first size lies all on the floor (was named
    # twice) and one that starts at a later size (was not named at all)
    by = {"sum": {2: [-500.0], 4: [10.0]}, "tsv": {2: [], 4: [50.0]}}
    fig = _saved_figure(
        monkeypatch, lambda: kept_by_size([("lora", by)], tmp_path / "l.png", "t", (50.0, 90.0))
    )
    assert sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()) == ["mean", "sum", "tsv"]


def test_kept_gain_is_one_formula_for_points_and_resamples():
    """compose.kept_gain is the formula of both the point figures (member_shares)
    and the bootstrap's (worst_resamples): on resamples that repeat each
    evaluation's perplexity (a constant resample), every resample's worst
    member keeps exactly the figure's gain; a member whose own adapter does
    not beat the base (b, c) has none (NaN)."""
    from loramix.scenario import compose

    k = compose.kept_gain([10.0, 10.0, 10.0, 10.0], [5.0, 12.0, 10.0, 8.0], [6.0, 9.0, 8.0, 11.0])
    assert k[0] == 100.0 * (10.0 - 6.0) / (10.0 - 5.0) and k[3] == 100.0 * (10.0 - 11.0) / (10.0 - 8.0)
    assert np.isnan(k[1]) and np.isnan(k[2])
    for report in (_compose_report(), _noisy_report()):
        seeds = report["scenario"]["seeds"]
        boot = {(e["adapter_method"], e["seed"], e["domain"], e["model"]): np.full(7, e["ppl"])
                for e in report["evaluations"]}  # fmt: skip
        rows = [r for r in compose.compute(report) if np.isfinite(r["kept_worst_pct"])]
        assert rows
        for r in rows:
            for m, kept in r["by_method"].items():
                worst = compose.worst_resamples(boot, "lora", r["composition"], m, seeds, r["no_gain"])
                assert worst.shape == (7,) and worst == pytest.approx(np.full(7, kept), rel=1e-12, abs=0)


def test_the_kept_gain_map_follows_the_similarity_heatmaps(tmp_path, monkeypatch):
    """kept_gain.png of the committed real study: each panel's domains in
    its similarity heatmap's clustered order, each cell the pair's rounded
    (:func:`threshold_text`) figure, "~" before it within eval noise, and best method, every
    text (the colour bar's key included)
    inside the figure."""
    from pathlib import Path

    from loramix.scenario import compose
    from loramix.scenario.plots import cluster_order, threshold_text

    report = json.loads(
        (Path(__file__).resolve().parents[1] / "reports/real-14-domains/report.json").read_text()
    )
    fig = _saved_figure(monkeypatch, lambda: compose.write_files(tmp_path, report))
    rows = {(r["adapter_method"], r["composition"]): r for r in compose.rows(report)}
    panels = fig.axes[:-1]
    assert len(panels) == len(report["similarity_mean"]) == 2
    for ax, sim in zip(panels, report["similarity_mean"]):
        order = [sim["names"][i] for i in cluster_order(np.array(sim["rms"], dtype=float))]
        assert [t.get_text() for t in ax.get_yticklabels()] == order
        texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        assert len(texts) == len(order) * (len(order) - 1)
        for (i, j), text in texts.items():
            a, b = order[i], order[j]
            r = rows.get((sim["adapter_method"], f"{a}+{b}")) or rows[(sim["adapter_method"], f"{b}+{a}")]
            noisy = "~" if r.get("verdict_within_eval_noise") else ""
            assert text == f"{noisy}{threshold_text(r['kept_worst_pct'], (50.0, 90.0))}\n{r['best_method']}"
    _every_text_inside(fig)
    # the figure's title is the study's (the last panel's title took its name)
    want = "real-14-domains: share of the worse member's gain the best merge keeps"
    assert fig._suptitle is not None and fig._suptitle.get_text() == want, fig._suptitle


def _every_text_inside(fig) -> None:
    box = fig.bbox
    renderer = fig.canvas.get_renderer()
    for t in [*fig.findobj(lambda o: hasattr(o, "get_text") and o.get_text())]:
        e = t.get_window_extent(renderer)
        assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1, t


def _drawn_inside(fig) -> None:
    """Every axes with what it draws (titles, labels, the tick labels in view,
    its legend), every figure legend and the figure's title inside the saved figure."""
    box, r = fig.bbox, fig.canvas.get_renderer()
    sup = [fig._suptitle.get_window_extent(r)] if fig._suptitle is not None else []
    for e in [
        *(ax.get_tightbbox(r) for ax in fig.axes),
        *(lg.get_window_extent(r) for lg in fig.legends),
        *sup,
    ]:
        assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1, e


def test_a_small_kept_gain_map_keeps_its_key_inside(tmp_path, monkeypatch):
    """d2-vs-lora's kept_gain.png (four domains, three panels, 5 in tall):
    the colour bar's one-line key ran longer than the bar and was cut off at
    the figure's bottom and top; lora's panel, all of its pairs best by sum,
    never said which merge it showed."""
    from pathlib import Path

    from loramix.scenario import compose

    report = json.loads((Path(__file__).resolve().parents[1] / "reports/d2-vs-lora/report.json").read_text())
    fig = _saved_figure(monkeypatch, lambda: compose.write_files(tmp_path, report))
    assert len(fig.axes) == 4
    _every_text_inside(fig)
    # a panel whose pairs all have one best method names it (its cells name none)
    assert [ax.get_title() for ax in fig.axes[:-1]] == [
        "lora (best method: sum)", "lora@16 (best method: sum)", "d2lora (best method under each value)"]  # fmt: skip


def test_the_kept_gain_colour_bar_stands_beside_the_last_map(tmp_path, monkeypatch):
    """quickstart's kept_gain.png: tight_layout spaced the colour bar from the
    last map as far as one map from the next one's domain names, 1.0 in of
    blank. The bar now stands BAR_PAD_IN (0.25 in) from the map, every text inside."""
    from pathlib import Path

    from loramix.scenario import compose

    report = json.loads((Path(__file__).resolve().parents[1] / "reports/quickstart/report.json").read_text())
    fig = _saved_figure(monkeypatch, lambda: compose.write_files(tmp_path, report))
    r = fig.canvas.get_renderer()
    *maps, bar = fig.axes
    assert len(maps) == 2
    gap = (bar.get_window_extent(r).x0 - maps[-1].get_window_extent(r).x1) / fig.dpi
    assert 0 < gap <= 0.3, gap  # BAR_PAD_IN, 0.25 in
    _every_text_inside(fig)


def _noisy_report() -> dict:
    """A two-seed study of three domains by hand with per-record NLL: a, b
    and c have 5, 7 and 6 eval records of 3-9 tokens; each model's record
    NLL is its own per-token level times noise, and its ``ppl`` the pooled
    ``exp(sum NLL / sum tokens)``. c's own adapter is worse than the base
    (no gain to keep), though better on some resamples, where c's share
    (its merges are worse still) would be the worst."""
    rng = np.random.default_rng(5)
    n = {"a": 5, "b": 7, "c": 6}
    toks = {d: rng.integers(3, 10, size=k).tolist() for d, k in n.items()}
    # per-token NLL level of each model: base 2.3, own adapters lower, merges in between
    level = {"base": 2.3, "adapter": 1.6, "merge:sum:a+b": 1.75, "merge:ties:a+b": 1.9,
             "merge:sum:a+b+c": 2.0, "merge:ties:a+b+c": 2.1}  # fmt: skip
    ev, summary = [], []
    for seed in (0, 1):
        for model, lv in level.items():
            doms = n if not model.startswith("merge:") else model.split(":")[2].split("+")
            for d in doms:
                m = f"adapter:{d}" if model == "adapter" else model
                lv = 2.45 if m == "adapter:c" else 2.6 if d == "c" and m.startswith("merge:") else lv
                nll = [lv * t * float(rng.uniform(0.8, 1.2)) for t in toks[d]]
                ppl = float(np.exp(sum(nll) / sum(toks[d])))
                ev.append({"adapter_method": "lora", "seed": seed, "model": m, "domain": d, "ppl": ppl,
                           "tokens": sum(toks[d]), "nll": sum(nll), "record_nll": nll, "record_tokens": toks[d]})  # fmt: skip
    for c in ("a+b", "a+b+c"):
        for meth in ("sum", "ties"):
            summary.append({"adapter_method": "lora", "composition": c, "k": len(c.split("+")),
                            "merge_method": meth, "retention_pct": 1.0, "retention_pct_std": 0.0})  # fmt: skip
    return {"evaluations": ev, "summary": summary, "scenario": {"seeds": [0, 1]}}


def _interval_by_loop(report: dict, comp: str, method: str, skip: str) -> tuple[float, float]:
    """The eval interval resample by resample, record by record, without the
    members ``skip`` (no gain to keep in the figure)."""
    from loramix.scenario import compose

    ev = {(e["seed"], e["model"], e["domain"]): e for e in report["evaluations"]}
    seeds, members = report["scenario"]["seeds"], [d for d in comp.split("+") if d not in skip.split("+")]
    idx = {d: compose.resample_indices(d, len(ev[(0, "base", d)]["record_nll"])) for d in members}
    worst = []
    for r in range(compose.BOOT_RESAMPLES):
        shares = []
        for d in members:
            ks = []
            for s in seeds:
                ppl = {}
                for model in ("base", f"adapter:{d}", f"merge:{method}:{comp}"):
                    e = ev[(s, model, d)]
                    nll = sum(e["record_nll"][j] for j in idx[d][r])
                    ppl[model] = math.exp(nll / sum(e["record_tokens"][j] for j in idx[d][r]))
                gain = ppl["base"] - ppl[f"adapter:{d}"]
                if gain > 0:
                    ks.append(100 * (ppl["base"] - ppl[f"merge:{method}:{comp}"]) / gain)
            if ks:
                shares.append(sum(ks) / len(ks))
        if shares:
            worst.append(min(shares))
    worst.sort()

    def pct(q):  # linear between the closest ranks, numpy's default
        pos = q / 100 * (len(worst) - 1)
        i = int(pos)
        return worst[i] + (pos - i) * (worst[min(i + 1, len(worst) - 1)] - worst[i])

    return pct(5.0), pct(95.0)


def test_eval_interval_is_a_paired_bootstrap_of_the_worst_member():
    """Each composition's 90 % eval interval equals a record-by-record loop over
    the same resamples; a verdict whose interval crosses 50 or 90 is within eval
    noise; the section explains it once and counts the noisy verdicts; the CSV
    has the interval last; a composition with an evaluation lacking per-record
    NLL has no interval, said once."""
    from loramix.scenario import compose
    from loramix.scenario.report import _View

    report = _noisy_report()
    rows = compose.compute(report)
    assert len(rows) == 2
    for r in rows:
        lo, hi = _interval_by_loop(report, r["composition"], r["best_method"], r["no_gain"])
        assert (r["kept_worst_pct_lo"], r["kept_worst_pct_hi"]) == (
            pytest.approx(lo, rel=1e-9),
            pytest.approx(hi, rel=1e-9),
        )
        assert lo < hi
        crosses = any(lo < t <= hi for t in (50, 90))
        assert r["verdict_within_eval_noise"] == crosses
    assert compose.compute(report) == rows  # seeded: a re-render gives the same figures
    # c, with no gain to keep in a+b+c's figure, is left out of its interval too
    abc = next(r for r in rows if r["composition"] == "a+b+c")
    assert abc["no_gain"] == "c"
    boot = compose.resampled_ppl(pd.DataFrame(report["evaluations"]))
    with_c = compose.eval_interval(boot, "lora", "a+b+c", abc["best_method"], [0, 1])
    assert with_c[0] < abc["kept_worst_pct_lo"] - 10
    text = "\n".join(compose.section(report, _View({**report, "environment": {}})))
    assert text.count("paired bootstrap") == 1
    noisy = sum(bool(r["verdict_within_eval_noise"]) for r in rows)
    assert f"; {noisy} verdict(s) within eval noise" in text
    r = rows[0]
    assert f"| {r['kept_worst_pct_lo']:.0f} to {r['kept_worst_pct_hi']:.0f} |" in text
    df = compose.csv_frame(rows)
    assert list(df.columns[-3:]) == list(compose.BOOT_COLUMNS)
    # a+b+c's merges on a without per-record NLL in one seed (evaluations cached before they were kept)
    for e in report["evaluations"]:
        if e["model"].endswith(":a+b+c") and e["domain"] == "a" and e["seed"] == 1:
            del e["record_nll"], e["record_tokens"]
    rows2 = {r["composition"]: r for r in compose.compute(report)}
    assert rows2["a+b+c"]["kept_worst_pct_lo"] is None and rows2["a+b+c"]["verdict_within_eval_noise"] is None
    assert (
        rows2["a+b"]["kept_worst_pct_lo"]
        == rows[[r["composition"] for r in rows].index("a+b")]["kept_worst_pct_lo"]
    )
    text = "\n".join(compose.section(report, _View({**report, "environment": {}})))
    assert "1 composition(s) have none" in text


def test_the_kept_gain_map_marks_a_verdict_within_eval_noise(tmp_path, monkeypatch):
    """A pair whose verdict is within eval noise is written ``~`` and in italics,
    and the colour bar's key says so; a map without such a pair is as before."""
    from loramix.scenario import compose

    report = {**_noisy_report(), "similarity_mean": [{"adapter_method": "lora", "names": ["a", "b", "c"],
              "rms": [[1.0, 0.1, 0.2], [0.1, 1.0, 0.3], [0.2, 0.3, 1.0]]}]}  # fmt: skip
    report["scenario"]["name"] = "noisy"
    ab = next(r for r in compose.compute(report) if r["composition"] == "a+b")
    assert ab["verdict_within_eval_noise"]  # 43 to 80: crosses 50
    fig = _saved_figure(monkeypatch, lambda: compose.write_files(tmp_path, report))
    cells = [t for t in fig.axes[0].texts if t.get_text()]
    assert len(cells) == 2 and all(t.get_text() == f"~{ab['kept_worst_pct']:.0f}" for t in cells)
    assert all(t.get_style() == "italic" for t in cells)
    assert "~ italic: within eval noise" in fig.axes[-1].get_ylabel()
    _every_text_inside(fig)
    for r in report["evaluations"]:  # no per-record NLL: no interval, no mark
        del r["record_nll"], r["record_tokens"]
    fig = _saved_figure(monkeypatch, lambda: compose.write_files(tmp_path, report))
    assert [t.get_text() for t in fig.axes[0].texts if t.get_text()] == [f"{ab['kept_worst_pct']:.0f}"] * 2
    assert "eval noise" not in fig.axes[-1].get_ylabel()


def test_the_kept_gain_map_reads_without_red_green_vision(tmp_path, monkeypatch):
    """kept_gain.png ran from red (0) to green (100), ends that look alike to a
    reader with a red-green colour deficiency: now red to blue through yellow at
    50 (RdYlBu), the bad end red and the good end blue by the colour bar, its ends
    apart in blue; a pair not merged is hatched, not white, which a kept
    gain near 50 nearly is."""
    from matplotlib.colors import to_rgb

    from loramix.scenario.plots import kept_gain_heatmap

    kept = [[None, 0.0, 100.0], [0.0, None, None], [100.0, None, None]]
    method = [["", "sum", "sum"], ["sum", "", ""], ["sum", "", ""]]
    fig = _saved_figure(monkeypatch, lambda: kept_gain_heatmap([("lora", ["a", "b", "c"], kept, method)],
                                                               tmp_path / "k.png", "t", (50.0, 90.0)))  # fmt: skip
    cmap = fig.axes[0].images[-1].get_cmap()  # the values' (the first image is the grey diagonal)
    assert cmap.name == "RdYlBu"
    (r0, _, b0), (r1, _, b1) = to_rgb(cmap(0.0)), to_rgb(cmap(1.0))
    # bad: red, good: blue, apart on the blue-yellow axis that a red-green deficiency keeps
    assert r0 > 0.6 > b0 and b1 > 0.5 > r1 and b1 - b0 > 0.3
    hatched = [p for p in fig.axes[0].patches if p.get_hatch() == "//"]
    assert len(hatched) == 2  # b+c and c+b, not merged; the diagonal stays grey
    assert "hatched: not merged" in fig.axes[-1].get_ylabel()
