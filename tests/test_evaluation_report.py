"""The recall-at-K plot of ``blipitm eval``, inspected through matplotlib's objects (not pixels)."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes

from blipitm.evaluation.report import recall_figure

MODEL = "Salesforce/blip-itm-base-flickr"


def axes(curves: dict[str, np.ndarray]) -> Axes:
    fig = recall_figure(curves, model=MODEL, images=1000, captions=5000)
    assert len(fig.axes) == 1
    return fig.axes[0]


def curves(max_k: int) -> dict[str, np.ndarray]:
    ramp = np.minimum(100.0, 60.0 + 5.0 * np.arange(max_k))
    top = np.full(max_k, 100.0)
    # Two pairs of identical curves, as a strong model gives (every recall 100 from K = 1).
    return {"TR, ITM": top, "IR, ITM": top.copy(), "TR, ITC": ramp, "IR, ITC": ramp.copy()}


def test_ticks_and_markers_at_the_reported_k() -> None:
    ax = axes(curves(50))
    ticks = dict(zip(ax.get_xticks(), (t.get_text() for t in ax.get_xticklabels()), strict=True))
    assert {1: "1", 5: "5", 10: "10"}.items() <= ticks.items()
    assert len(ax.xaxis.get_minorticklocs()) == 0  # no unlabelled log ticks between them
    for line in ax.get_lines():
        assert line.get_marker() not in (None, "", "None")
        marked = np.asarray(line.get_xdata())[line.get_markevery()]
        assert marked.tolist() == [1, 5, 10]


def test_markers_only_where_the_curve_reaches() -> None:
    ax = axes(curves(6))
    for line in ax.get_lines():
        assert np.asarray(line.get_xdata())[line.get_markevery()].tolist() == [1, 5]


def test_coinciding_curves_stay_visible() -> None:
    lines = axes(curves(50)).get_lines()
    assert len(lines) == 4
    assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == 4
    # Drawn in order, each thinner than the last: a curve on top of another leaves it showing.
    widths = [line.get_linewidth() for line in lines]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 4


def test_title_names_model_and_sizes() -> None:
    title = axes(curves(50)).get_title()
    assert MODEL in title and "1000 images" in title and "5000 captions" in title
