"""The Batch API: its throughput against the engine in process, online latency while a batch
runs, and the server's memory over a long batch.

    flock /work/notes/bench.lock python bench/batch_bench.py [--lines 400] [--write]

- **throughput**: ``--lines`` lines of 8 captions each to ``/v1/embeddings`` (texts/s), and as many
  ``/v1/score`` lines of one image and one caption (pairs/s), run as a batch by a real
  ``blipitm serve`` on random base-size weights, against ``Engine.encode_texts`` /
  ``Engine.score`` in process on the same work (target: >= 0.9).
- **latency**: p50 / p99 of single-caption ``/v1/embeddings`` requests (one client, sequential),
  alone and while a batch runs (target: p99 <= 1.5x).
- **memory**: a 50,000-line batch on a tiny model, the server's RSS sampled as it runs (flat:
  no growth with the number of lines).

Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src"), str(ROOT / "bench")]

import blipitm  # noqa: E402
from blipitm.testing.make_checkpoint import make_checkpoint  # noqa: E402
from report import emit, section  # noqa: E402
from run import captions, jpeg_images  # noqa: E402
from server_helpers import ServerProcess, data_uri, free_port  # noqa: E402

KEY = "bench-key"
SERVE_FLAGS: list[str] = []  # --serve-flag: more `blipitm serve` flags for every server started


def serve(ckpt: Path, batch_dir: Path, *flags: str) -> ServerProcess:
    port = free_port()
    argv = ["-m", "blipitm.cli.main", "serve", "--model", str(ckpt), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--batch-dir", str(batch_dir), "--api-key", KEY]
    server = ServerProcess([*argv, "--log-level", "warning", *SERVE_FLAGS, *flags], port)
    server.wait_ready(timeout=600)
    return server


def run_batch(c: openai.OpenAI, endpoint: str, bodies: list[dict[str, Any]]) -> tuple[float, Any]:
    data = "".join(
        json.dumps({"custom_id": str(i), "method": "POST", "url": endpoint, "body": b}) + "\n"
        for i, b in enumerate(bodies)
    ).encode()
    f = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    started = time.perf_counter()
    batch = c.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.05)
        batch = c.batches.retrieve(batch.id)
    return time.perf_counter() - started, batch


def latencies(url: str, seconds: float) -> list[float]:
    out = []
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        while time.monotonic() < stop:
            t = time.perf_counter()
            c.post("/v1/embeddings", json={"input": ["a dog on the grass"]}).raise_for_status()
            out.append(time.perf_counter() - t)
    return out


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def throughput(ckpt: Path, work: Path, n: int) -> list[tuple[str, str]]:
    texts = captions(8 * n, 0)
    images = jpeg_images(min(n, 64), 1)
    uris = [data_uri(im, "image/jpeg") for im in images]
    engine = blipitm.load(ckpt)
    engine.encode_texts(texts[:16])
    t = time.perf_counter()
    for i in range(0, len(texts), 256):
        engine.encode_texts(texts[i : i + 256])
    t_texts = time.perf_counter() - t
    pair_images = [images[i % len(images)] for i in range(n)]
    engine.cache.clear()
    t = time.perf_counter()
    for i in range(0, n, 64):
        engine.score(pair_images[i : i + 64], texts[i : min(i + 64, n)])
    t_pairs = time.perf_counter() - t
    engine.close()
    rows = []
    server = serve(ckpt, work / "tp")
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        run_batch(c, "/v1/embeddings", [{"input": texts[:8]}] * 8)  # warm
        b_texts, batch = run_batch(
            c, "/v1/embeddings", [{"input": texts[8 * i : 8 * i + 8]} for i in range(n)]
        )
        assert batch.request_counts.completed == n, batch
        bodies = [{"text_1": uris[i % len(uris)], "text_2": texts[i]} for i in range(n)]
        b_pairs, batch = run_batch(c, "/v1/score", bodies)
        assert batch.request_counts.completed == n, batch
    finally:
        server.stop()
    rows.append((
        f"texts/s, {n} lines of 8 captions (batch vs Engine.encode_texts)",
        f"{8 * n / b_texts:.0f} vs {8 * n / t_texts:.0f} ({t_texts / b_texts:.2f})",
    ))  # fmt: skip
    rows.append((
        f"pairs/s, {n} /v1/score lines of 1 image + 1 caption ({len(images)} distinct images; "
        "batch vs Engine.score)",
        f"{n / b_pairs:.1f} vs {n / t_pairs:.1f} ({t_pairs / b_pairs:.2f})",
    ))  # fmt: skip
    return rows


def latency(ckpt: Path, work: Path, n: int, seconds: float) -> list[tuple[str, str]]:
    server = serve(ckpt, work / "lat")
    try:
        latencies(server.url, 2)
        alone = latencies(server.url, seconds)
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        texts = captions(8 * n, 1)
        data = "".join(
            json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/embeddings",
                        "body": {"input": texts[8 * i : 8 * i + 8]}}) + "\n"
            for i in range(n)
        ).encode()  # fmt: skip
        f = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = c.batches.create(
            input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        time.sleep(1)
        during = latencies(server.url, seconds)
        still = c.batches.retrieve(batch.id).status
    finally:
        server.stop()
    return [
        ("online p50 / p99, alone", f"{p(alone, 0.5):.0f} / {p(alone, 0.99):.0f} ms"),
        (
            f"online p50 / p99, while a batch runs (still {still} at the end)",
            f"{p(during, 0.5):.0f} / {p(during, 0.99):.0f} ms "
            f"(p99 {p(during, 0.99) / p(alone, 0.99):.2f}x)",
        ),
    ]


def memory(tiny: Path, work: Path, lines: int) -> list[tuple[str, str]]:
    server = serve(tiny, work / "mem", "--batch-max-file-lines", str(lines))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        data = "".join(
            json.dumps({"custom_id": f"m{i}", "method": "POST", "url": "/v1/embeddings",
                        "body": {"input": [f"caption {i}"]}}) + "\n"
            for i in range(lines)
        ).encode()  # fmt: skip
        f = c.files.create(file=("m.jsonl", io.BytesIO(data)), purpose="batch")
        start_rss = rss_mb(server.proc.pid)
        batch = c.batches.create(
            input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        samples: list[tuple[int, float]] = []
        started = time.perf_counter()
        while batch.status not in ("completed", "failed"):
            time.sleep(1)
            batch = c.batches.retrieve(batch.id)
            samples.append((batch.request_counts.completed, rss_mb(server.proc.pid)))
        elapsed = time.perf_counter() - started
    finally:
        server.stop()
    marks = []
    for frac in (0.1, 0.5, 0.9):
        done, rss = min(samples, key=lambda s: abs(s[0] - frac * lines))
        marks.append(f"{done} lines: {rss:.0f} MB")
    return [
        (
            f"server RSS over a {lines}-line batch (tiny model; {lines / elapsed:.0f} lines/s)",
            f"before {start_rss:.0f} MB; " + ", ".join(marks),
        )
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/blipitm-batch-bench"))
    ap.add_argument("--lines", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--memory-lines", type=int, default=50_000)
    ap.add_argument(
        "--parts", default="throughput,latency,memory", help="which measurements, comma-separated"
    )
    ap.add_argument(
        "--serve-flag",
        action="append",
        default=[],
        help="a flag for every server, e.g. --serve-flag=--batch-worker-lines=16 (repeatable)",
    )
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    SERVE_FLAGS.extend(args.serve_flag)
    args.out.mkdir(parents=True, exist_ok=True)
    base, tiny = args.out / "base", args.out / "tiny"
    if not (base / "model.safetensors").exists():
        make_checkpoint(base, preset="base", seed=0)
    if not (tiny / "model.safetensors").exists():
        make_checkpoint(tiny, preset="tiny", seed=0)
    load = os.getloadavg()[0]
    work = args.out / f"run-{int(time.time())}"
    parts = set(args.parts.split(","))
    rows = throughput(base, work, args.lines) if "throughput" in parts else []
    rows += latency(base, work, args.lines, args.seconds) if "latency" in parts else []
    rows += memory(tiny, work, args.memory_lines) if "memory" in parts else []
    emit(
        section(
            "Batch API (bench/batch_bench.py)",
            "random base-size weights, float32; the batch timed from create to completed",
            rows,
            load,
        ),
        write=args.write,
    )


if __name__ == "__main__":
    main()
