"""OpenAI's Batch API on a real ``blipitm serve --batch-dir`` (issue 21): the stock ``openai`` SDK
end to end, each line's body equal to the online answer, SIGKILL and restart (each ``custom_id``
exactly once), cancel with partial results, every validation failure, isolation between keys,
credits at the discount and never overspent, an online request answered while a batch runs, and
uploads over the caps refused with nothing left on disk."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

import blipitm
from blipitm.keys import KeyStore
from server_helpers import ServerProcess, cli_server, data_uri, free_port, png_bytes

OPERATOR = "batch-operator-key"
AUTH = {"Authorization": f"Bearer {OPERATOR}"}
IMAGE = data_uri(png_bytes((200, 40, 40)))


def line(custom_id: str, body: dict[str, Any], url: str = "/v1/embeddings") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def jsonl(lines: list[str]) -> io.BytesIO:
    return io.BytesIO(("\n".join(lines) + "\n").encode())


def client(server: ServerProcess, key: str = OPERATOR) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def wait_done(c: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = c.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def answers(c: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    rows = [json.loads(x) for x in c.files.content(file_id).text.splitlines()]
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a custom_id answered twice"
    return by_id


def strip_ids(body: Any) -> Any:
    """A response body without the fields that differ per call by design (ids)."""
    if isinstance(body, dict):
        return {k: strip_ids(v) for k, v in body.items() if k not in ("id",)}
    if isinstance(body, list):
        return [strip_ids(v) for v in body]
    return body


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("batch-keys") / "keys.db")


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batches")


def flags(batch_dir: Path, store: KeyStore, *extra: str) -> list[str]:
    return [
        "--batch-dir", str(batch_dir), "--keys-db", str(store.path), "--api-key", OPERATOR,
        "--image-credits", "3", "--max-wait-ms", "2", "--batch-max-file-lines", "3000",
        "--batch-max-file-bytes", "2000000", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, batch_dir: Path, store: KeyStore) -> Iterator[ServerProcess]:
    with cli_server(tiny_ckpt, *flags(batch_dir, store)) as s:
        yield s


def key(store: KeyStore, server: ServerProcess, name: str, **limits: Any) -> str:
    secret = store.create(name, **limits)
    headers = {"Authorization": f"Bearer {secret}"}
    deadline = time.monotonic() + 20
    while httpx.get(server.url + "/v1/usage", headers=headers).status_code != 200:
        assert time.monotonic() < deadline, "the server did not pick up the key"
        time.sleep(0.1)
    return secret


# -- the SDK end to end, and the answers --------------------------------------------------------


def test_the_openai_sdk_runs_a_batch_whose_answers_are_the_online_ones(
    server: ServerProcess,
) -> None:
    c = client(server)
    bodies = {
        "texts": {"input": ["a red square", "two dogs"]},
        "image": {"input": [IMAGE]},
        "bad-image": {"input": ["data:image/png;base64,AAAA"]},
        "unknown-model": {"input": ["x"], "model": "nonesuch"},
    }
    uploaded = c.files.create(
        file=("in.jsonl", jsonl([line(k, b) for k, b in bodies.items()])), purpose="batch"
    )
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    assert c.files.retrieve(uploaded.id).filename == "in.jsonl"
    batch = c.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"job": "test"},
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "test"}
    batch = wait_done(c, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (4, 2)
    assert batch.request_counts.failed == 2
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(batch, stamp) is not None, stamp
    ok, failed = answers(c, batch.output_file_id), answers(c, batch.error_file_id)
    assert set(ok) == {"texts", "image"} and set(failed) == {"bad-image", "unknown-model"}
    for custom_id, row in {**ok, **failed}.items():
        online = httpx.post(server.url + "/v1/embeddings", json=bodies[custom_id], headers=AUTH)
        assert row["response"]["status_code"] == online.status_code, custom_id
        assert strip_ids(row["response"]["body"]) == strip_ids(online.json()), custom_id
    assert failed["bad-image"]["error"]["code"] == "invalid_input"
    assert failed["unknown-model"]["error"]["code"] == "model_not_found"
    assert batch.usage is not None and batch.usage.total_tokens > 0
    assert c.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_other_endpoints_answer_as_online(server: ServerProcess) -> None:
    c = client(server)
    cases = {
        "/v1/score": {"text_1": IMAGE, "text_2": ["a red square", "a dog"]},
        "/v1/rerank": {"query": IMAGE, "documents": ["a red square", "a dog", "a cat"]},
    }
    for url, body in cases.items():
        f = c.files.create(file=("x.jsonl", jsonl([line("only", body, url)])), purpose="batch")
        batch = wait_done(
            c, c.batches.create(input_file_id=f.id, endpoint=url, completion_window="24h").id
        )  # type: ignore[arg-type]
        row = answers(c, batch.output_file_id)["only"]
        online = httpx.post(server.url + url, json=body, headers=AUTH)
        assert online.status_code == 200
        assert strip_ids(row["response"]["body"]) == strip_ids(online.json()), url


def test_list_pagination_and_file_listing(server: ServerProcess) -> None:
    c = client(server)
    f = c.files.create(file=("p.jsonl", jsonl([line("a", {"input": "x"})])), purpose="batch")
    made = [
        c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h").id
        for _ in range(3)
    ]
    for batch_id in made:
        wait_done(c, batch_id)
    first = c.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    ids = [b.id for b in c.batches.list(limit=2).iter_pages().__next__().data]
    assert ids == made[::-1][:2]
    every = [b.id for b in c.batches.list(limit=2)]  # the SDK follows `after` across pages
    assert every[:3] == made[::-1] and len(every) == len(set(every))
    assert f.id in [x.id for x in c.files.list()]
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


# -- validation ---------------------------------------------------------------------------------


def test_every_validation_failure_fails_the_batch_naming_the_lines(server: ServerProcess) -> None:
    c = client(server)
    lines = [
        line("ok", {"input": "x"}),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
        line("ok", {"input": "y"}),
        line("other-url", {"input": "x"}, url="/v1/score"),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/embeddings"}),
    ]
    f = c.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
    batch = wait_done(
        c,
        c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h").id,
    )
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    got = {(e.code, e.line) for e in batch.errors.data}
    assert got == {
        ("invalid_json_line", 2),
        ("missing_required_parameter", 3),
        ("duplicate_custom_id", 4),
        ("mismatched_endpoint", 5),
        ("invalid_method", 6),
        ("invalid_body", 7),
    }, got
    assert batch.output_file_id is None  # nothing ran


def test_bad_batch_requests_are_4xx_naming_the_field(server: ServerProcess) -> None:
    c = client(server)
    f = c.files.create(file=("v.jsonl", jsonl([line("a", {"input": "x"})])), purpose="batch")
    for body, param in [
        ({"input_file_id": f.id, "endpoint": "/v1/nope", "completion_window": "24h"}, "endpoint"),
        (
            {"input_file_id": f.id, "endpoint": "/v1/embeddings", "completion_window": "1h"},
            "completion_window",
        ),
        (
            {
                "input_file_id": "file-nope",
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
            },
            "input_file_id",
        ),
    ]:
        r = httpx.post(server.url + "/v1/batches", json=body, headers=AUTH)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    r = httpx.post(
        server.url + "/v1/batches",
        json={"input_file_id": f.id, "endpoint": "/v1/embeddings", "completion_window": "24h",
              "metadata": {str(i): "v" for i in range(17)}},
        headers=AUTH,
    )  # fmt: skip
    assert r.status_code == 422
    wrong = httpx.post(
        server.url + "/v1/files",
        files={"file": ("a.jsonl", b"{}\n")},
        data={"purpose": "fine-tune"},
        headers=AUTH,
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"


def test_uploads_over_the_caps_are_413_with_nothing_left_on_disk(
    server: ServerProcess, batch_dir: Path
) -> None:
    before = sorted(p.name for p in (batch_dir / "files").iterdir())
    too_many = b"".join(b'{"custom_id": "%d"}\n' % i for i in range(3001))
    too_big = b"x" * 2_000_001
    for content, code in [(too_many, "too_many_items"), (too_big, "request_too_large")]:
        r = httpx.post(
            server.url + "/v1/files",
            files={"file": ("big.jsonl", content)},
            data={"purpose": "batch"},
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == code, r.text
    assert sorted(p.name for p in (batch_dir / "files").iterdir()) == before


# -- keys: isolation and credits ----------------------------------------------------------------


def test_a_key_sees_only_its_own_files_and_batches(server: ServerProcess, store: KeyStore) -> None:
    alice, bob = key(store, server, "batch-alice"), key(store, server, "batch-bob")
    a, b = client(server, alice), client(server, bob)
    f = a.files.create(file=("a.jsonl", jsonl([line("x", {"input": "x"})])), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    for call in (
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(f.id),
        lambda: b.files.delete(f.id),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.batches.create(
            input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in b.files.list()]
    assert batch.id not in [x.id for x in b.batches.list()]
    assert batch.id in [
        x.id for x in client(server).batches.list(limit=100)
    ]  # the operator sees it
    wait_done(a, batch.id)


def test_credits_at_the_discount_and_never_overspent(
    server: ServerProcess, store: KeyStore
) -> None:
    """Each line of 3 texts costs ceil(0.5 x 3) = 2 credits; with 9 credits, 4 lines run and the
    rest fail with insufficient_quota; the batch completes and the balance never goes below 0."""
    secret = key(store, server, "batch-credits", credits=9)
    c = client(server, secret)
    lines = [line(f"l{i}", {"input": ["a", "b", "c"]}) for i in range(8)]
    f = c.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch")
    batch = wait_done(
        c,
        c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h").id,
    )
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 4)
    failed = answers(c, batch.error_file_id)
    assert {row["error"]["code"] for row in failed.values()} == {"insufficient_quota"}
    report = httpx.get(
        server.url + "/v1/usage", headers={"Authorization": f"Bearer {secret}"}
    ).json()
    assert report["remaining"]["credits"] == 1
    endpoints = {row["endpoint"] for row in report["data"]}
    assert "batch:/v1/embeddings" in endpoints, endpoints


# -- running: online first, cancel, kill and resume ---------------------------------------------


def big_batch(c: openai.OpenAI, n: int, tag: str) -> str:
    lines = [line(f"{tag}{i}", {"input": [f"caption {tag} {i}", IMAGE]}) for i in range(n)]
    f = c.files.create(file=(f"{tag}.jsonl", jsonl(lines)), purpose="batch")
    return c.batches.create(
        input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"
    ).id


def test_an_online_request_is_answered_while_a_batch_runs_and_cancel_keeps_partials(
    server: ServerProcess,
) -> None:
    c = client(server)
    batch_id = big_batch(c, 2500, "cancel")
    while (c.batches.retrieve(batch_id).request_counts or _zero()).completed < 20:
        time.sleep(0.05)
    online = httpx.post(server.url + "/v1/embeddings", json={"input": ["now"]}, headers=AUTH)
    assert online.status_code == 200
    running = c.batches.retrieve(batch_id)
    assert running.status == "in_progress", "the batch finished before the test could look"
    cancelled = c.batches.cancel(batch_id)
    assert cancelled.status == "cancelling"
    batch = wait_done(c, batch_id, timeout=30)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    done = answers(c, batch.output_file_id)
    assert 20 <= len(done) < 2500
    assert batch.request_counts is not None and batch.request_counts.completed == len(done)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(batch_id)


def _zero() -> Any:
    class Zero:
        completed = 0

    return Zero()


def test_sigkill_mid_batch_then_restart_answers_each_line_once(
    tiny_ckpt: Path, store: KeyStore, tmp_path: Path
) -> None:
    batch_dir = tmp_path / "batches"
    port = free_port()
    argv = ["-m", "blipitm.cli.main", "serve", "--model", str(tiny_ckpt), "--host", "127.0.0.1"]
    argv += ["--port", str(port), *flags(batch_dir, store, "--batch-window", "4")]
    first = ServerProcess(argv, port)
    try:
        first.wait_ready()
        c = client(first)
        batch_id = big_batch(c, 600, "kill")
        while (c.batches.retrieve(batch_id).request_counts or _zero()).completed < 30:
            time.sleep(0.05)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    second = ServerProcess(argv, port)
    try:
        second.wait_ready()
        c = client(second)
        batch = wait_done(c, batch_id, timeout=300)
        assert batch.status == "completed", batch
        done, failed = answers(c, batch.output_file_id), answers(c, batch.error_file_id)
        assert not failed and set(done) == {f"kill{i}" for i in range(600)}
        assert batch.request_counts is not None and batch.request_counts.completed == 600
    finally:
        second.stop()


# -- offline: blipitm batch run -----------------------------------------------------------------


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "blipitm.cli.main", "batch", "run", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_batch_run_offline_resumes_and_answers_as_the_engine(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """A run cut short (its last line torn) resumes: each custom_id exactly once, the usage
    that of a run in one go, the vectors the engine's (fp32, 1e-6: batch composition moves the
    last bits)."""
    texts = [f"caption number {i}" for i in range(40)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(line(f"c{i}", {"input": [t]}) + "\n" for i, t in enumerate(texts)))
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    first = run_cli(str(source), "--output", str(whole), "--model", str(tiny_ckpt))
    assert first.returncode == 0, first.stderr[-2000:]
    rows = whole.read_bytes().splitlines(keepends=True)
    cut.write_bytes(b"".join(rows[:15]) + rows[15][:40])  # 15 answers and a torn 16th
    again = run_cli(str(source), "--output", str(cut), "--model", str(tiny_ckpt))
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = [json.loads(x) for x in cut.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in resumed) == sorted(f"c{i}" for i in range(40))
    by_id = {r["custom_id"]: r["response"]["body"] for r in resumed}
    once = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, rows)}
    assert {k: v["usage"] for k, v in by_id.items()} == {k: v["usage"] for k, v in once.items()}
    engine = blipitm.load(tiny_ckpt)
    got = np.array([by_id[f"c{i}"]["data"][0]["embedding"] for i in range(40)], dtype=np.float32)
    np.testing.assert_allclose(got, engine.embed_texts(texts), atol=1e-6, rtol=0)


def test_a_resumed_batch_counts_each_answer_by_its_status(tmp_path: Path) -> None:
    """Resuming with an error file after a run without one: the failures that run wrote into
    the output count as failed, not completed, and carry no usage."""
    from blipitm.server.batch.runner import recover
    from blipitm.server.batch.store import Batch

    def record(cid: str, status: int) -> str:
        body = {"usage": {"prompt_tokens": 3, "total_tokens": 3}} if status == 200 else {}
        response = {"status_code": status, "request_id": cid, "body": body}
        return json.dumps({"id": cid, "custom_id": cid, "response": response, "error": None})

    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    out.write_text(record("a", 200) + "\n" + record("b", 400) + "\n")
    err.write_text(record("c", 429) + "\n")
    for files in ((out, err), (out, out)):
        batch = Batch("b", None, "/v1/embeddings", "f", "24h", status="in_progress")
        done = recover(batch, *files)
        want = {"a", "b", "c"} if files[1] == err else {"a", "b"}
        assert set(done) == want
        assert batch.request_counts["completed"] == 1
        assert batch.request_counts["failed"] == len(want) - 1
        assert batch.usage["input_tokens"] == 3


def test_batch_run_refuses_a_bad_file_before_loading_a_model(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(line("a", {"input": "x"}) + "\n" + line("a", {"input": "y"}) + "\n")
    result = run_cli(str(source), "--output", str(tmp_path / "o.jsonl"), "--model", "/nowhere")
    assert result.returncode == 2
    assert "in.jsonl:2: duplicate_custom_id" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_lines_past_the_completion_window_are_answered_batch_expired(tmp_path: Path) -> None:
    """Expiry, at the runner's seam: nothing is sent once ``expires_at`` has passed, and every
    line not yet answered gets ``batch_expired`` in the error file."""
    import asyncio

    from blipitm.server.batch.lines import AnswerFile, Line
    from blipitm.server.batch.runner import Answers, send_lines
    from blipitm.server.batch.store import Batch

    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        sent.append(scope)

    batch = Batch("b", None, "/v1/embeddings", "f", "24h", status="in_progress")
    batch.expires_at = int(time.time()) - 1
    lines = iter([Line(i + 1, f"x{i}", b"{}") for i in range(3)])
    out, err = AnswerFile(tmp_path / "out"), AnswerFile(tmp_path / "err")
    answers = Answers(batch, out, err)
    final = asyncio.run(send_lines(app, batch, lines, answers, {}, 2, asyncio.Event()))
    answers.close()
    assert final == "expired" and not sent
    rows = [json.loads(x) for x in (tmp_path / "err").read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == ["x0", "x1", "x2"]
    assert {r["error"]["code"] for r in rows} == {"batch_expired"}
    assert batch.request_counts["failed"] == 3 and (tmp_path / "out").read_text() == ""


def test_batch_worker_lines_reaches_each_models_worker(tiny_ckpt: Path) -> None:
    """--batch-worker-lines bounds the background jobs of each model's worker batches."""
    import asyncio

    from blipitm.server.settings import ServerSettings
    from test_server_inprocess import Shared, running

    engine = blipitm.load(tiny_ckpt)
    settings = ServerSettings.of(model=str(tiny_ckpt), more_models=("b",), batch_worker_lines=2)

    async def main() -> None:
        async with running(settings, lambda options: Shared(engine)) as (_, state):
            for _ in range(500):
                if all(m.status == "ready" for m in state.models.models):
                    break
                await asyncio.sleep(0.02)
            assert [m.loaded.batcher.max_background_batch for m in state.models.models] == [2, 2]

    asyncio.run(main())
