"""The server's own overhead: text embeddings through HTTP against the same engine in-process.

    python bench/loadgen.py --model DIR --dtype bfloat16          # both cases of issue 13
    python bench/loadgen.py --clients 32 --texts-per-request 1 --requests 512

In one run: (1) in-process, ``engine.encode_texts`` over all the texts in one call (the engine
sorts them by length), median of 3; (2) a ``blipitm serve`` process on 127.0.0.1 and, in a
*separate* process, a closed-loop load generator: ``clients`` keep-alive connections, each
sending its next ``POST /v1/embeddings`` as soon as the previous one is answered. The generator
is plain asyncio over raw HTTP/1.1 (no client library), so it costs little CPU; its CPU time and
the server's are reported beside the throughput, because on a 2-core machine every core-second
the client spends is one the server does not get.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from run import ROOT, captions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_sizes(port: int) -> tuple[float, float]:
    """(requests, worker batches) so far, from the server's ``blipitm_batch_size`` histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    got = dict.fromkeys(("sum", "count"), 0.0)
    for line in text.splitlines():
        for k in got:
            if line.startswith(f"blipitm_batch_size_{k} "):
                got[k] = float(line.split()[1])
    return got["sum"], got["count"]


# -- the load generator (a separate process) -----------------------------------------------------


async def _client(port: int, bodies: list[bytes], counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while bodies:
            body = bodies.pop()
            writer.write(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"server answered {status!r}")
            counts[0] += 1
    finally:
        writer.close()


async def _generate(port: int, clients: int, bodies: list[bytes]) -> None:
    counts = [0]
    await asyncio.gather(*(_client(port, bodies, counts) for _ in range(clients)))


def generator_main(args: argparse.Namespace) -> None:
    """Child process: send the requests, print wall and CPU seconds as JSON."""
    texts = captions(args.requests * args.texts_per_request, 11)
    per = args.texts_per_request
    bodies = [
        json.dumps({"model": "bench", "input": texts[i : i + per]}).encode()
        for i in range(0, len(texts), per)
    ]
    warm = [bodies[i % len(bodies)] for i in range(2 * args.clients)]
    asyncio.run(_generate(args.port, args.clients, warm))
    cpu0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(_generate(args.port, args.clients, list(bodies)))
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "cpu_s": time.process_time() - cpu0}))


# -- the run ------------------------------------------------------------------------------------


def in_process(args: argparse.Namespace) -> tuple[float, float]:
    """Texts/s of one ``encode_texts`` call over all the texts the generator sends: with the
    engine's own text batches, and with batches capped at ``clients x texts per request``, the
    most texts that many closed-loop clients can have in one server batch."""
    import dataclasses

    import blipitm

    texts = captions(args.requests * args.texts_per_request, 11)
    engine = blipitm.load(args.model, dtype=args.dtype)
    engine.encode_texts(texts[:64])
    rates = []
    for cap in (engine.batch_sizes.texts, args.clients * args.texts_per_request):
        engine.batch_sizes = dataclasses.replace(
            engine.batch_sizes, texts=min(cap, engine.batch_sizes.texts)
        )
        times = []
        for _ in range(3):
            t = time.perf_counter()
            engine.encode_texts(texts)
            times.append(time.perf_counter() - t)
        rates.append(len(texts) / statistics.median(times))
    engine.close()
    return rates[0], rates[1]


def through_server(args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    cmd = [sys.executable, "-m", "blipitm.cli.main", "serve", "--model", str(args.model)]
    cmd += ["--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--served-model-name", "bench", *args.serve_flag]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        gen = [sys.executable, __file__, "--generator", "--port", str(port)]
        gen += ["--clients", str(args.clients), "--requests", str(args.requests)]
        gen += ["--texts-per-request", str(args.texts_per_request)]
        cpu0, batches0 = cpu_seconds(server.pid), batch_sizes(port)
        spy = None
        if args.profile:  # a sampling profile of the server (all threads) for the whole run
            args.profile.mkdir(parents=True, exist_ok=True)
            name = f"server-{args.clients}x{args.texts_per_request}"
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--threads", "--idle", "--rate",
                 "200", "--format", "raw", "--output", str(args.profile / f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        out = subprocess.run(gen, env=env, capture_output=True, text=True, check=True).stdout
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
        # The server's CPU and batches include the generator's warm-up requests.
        result["server_cpu_s"] = cpu_seconds(server.pid) - cpu0
        batches1 = batch_sizes(port)
        result["mean_batch"] = (batches1[0] - batches0[0]) / max(batches1[1] - batches0[1], 1)
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "bench" / "out" / "base-random")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=int, nargs="+", default=[32, 8])
    p.add_argument("--texts-per-request", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=None, help="default: 512 texts per case")
    p.add_argument("--serve-flag", action="append", default=[], help="extra flag for serve")
    p.add_argument("--profile", type=Path, help="write py-spy profiles of the server here")
    p.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.generator:
        args.clients, args.texts_per_request = args.clients[0], args.texts_per_request[0]
        generator_main(args)
        return
    print(
        "| clients x texts | in-process texts/s | server texts/s | server / in-process "
        "| in-process, batches capped at clients x texts | server / that "
        "| generator CPU (of one core) | server CPU (cores) | requests per worker batch |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients, per in zip(args.clients, args.texts_per_request, strict=True):
        case = argparse.Namespace(**vars(args))
        case.clients, case.texts_per_request = clients, per
        case.requests = args.requests or 512 // per
        base, capped = in_process(case)
        got = through_server(case)
        served = case.requests * per / got["wall_s"]
        print(
            f"| {clients} x {per} | {base:.0f} | {served:.0f} | {served / base:.2f} "
            f"| {capped:.0f} | {served / capped:.2f} "
            f"| {got['cpu_s'] / got['wall_s']:.0%} | {got['server_cpu_s'] / got['wall_s']:.2f} "
            f"| {got['mean_batch']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
