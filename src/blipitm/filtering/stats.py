"""``stats.json`` and ``histogram.png`` of a filtering run (like evaluation/report.py: matplotlib's
object API, imported only here, no global pyplot state)."""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blipitm.common.files import atomic_write_bytes, atomic_write_json
from blipitm.filtering.scoring import SCORE_COLUMNS

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
MAX_ERRORS = 50  # examples listed; the counts cover all


def write_stats(
    out: Path,
    score_files: Sequence[Path],
    *,
    by: str,
    column: str,
    threshold: float,
    keep_fraction: float | None,
    kept: dict[str, int],
    shard_errors: list[dict[str, str]],
    throughput: dict[str, float],
) -> dict[str, Any]:
    import pyarrow.parquet as pq

    status: Counter[str] = Counter()
    sample_status: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    samples = 0
    for path in score_files:
        t = pq.read_table(path, columns=["sample", "id", "candidate", "status", "error"])
        st = t["status"].to_pylist()
        status.update(st)
        first = [c == 0 for c in t["candidate"].to_pylist()]
        sample_status.update(s for s, f in zip(st, first, strict=True) if f)
        samples += sum(first)
        if len(errors) < MAX_ERRORS:
            for row in t.to_pylist():
                if row["status"] != "ok" and len(errors) < MAX_ERRORS:
                    errors.append(
                        {
                            "shard": path.stem,
                            **{k: row[k] for k in ("id", "candidate", "status", "error")},
                        }
                    )
    quantiles = {}
    for name in SCORE_COLUMNS:  # one column in memory at a time
        values = _column(score_files, name)
        values = values[~np.isnan(values)]
        quantiles[name] = (
            {
                str(q): float(v)
                for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True)
            }
            if values.size
            else {}
        )
    stats = {
        "by": by,
        "score_column": column,
        "threshold": None if math.isinf(threshold) else threshold,
        "keep_fraction": keep_fraction,
        "samples": samples,
        "pairs": sum(status.values()),
        "scored_pairs": status.get("ok", 0),
        "kept_pairs": kept["pairs"],
        "kept_samples": kept["samples"],
        "status_pairs": dict(sorted(status.items())),
        "status_samples": dict(sorted(sample_status.items())),
        "errors": errors,
        "shard_errors": shard_errors,
        "quantiles": quantiles,
        "throughput": throughput,
    }
    atomic_write_json(out / "stats.json", stats)
    values = _column(score_files, column)
    atomic_write_bytes(
        out / "histogram.png", histogram_png(values[~np.isnan(values)], column, threshold)
    )
    return stats


def _column(files: Sequence[Path], name: str) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = [pq.read_table(p, columns=[name])[name].to_numpy(zero_copy_only=False) for p in files]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def histogram_png(values: np.ndarray, column: str, threshold: float) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.hist(values, bins=50, color="#4878a8")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="#c03030", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.legend()
    ax.set_xlabel(column)
    ax.set_ylabel("pairs")
    ax.set_title(f"{column}: {values.size} scored pairs")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
