"""Writing an evaluation's results: a console table, ``results.json``, ``report.md`` + a plot."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blipitm.common.files import atomic_write_bytes, atomic_write_json
from blipitm.evaluation.metrics import recall_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT = "recall_at_k.png"
ROWS = (
    ("TR (ITM rerank)", "itm", "txt"),
    ("IR (ITM rerank)", "itm", "img"),
    ("TR (ITC only)", "itc", "txt"),
    ("IR (ITC only)", "itc", "img"),
)


def table(results: dict[str, Any]) -> str:
    """Recall table: text retrieval (TR, image -> text) and image retrieval (IR), in percent."""
    lines = [f"{'':<16} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'mean':>6}"]
    for label, method, side in ROWS:
        m = results[method]
        lines.append(
            f"{label:<16} {m[f'{side}_r1']:>6.2f} {m[f'{side}_r5']:>6.2f} "
            f"{m[f'{side}_r10']:>6.2f} {m[f'{side}_r_mean']:>6.2f}"
        )
    itm, itc = results["itm"]["r_mean"], results["itc"]["r_mean"]
    lines.append(f"r_mean: {itm:.2f} (ITM rerank), {itc:.2f} (ITC only)")
    return "\n".join(lines)


def write_outputs(out: Path, results: dict[str, Any], curves: dict[str, np.ndarray]) -> None:
    """``results.json``, ``recall_at_k.png`` and ``report.md`` under ``out`` (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    cfg = results["config"]
    figure = recall_figure(
        curves, model=results["model"]["source"], images=cfg["images"], captions=cfg["texts"]
    )
    atomic_write_bytes(out / PLOT, _png(figure))
    atomic_write_bytes(out / "report.md", _markdown(results).encode())


def curves_from_ranks(ranks: dict[str, np.ndarray], max_k: int) -> dict[str, np.ndarray]:
    return {name: recall_curve(r, max_k) for name, r in ranks.items()}


# The K the tables report; the plot marks and labels exactly these.
MARKED_K = (1, 5, 10)
# Recalls of a good model coincide (all at 100 from some K on). Each curve has its own dash
# pattern and marker, and is drawn thinner than the one before, so an overlaid curve leaves the
# earlier one showing on both sides of it.
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D")


def recall_figure(
    curves: dict[str, np.ndarray], *, model: str, images: int, captions: int
) -> Figure:
    """Recall at K = 1..len(curve) for each named curve, marked at :data:`MARKED_K`."""
    # Imported here: matplotlib takes a second to import. Figure, not pyplot: no global state
    # and no display backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    ax = fig.subplots()
    widths = np.linspace(4.0, 1.5, max(len(curves), 1))
    max_k = 1
    for i, (name, values) in enumerate(curves.items()):
        ks = np.arange(1, len(values) + 1)
        max_k = max(max_k, len(values))
        ax.plot(
            ks,
            values,
            label=name,
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            linewidth=widths[i],
            marker=_MARKERS[i % len(_MARKERS)],
            markevery=[k - 1 for k in MARKED_K if k <= len(values)],
            markersize=widths[i] + 4,
            markerfacecolor="none",
        )
    ax.set_xscale("log")
    ticks = [k for k in MARKED_K if k <= max_k] + ([max_k] if max_k > MARKED_K[-1] else [])
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"Recall at K: {model}\n{images} images, {captions} captions", fontsize=10)
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _markdown(r: dict[str, Any]) -> str:
    cfg, model, pairs, t = r["config"], r["model"], r["pairs"], r["timings"]
    rows = []
    for label, method, side in ROWS:
        m = r[method]
        rows.append(
            f"| {label} | {m[f'{side}_r1']:.2f} | {m[f'{side}_r5']:.2f} | "
            f"{m[f'{side}_r10']:.2f} | {m[f'{side}_r_mean']:.2f} |"
        )
    return "\n".join(
        [
            "# Retrieval evaluation",
            "",
            f"{cfg['images']} images, {cfg['texts']} captions from `{cfg['annotations']}` "
            f"({cfg['format']} format), k_test = {cfg['k_test']}.",
            "",
            "| | R@1 | R@5 | R@10 | mean |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"r_mean: **{r['itm']['r_mean']:.2f}** with ITM rerank, {r['itc']['r_mean']:.2f} "
            "with ITC only. TR = text retrieval (image → captions), IR = image retrieval.",
            "",
            f"![recall at K]({PLOT})",
            "",
            "## Model",
            "",
            f"`{model['source']}` (revision {model['revision']}, commit {model['commit']}), "
            f"protocol `{model['protocol']}`, {model['dtype']} on {model['device']}.",
            "",
            "## Cost",
            "",
            f"ITM pairs: {pairs['scored']} scored (the union of both directions; BLIP's loop "
            f"runs {pairs['protocol']}), {pairs['scored_this_run']} in this run. Time: images "
            f"{t['images_s']:.1f} s, texts {t['texts_s']:.1f} s, ITM {t['itm_s']:.1f} s "
            f"({r['pairs_per_s']:.1f} pairs/s); resumed: {t['resumed']}.",
            "",
            "",
        ]
    )
