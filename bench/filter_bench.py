"""Dataset filtering throughput and memory (issue 10); prints the BENCHMARKS.md section's numbers.

    flock /work/notes/bench.lock python bench/filter_bench.py            # base weights, all parts
    python bench/filter_bench.py --images 32 --skip-ray --skip-rss       # a quicker look

On the same pairs in one run, base-size random weights (written by bench/run.py's recipe):
``engine.score_pairs`` on images already in memory, ``filter_dataset`` reading WebDataset tars
and writing every output, the same on a local Ray (2 CPUs, one actor), and a transformers
per-pair filter the way Data-Juicer runs BLIP ITM (``BlipForImageTextRetrieval`` with the ITM
head, processor and tokenizer per pair). Then peak RSS of a filter run over 1k and 10k samples on
tiny weights, each in a fresh process. Throughputs are steady-state (first to last progress
report, so model loading and Ray start-up are excluded) and end to end.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blipitm
from blipitm.engine import LoadOptions
from blipitm.engine.options import FILTERING_PRESET
from blipitm.filtering import (
    Columns,
    FilterProgress,
    LocalRun,
    RayRun,
    Threshold,
    filter_dataset,
)
from blipitm.filtering.runs import Run
from run import captions, jpeg_images

ROOT = Path(__file__).resolve().parents[1]


def write_shards(folder: Path, images: list[bytes], texts: list[list[str]], per: int) -> list[str]:
    """img2dataset's layout; a caption list goes into KEY.json's "captions" field."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(images), per):
        path = folder / f"{s // per:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + per, len(images))):
                meta = json.dumps({"captions": texts[i]}).encode()
                for ext, data in (
                    ("jpg", images[i]),
                    ("txt", texts[i][0].encode()),
                    ("json", meta),
                ):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


class Clock:
    """Progress callback: the steady rate of one count of the progress reports (``pairs`` or
    ``samples``), per second, from the first report to the last."""

    def __init__(self, count: str = "pairs") -> None:
        self.count = count
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] = (0.0, 0)

    def __call__(self, p: FilterProgress) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, getattr(p, self.count))
        self.last = (now, getattr(p, self.count))

    def per_s(self) -> float:
        assert self.first is not None
        return (self.last[1] - self.first[1]) / max(self.last[0] - self.first[0], 1e-9)


def run_filter(paths: list[str], out: Path, model: Any, run: Run) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    t = time.perf_counter()
    stats = filter_dataset(
        paths,
        out,
        Threshold(0.5),
        model=model,
        columns=Columns(caption="captions"),
        run=run,
        progress=clock,
    )
    total = time.perf_counter() - t
    return {
        "pairs": stats.pairs,
        "steady_pairs_per_s": clock.per_s(),
        "end_to_end_pairs_per_s": stats.pairs / total,
    }


def engine_in_memory(engine: blipitm.Engine, images: list[bytes], texts: list[list[str]]) -> float:
    flat = [t for ts in texts for t in ts]
    pairs = [(i, k) for i, ts in enumerate(texts) for k in range(len(ts))]
    pairs = [(i, j) for j, (i, _) in enumerate(pairs)]
    engine.cache.clear()
    t = time.perf_counter()
    engine.score_pairs(images, flat, pairs)
    return len(pairs) / (time.perf_counter() - t)


def encode_rate(engine: blipitm.Engine, images: list[bytes]) -> float:
    """Images/s of ``embed_images`` (decode and the vision tower), the rate a filter at one
    caption per image can at best reach."""
    engine.cache.clear()
    t = time.perf_counter()
    engine.embed_images(images)
    return len(images) / (time.perf_counter() - t)


def transformers_per_pair(model_dir: Path, images: list[bytes], texts: list[list[str]]) -> float:
    """Data-Juicer's image_text_matching_filter: processor + model(use_itm_head) per pair."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    processor = BlipProcessor.from_pretrained(model_dir)
    pairs = [(img, t) for img, ts in zip(images, texts, strict=True) for t in ts]
    t0 = time.perf_counter()
    with torch.no_grad():
        for img, text in pairs:
            inputs = processor(images=Image.open(io.BytesIO(img)), text=text, return_tensors="pt")
            logits = model(**inputs, use_itm_head=True).itm_score
            torch.softmax(logits, dim=-1)[:, 1].item()
    return len(pairs) / (time.perf_counter() - t0)


RSS_CHILD = """
import sys
import blipitm
from blipitm.filtering import LocalRun, Threshold, filter_dataset
from blipitm.engine.options import FILTERING_PRESET
engine = blipitm.load(sys.argv[1], cache_bytes=FILTERING_PRESET.cache_bytes)
filter_dataset(sys.argv[3:], sys.argv[2], Threshold(0.5), model=engine, run=LocalRun(256))
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) / 1024)
"""


def peak_rss(tmp: Path, n: int) -> float:
    from blipitm.testing.make_checkpoint import make_checkpoint

    tiny = tmp / "tiny"
    if not (tiny / "config.json").exists():
        make_checkpoint(tiny, preset="tiny", seed=0)
    rng = np.random.default_rng(n)
    images = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
        images.append(buf.getvalue())
    paths = write_shards(tmp / f"rss{n}", images, [[c] for c in captions(n, n)], 1000)
    done = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(tiny), str(tmp / f"rss-out{n}"), *paths],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "bench" / "out" / "base-random")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hf-pairs", type=int, default=8, help="pairs timed through transformers")
    p.add_argument("--dtype", default="float32", help="the engine's (the RSS part: float32)")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-base", action="store_true", help="only the RSS part")
    args = p.parse_args()
    if not (args.model / "config.json").exists():
        from blipitm.testing.make_checkpoint import make_checkpoint

        make_checkpoint(args.model, preset="base", seed=0)

    print(
        f"load: {os.getloadavg()}, torch threads {torch.get_num_threads()}, {platform.processor()}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="filter-bench-"))
    results: dict[str, Any] = {"images": args.images, "model": str(args.model)}
    if not args.skip_rss:  # first, while this process is small (its children are measured)
        results["peak_rss_mb"] = {n: peak_rss(tmp, n) for n in (1000, 10000)}
        print(results["peak_rss_mb"], flush=True)
    if args.skip_base:
        return
    engine = blipitm.load(
        str(args.model), dtype=args.dtype, cache_bytes=FILTERING_PRESET.cache_bytes
    )  # the filter's cache
    images = jpeg_images(args.images, 3)
    engine.score(images[:1], "warm up")
    results["encode_images_per_s"] = encode_rate(engine, images)
    print(f"image encoding: {results['encode_images_per_s']:.2f} images/s", flush=True)
    if not args.skip_ray:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    for per_image in (1, 5):
        texts = [captions(per_image, 100 + i) for i in range(args.images)]
        paths = write_shards(tmp / f"in{per_image}", images, texts, args.batch_size)
        row: dict[str, Any] = {}
        for attempt in range(2):  # alternate, keep the best: the machine is shared
            e = engine_in_memory(engine, images, texts)
            row["engine_pairs_per_s"] = max(row.get("engine_pairs_per_s", 0.0), e)
            engine.cache.clear()
            local = run_filter(paths, tmp / "out-local", engine, LocalRun(args.batch_size))
            if local["steady_pairs_per_s"] > row.get("local", {}).get("steady_pairs_per_s", 0):
                row["local"] = local
            print(per_image, attempt, f"engine {e:.2f}", local, flush=True)
        if not args.skip_ray:
            ray_run = RayRun(cpus_per_worker=2, batch_size=args.batch_size)
            options = LoadOptions(str(args.model), dtype=args.dtype)
            row["ray"] = run_filter(paths, tmp / "out-ray", options, ray_run)
            print(per_image, "ray", row["ray"], flush=True)
        n = max(1, args.hf_pairs // per_image)
        row["transformers_pairs_per_s"] = transformers_per_pair(args.model, images[:n], texts[:n])
        results[f"{per_image}_caption"] = row
        print(json.dumps(row), flush=True)
    if not args.skip_ray:
        import ray

        ray.shutdown()
    results["load_after"] = os.getloadavg()
    results["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
