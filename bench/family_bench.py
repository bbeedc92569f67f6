"""Several models behind one server: memory per model, the cost of a switch, shared throughput.

    flock /work/notes/bench.lock python bench/family_bench.py [--seconds 20] [--out DIR]

Real ``blipitm serve`` processes on random checkpoints of the real shapes (base: ViT-B/16 and
BERT-base; large: ViT-L/16), written once under ``--out``:

- **memory**: the server's resident memory (``VmRSS``) with 1, 2 and 4 base models loaded, in
  float32 and bfloat16, and with one large model; the per-model cost is the slope.
- **switch**: three base models under ``--max-loaded-models 2`` (the default pinned): the load
  time from local disk that the log reports, and the latency of the first request to a model that
  was evicted (it waits for the reload) against a request to a loaded one.
- **throughput**: ``--clients`` clients sending text-embedding requests for ``--seconds``: to one
  model alone, then alternating between two models of the same server. Target: the two together
  >= 0.9 of the one alone (they share the CPU).

Appends its table to BENCHMARKS.md with ``--write``. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src"), str(ROOT / "bench")]

from blipitm.testing.make_checkpoint import make_checkpoint  # noqa: E402
from report import emit, section  # noqa: E402
from server_helpers import ServerProcess, free_port  # noqa: E402

TEXTS = [f"a photo of {n} dogs playing on a sunny beach near the water" for n in range(8)]
MB = 1 << 20


def checkpoint(out: Path, preset: str, seed: int) -> Path:
    path = out / f"{preset}-{seed}"
    if not (path / "model.safetensors").exists():
        print(f"writing {path} ...", flush=True)
        make_checkpoint(path, preset=preset, seed=seed)
    return path


def models_file(out: Path, ckpts: list[Path], name: str, **extra: str) -> Path:
    lines = []
    for i, ckpt in enumerate(ckpts):
        lines += ["[[model]]", f'source = "{ckpt}"', f'name = "m{i}"']
        lines += [f"{k} = {v}" for k, v in extra.items()]
    path = out / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def serve(*flags: str) -> ServerProcess:
    port = free_port()
    argv = ["-m", "blipitm.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = ServerProcess([*argv, "--log-level", "info", "--max-wait-ms", "2", *flags], port)
    server.wait_ready(timeout=600)
    return server


def all_loaded(server: ServerProcess, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        if sum(m["status"] == "ready" for m in data) >= n:
            return
        time.sleep(0.5)
    raise RuntimeError(f"not {n} models loaded:\n{server.output()[-3000:]}")


def rss_mb(server: ServerProcess) -> float:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def embed(client: httpx.Client, model: str) -> float:
    t = time.perf_counter()
    client.post("/v1/embeddings", json={"input": TEXTS, "model": model}).raise_for_status()
    return time.perf_counter() - t


def memory(out: Path, base: list[Path], large: Path) -> list[tuple[str, str]]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        for n in (1, 2, 4):
            file = models_file(out, base[:n], f"mem-{dtype}-{n}", dtype=f'"{dtype}"')
            server = serve("--models-file", str(file))
            try:
                all_loaded(server, n)
                with httpx.Client(base_url=server.url, timeout=120) as client:
                    for i in range(n):
                        embed(client, f"m{i}")  # each model has run a request
                rows.append((f"RSS, {n} base model(s), {dtype}", f"{rss_mb(server):.0f} MB"))
            finally:
                server.stop()
        file = models_file(out, [large], f"mem-{dtype}-large", dtype=f'"{dtype}"')
        server = serve("--models-file", str(file))
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                embed(client, "m0")
            rows.append((f"RSS, 1 large model, {dtype}", f"{rss_mb(server):.0f} MB"))
        finally:
            server.stop()
    return rows


def switch(out: Path, base: list[Path]) -> list[tuple[str, str]]:
    file = models_file(out, base[:3], "switch")
    server = serve("--models-file", str(file), "--max-loaded-models", "2", "--load-on-demand")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            loaded = [embed(client, "m1") for _ in range(5)][1:]  # m1 loads, then is warm
            first_after_eviction = []
            for _ in range(3):
                embed(client, "m2")  # evicts m1
                first_after_eviction.append(embed(client, "m1"))  # evicts m2, reloads m1
        loads = [float(s) for s in re.findall(r"loaded in ([\d.]+)s", server.output())]
    finally:
        server.stop()
    return [
        (
            "load time from local disk (base, float32; median of the log's)",
            f"{statistics.median(loads):.2f} s",
        ),
        (
            "first request after eviction (waits for the reload), median",
            f"{statistics.median(first_after_eviction):.2f} s",
        ),
        (
            "the same request to a loaded model, median",
            f"{statistics.median(loaded) * 1000:.0f} ms",
        ),
    ]


async def _drive(url: str, models: list[str], clients: int, seconds: float) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def client_loop(i: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            k = i
            while time.monotonic() < stop:
                r = await c.post(
                    "/v1/embeddings", json={"input": TEXTS, "model": models[k % len(models)]}
                )
                r.raise_for_status()
                done += len(TEXTS)
                k += 1

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return done


def throughput(out: Path, base: list[Path], clients: int, seconds: float) -> list[tuple[str, str]]:
    file = models_file(out, base[:2], "throughput")
    server = serve("--models-file", str(file))
    try:
        all_loaded(server, 2)
        asyncio.run(_drive(server.url, ["m0", "m1"], clients, 3))  # warm both
        rates = {}
        for label, models in (("one", ["m0"]), ("two", ["m0", "m1"]), ("one again", ["m0"])):
            rates[label] = asyncio.run(_drive(server.url, models, clients, seconds)) / seconds
    finally:
        server.stop()
    alone = (rates["one"] + rates["one again"]) / 2
    return [
        (f"texts/s, one model alone ({clients} clients; mean of before and after)", f"{alone:.1f}"),
        (
            "texts/s, two models hit alternately, in total",
            f"{rates['two']:.1f} ({rates['two'] / alone:.2f} of one alone)",
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/blipitm-family-bench"))
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = [checkpoint(args.out, "base", seed) for seed in range(4)]
    large = checkpoint(args.out, "large", 0)
    load = os.getloadavg()[0]
    rows = [] if args.skip_memory else memory(args.out, base, large)
    rows += switch(args.out, base)
    rows += throughput(args.out, base, args.clients, args.seconds)
    emit(
        section(
            "Several models in one server (bench/family_bench.py)",
            "random checkpoints of the real shapes; requests of 8 texts to /v1/embeddings",
            rows,
            load,
        ),
        write=args.write,
    )


if __name__ == "__main__":
    main()
