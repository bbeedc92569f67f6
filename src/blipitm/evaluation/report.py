"""Writing an evaluation's results: a console table, ``results.json``, ``report.md`` + a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blipitm.evaluation.metrics import recall_curve
from blipitm.retrieval.fsutil import atomic_write_bytes, atomic_write_json

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
    atomic_write_bytes(out / PLOT, _plot(curves))
    atomic_write_bytes(out / "report.md", _markdown(results).encode())


def curves_from_ranks(ranks: dict[str, np.ndarray], max_k: int) -> dict[str, np.ndarray]:
    return {name: recall_curve(r, max_k) for name, r in ranks.items()}


def _plot(curves: dict[str, np.ndarray]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, values in curves.items():
        ks = np.arange(1, len(values) + 1)
        style = "-" if "ITM" in name else "--"
        ax.plot(ks, values, style, label=name, marker="o" if len(ks) <= 20 else None, ms=3)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 101)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Retrieval recall at K")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
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
