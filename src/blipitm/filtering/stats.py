"""``stats.json`` and ``histogram.png`` of a filtering run (like evaluation/report.py: matplotlib's
object API, imported only here, no global pyplot state)."""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blipitm.common.files import atomic_write_bytes, atomic_write_json
from blipitm.filtering.scoring import SCORE_COLUMNS, By

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
MAX_ERRORS = 50  # examples listed; the counts cover all


@dataclass(frozen=True)
class Throughput:
    """This run's scoring: what it scored (earlier runs' shards not counted) and how fast."""

    samples_scored_this_run: int
    pairs_scored_this_run: int
    seconds: float
    samples_per_s: float
    pairs_per_s: float

    @classmethod
    def of(cls, samples: int, pairs: int, seconds: float) -> Throughput:
        s = max(seconds, 1e-9)
        return cls(
            samples,
            pairs,
            round(seconds, 3),
            round(samples / s, 2) if samples else 0.0,
            round(pairs / s, 2) if pairs else 0.0,
        )


@dataclass(frozen=True)
class FilterStats:
    """A run's result, as ``stats.json`` holds it (:meth:`to_json`, one key per field)."""

    by: str  # the --by name
    score_column: str
    threshold: float | None  # None: nothing kept (a keep fraction of 0)
    keep_fraction: float | None
    samples: int
    pairs: int
    scored_pairs: int
    kept_pairs: int
    kept_samples: int
    status_pairs: dict[str, int]  # status -> pairs
    status_samples: dict[str, int]  # status of each sample's first candidate -> samples
    errors: list[dict[str, Any]]  # the first MAX_ERRORS unscored pairs
    shard_errors: list[dict[str, str]]  # inputs that could not be read: shard, error
    quantiles: dict[str, dict[str, float]]  # score column -> quantile -> value
    throughput: Throughput
    # CapFilt runs only: per source ("original", "synthetic"), its pairs, scored and kept.
    sources: dict[str, dict[str, int]] | None = None

    def to_json(self) -> dict[str, Any]:
        """One key per field; ``sources`` only for a CapFilt run (a plain run's file is as
        it always was)."""
        out = asdict(self)
        if out["sources"] is None:
            del out["sources"]
        return out

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


def collect_stats(
    score_files: Sequence[Path],
    *,
    by: By,
    threshold: float,
    keep_fraction: float | None,
    kept_pairs: int,
    kept_samples: int,
    shard_errors: list[dict[str, str]],
    throughput: Throughput,
) -> FilterStats:
    """The statistics of a run's committed score files."""
    import pyarrow.parquet as pq

    status: Counter[str] = Counter()
    sample_status: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    samples = 0
    by_source: dict[str, Counter[str]] = {}
    for path in score_files:
        capfilt = "source" in pq.read_schema(path).names
        extra = ["source", "kept"] if capfilt else []
        t = pq.read_table(path, columns=["sample", "id", "candidate", "status", "error", *extra])
        st = t["status"].to_pylist()
        status.update(st)
        if capfilt:
            _count_sources(by_source, t)
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
        values = read_column(score_files, name)
        values = values[~np.isnan(values)]
        quantiles[name] = (
            {
                str(q): float(v)
                for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True)
            }
            if values.size
            else {}
        )
    return FilterStats(
        by=by.value,
        score_column=by.column,
        threshold=None if math.isinf(threshold) else threshold,
        keep_fraction=keep_fraction,
        samples=samples,
        pairs=sum(status.values()),
        scored_pairs=status.get("ok", 0),
        kept_pairs=kept_pairs,
        kept_samples=kept_samples,
        status_pairs=dict(sorted(status.items())),
        status_samples=dict(sorted(sample_status.items())),
        errors=errors,
        shard_errors=shard_errors,
        quantiles=quantiles,
        throughput=throughput,
        sources={k: dict(v) for k, v in sorted(by_source.items())} if by_source else None,
    )


def _count_sources(counts: dict[str, Counter[str]], table: Any) -> None:
    """Add one CapFilt score table's pairs, scored pairs and kept pairs per source."""
    for source, st, kept in zip(
        table["source"].to_pylist(),
        table["status"].to_pylist(),
        table["kept"].to_pylist(),
        strict=True,
    ):
        c = counts.setdefault(source, Counter(pairs=0, scored=0, kept=0))
        c["pairs"] += 1
        c["scored"] += st == "ok"
        c["kept"] += bool(kept)


def write_histogram(path: Path, score_files: Sequence[Path], column: str, threshold: float) -> None:
    """The scores of ``column``, with the threshold drawn, as a PNG."""
    values = read_column(score_files, column)
    atomic_write_bytes(path, histogram_png(values[~np.isnan(values)], column, threshold))


def read_column(files: Sequence[Path], name: str) -> np.ndarray:
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
