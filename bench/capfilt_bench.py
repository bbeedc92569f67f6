"""CapFilt throughput (issue 22 section 2): ``filter --capfilt`` with K = 1 and K = 5 synthetic
captions per image against filtering alone, on the same shards in one run.

    flock /work/notes/bench.lock python bench/capfilt_bench.py --preset base --images 16
    python bench/capfilt_bench.py --preset tiny --images 64       # a quicker look

Random weights of the preset's size (written on first use under bench/out/), photo-sized JPEGs
with one 8-20-word caption each, WebDataset shards of ``--batch-size`` samples, fp32. Each row is
``filter_dataset`` reading the tars and writing every output; "steady" is samples/s from the first
to the last progress report (model loads and the first batch excluded), "end to end" the whole
call. For the CapFilt rows, "captioning" is the share of the scoring stage spent in the
captioner (``Captioning.add``): what sizes the two stages if they ran apart (docs/capfilt.md).
Rows alternate and the best of ``--repeats`` is kept: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blipitm
from blipitm.engine.options import FILTERING_PRESET
from blipitm.filtering import CapFilt, LocalRun, Threshold, filter_dataset
from blipitm.filtering.capfilt import Captioning
from filter_bench import Clock, write_shards
from run import captions, cpu_flags, jpeg_images

ROOT = Path(__file__).resolve().parents[1]


class CaptionTimer:
    """Wraps ``Captioning.add`` to add up the time spent captioning."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = Captioning.add

        def timed(captioning: Captioning, *args: Any) -> Any:
            t = time.perf_counter()
            try:
                return self.original(captioning, *args)
            finally:
                self.seconds += time.perf_counter() - t

        Captioning.add = timed  # type: ignore[method-assign]


def run_once(
    paths: list[str],
    out: Path,
    engine: blipitm.Engine,
    capfilt: CapFilt | None,
    batch_size: int,
    timer: CaptionTimer,
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock("samples")
    timer.seconds = 0.0
    t = time.perf_counter()
    stats = filter_dataset(
        paths,
        out,
        Threshold(0.5),
        model=engine,
        run=LocalRun(batch_size),
        progress=clock,
        capfilt=capfilt,
    )
    total = time.perf_counter() - t
    row = {
        "pairs": stats.pairs,
        "steady_samples_per_s": round(clock.per_s(), 3),
        "end_to_end_samples_per_s": round(stats.samples / total, 3),
        "scoring_stage_s": round(stats.throughput.seconds, 2),
    }
    if capfilt is not None:
        row["captioning_share"] = round(timer.seconds / max(stats.throughput.seconds, 1e-9), 3)
    return row


def checkpoints(preset: str) -> tuple[Path, Path]:
    from blipitm.testing.make_checkpoint import make_checkpoint

    itm, cap = ROOT / "bench" / "out" / f"{preset}-random", ROOT / "bench" / "out" / f"{preset}-cap"
    if not (itm / "config.json").exists():
        make_checkpoint(itm, preset=preset, seed=0)
    if not (cap / "config.json").exists():
        make_checkpoint(cap, preset=preset, seed=1, task="caption")
    return itm, cap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "base"), default="base")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--synthetic", type=int, nargs="+", default=[1, 5])
    args = p.parse_args()
    itm, cap = checkpoints(args.preset)
    results: dict[str, Any] = {
        "preset": args.preset,
        "images": args.images,
        "batch_size": args.batch_size,
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
    }
    print(json.dumps(results), flush=True)
    engine = blipitm.load(str(itm), cache_bytes=FILTERING_PRESET.cache_bytes)
    captioner = blipitm.load_captioner(str(cap), cache_bytes=FILTERING_PRESET.cache_bytes)
    tmp = Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    images = jpeg_images(args.images, 3)
    texts = [captions(1, 100 + i) for i in range(args.images)]
    paths = write_shards(tmp / "in", images, texts, args.batch_size)
    timer = CaptionTimer()
    kinds: dict[str, CapFilt | None] = {"filter": None}
    kinds |= {f"capfilt_k{k}": CapFilt(captioner, synthetic=k, seed=0) for k in args.synthetic}
    rows: dict[str, dict[str, Any]] = {}
    for attempt in range(args.repeats):
        for name, capfilt in kinds.items():
            engine.cache.clear()
            captioner.cache.clear()
            row = run_once(paths, tmp / name, engine, capfilt, args.batch_size, timer)
            print(name, attempt, json.dumps(row), flush=True)
            best = rows.get(name)
            if best is None or row["steady_samples_per_s"] > best["steady_samples_per_s"]:
                rows[name] = row
    base = rows["filter"]["steady_samples_per_s"]
    for row in rows.values():
        row["vs_filter_steady"] = round(row["steady_samples_per_s"] / base, 3)
    results["rows"] = rows
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
