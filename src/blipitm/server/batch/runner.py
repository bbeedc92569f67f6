"""Runs the batches, one at a time in the order they were created, in the server's background.

A batch is checked (``validating``), then its lines are sent through the app ``--batch-window``
at a time, as background work: the inference worker takes them only when no online request is
queued, and merges them into large engine batches (identical images are encoded once, through
the engine cache). Each answer is appended to the batch's output or error file as it arrives;
a restarted server resumes every unfinished batch from those files (``store.py``). Cancelling
stops sending lines at once and waits a few seconds for those in flight; the lines answered stay
in the output. Past ``expires_at`` the lines not yet answered get ``batch_expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from blipitm.server.account import SCOPE_BACKGROUND, SCOPE_BATCH_CALLER, BatchCaller
from blipitm.server.batch.lines import (
    AnswerFile,
    Line,
    answer,
    answered,
    call,
    check_lines,
    read_lines,
    unanswered,
)
from blipitm.server.batch.store import Batch, BatchStore, FileRecord, new_id
from blipitm.server.middleware import ASGIApp

log = logging.getLogger("blipitm.server")

READY_POLL_S = 0.2
RETRY_S = 1.0  # a line answered "not now" (its model loading) is sent again after this
CANCEL_GRACE_S = 5.0  # how long a cancelled batch waits for its lines in flight
SAVE_EVERY_S = 1.0  # how often a running batch's counts are written to its record


class BatchRunner:
    def __init__(self, store: BatchStore, *, window: int, credit_factor: float) -> None:
        self.store = store
        self.window = window
        self.credit_factor = credit_factor
        self.app: ASGIApp | None = None  # the whole app, middleware included (attach())
        self._ready: Callable[[], bool] = lambda: True
        self._wake = asyncio.Event()
        self._cancels: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None

    def attach(self, app: ASGIApp, ready: Callable[[], bool]) -> None:
        """``app``: what the lines are sent to; ``ready``: whether it serves (the default model
        is loaded): no line is sent before."""
        self.app, self._ready = app, ready

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch runner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, batch: Batch) -> None:
        """Mark ``batch`` cancelling; the runner stops it (now if it is running)."""
        batch.mark("cancelling")
        self.store.save(batch)
        self._cancels.setdefault(batch.id, asyncio.Event()).set()
        self.wake()

    async def _loop(self) -> None:
        while not self._ready():
            await asyncio.sleep(READY_POLL_S)
        while True:
            self._wake.clear()
            active = self.store.active()
            if not active:
                await self._wake.wait()
                continue
            batch = active[0]
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: fail this batch, keep the others
                log.exception("batch %s failed", batch.id)
                batch.errors = {
                    "object": "list",
                    "data": [{"code": "internal_error", "line": None, "message": str(e)}],
                }
                batch.mark("failed")
                self.store.save(batch)

    async def _run(self, batch: Batch) -> None:
        source = self.store.file(batch.input_file_id)
        if batch.status == "validating":
            if source is None:
                return self._fail(batch, "missing_file", "the input file was deleted")
            errors, total = await asyncio.to_thread(check_lines, Path(source.path), batch.endpoint)
            if errors:
                batch.errors = {"object": "list", "data": errors}
                batch.mark("failed")
                self.store.save(batch)
                log.info("batch %s failed validation (%d problems)", batch.id, len(errors))
                return
            batch.request_counts["total"] = total
            batch.mark("in_progress")
            self.store.save(batch)
        if batch.status == "in_progress":
            if source is None:
                return self._fail(batch, "missing_file", "the input file was deleted")
            final = await self._lines(batch, Path(source.path))
        else:  # cancelling or finalizing when the server stopped
            final = "cancelled" if batch.status == "cancelling" else "completed"
        self._finalize(batch, final)

    async def _lines(self, batch: Batch, source: Path) -> str:
        """Send the lines not yet answered; the batch's final status."""
        assert self.app is not None, "attach() first"
        out_path, err_path = self._work(batch)
        done = set(await asyncio.to_thread(recover, batch, out_path, err_path))
        cancelled = self._cancels.setdefault(batch.id, asyncio.Event())
        answers = Answers(batch, AnswerFile(out_path), AnswerFile(err_path))
        lines = (line for line in read_lines(source) if line.custom_id not in done)
        extra = {
            SCOPE_BATCH_CALLER: BatchCaller(batch.owner, self.credit_factor),
            SCOPE_BACKGROUND: True,
        }
        saved = time.monotonic()

        def on_line() -> None:
            nonlocal saved
            if time.monotonic() - saved > SAVE_EVERY_S:
                self.store.save(batch)
                saved = time.monotonic()

        try:
            final = await send_lines(
                self.app, batch, lines, answers, extra, self.window, cancelled, on_line
            )
        finally:
            answers.close()
        return final

    def _work(self, batch: Batch) -> tuple[Path, Path]:
        work = self.store.work_dir
        return work / f"{batch.id}.out.jsonl", work / f"{batch.id}.err.jsonl"

    def _finalize(self, batch: Batch, final: str) -> None:
        """The output and error files become file objects; the batch takes its final status."""
        batch.mark("finalizing")
        self.store.save(batch)
        for path, attr in zip(self._work(batch), ("output_file_id", "error_file_id"), strict=True):
            if not path.exists() or path.stat().st_size == 0 or getattr(batch, attr):
                continue
            file_id = new_id("file")
            target = self.store.files_dir / f"{file_id}.jsonl"
            shutil.move(path, target)
            with open(target, "rb") as f:
                lines = sum(1 for _ in f)
            kind = "output" if attr == "output_file_id" else "error"
            self.store.add_file(
                FileRecord(
                    file_id,
                    batch.owner,
                    "batch_output",
                    f"{batch.id}_{kind}.jsonl",
                    target.stat().st_size,
                    lines,
                    int(time.time()),
                    str(target),
                )
            )
            setattr(batch, attr, file_id)
        batch.mark(final)
        self.store.save(batch)
        self._cancels.pop(batch.id, None)
        counts = batch.request_counts
        log.info(
            "batch %s %s: %d completed, %d failed of %d",
            batch.id,
            final,
            counts["completed"],
            counts["failed"],
            counts["total"],
        )

    def _fail(self, batch: Batch, code: str, message: str) -> None:
        batch.errors = {
            "object": "list",
            "data": [{"code": code, "line": None, "message": message}],
        }
        batch.mark("failed")
        self.store.save(batch)


_EXPIRED = "the batch's completion window ended before this line ran"


def recover(batch: Batch, out_path: Path, err_path: Path) -> list[str]:
    """The ``custom_id`` of every line already answered (a resumed batch), with the batch's
    counts and usage recomputed from its files. The two paths may be one file. An answer counts
    by its status, whichever file holds it: an earlier run given no error file wrote its failures
    into the output."""
    records = answered(out_path)
    if err_path != out_path:
        records |= answered(err_path)
    done = {k: v for k, v in records.items() if _ok(v)}
    failed = {k: v for k, v in records.items() if not _ok(v)}
    batch.request_counts.update(completed=len(done), failed=len(failed))
    batch.usage.update(input_tokens=0, total_tokens=0)
    for record in done.values():
        _add_usage(batch, record)
    return [*done, *failed]


def _ok(record: dict[str, Any]) -> bool:
    response = record.get("response") or {}
    return 200 <= int(response.get("status_code") or 0) < 300


async def send_lines(
    app: ASGIApp,
    batch: Batch,
    lines: Iterator[Line],
    answers: AnswerSink,
    extra: dict[str, Any],
    window: int,
    cancelled: asyncio.Event,
    on_line: Callable[[], None] = lambda: None,
) -> str:
    """Send ``lines`` through ``app``, ``window`` at a time, until they run out, ``cancelled``
    is set or the batch expires (the rest answered ``batch_expired``); the final status.
    ``on_line`` runs after each line is sent (progress, saving the counts)."""
    sender = _Sender(app, batch, extra, answers, on_line)
    room = asyncio.Semaphore(window)
    final = "completed"
    try:
        for line in lines:
            await room.acquire()
            if cancelled.is_set():
                final = "cancelled"
                break
            if time.time() >= batch.expires_at:
                final = "expired"
                answers.expire(line)
                break
            sender.start(line, room)
        await sender.finish(grace_s=CANCEL_GRACE_S if cancelled.is_set() else None)
        if final == "expired":
            for line in lines:
                answers.expire(line)
    finally:
        await sender.cancel()  # the process stops: lines in flight run again on restart
    return "cancelled" if cancelled.is_set() else final


class AnswerSink(Protocol):
    """What :func:`send_lines` hands each line's outcome to: :class:`Answers` (the output and
    error files), or a Ray actor's list of results that its driver writes (``ray_lines.py``)."""

    def add(self, line: Line, status: int, body: Any) -> None: ...

    def expire(self, line: Line) -> None: ...


class Answers:
    """Where a batch's answers go: 2xx to the output file, the rest (and lines never sent) to the
    error file, with the batch's counts and usage kept up to date."""

    def __init__(self, batch: Batch, out: AnswerFile, err: AnswerFile) -> None:
        self.batch, self.out, self.err = batch, out, err

    def add(self, line: Line, status: int, body: Any) -> None:
        record = answer(line, status, body)
        if 200 <= status < 300:
            self.out.write(record)
            self.batch.request_counts["completed"] += 1
            _add_usage(self.batch, record)
            return
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            record["error"] = {"code": error.get("code"), "message": error.get("message")}
        self.err.write(record)
        self.batch.request_counts["failed"] += 1

    def expire(self, line: Line) -> None:
        self.err.write(unanswered(line, "batch_expired", _EXPIRED))
        self.batch.request_counts["failed"] += 1

    def close(self) -> None:
        self.out.close()
        self.err.close()


class _Sender:
    """Sends lines through the app as the batch's owner, in the background lane."""

    def __init__(
        self,
        app: ASGIApp,
        batch: Batch,
        extra: dict[str, Any],
        answers: AnswerSink,
        on_line: Callable[[], None],
    ) -> None:
        self.app, self.batch, self.extra, self.answers = app, batch, extra, answers
        self.on_line = on_line
        self.running: set[asyncio.Task[None]] = set()

    def start(self, line: Line, room: asyncio.Semaphore) -> None:
        task = asyncio.create_task(self._one(line, room))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _one(self, line: Line, room: asyncio.Semaphore) -> None:
        try:
            while True:
                try:
                    status, body = await call(self.app, self.batch.endpoint, line.body, self.extra)
                except Exception as e:  # the app answers errors itself: this is a bug
                    log.exception("batch %s, line %d", self.batch.id, line.number)
                    status, body = 500, {"error": {"message": str(e), "code": "internal_error"}}
                if not _not_now(status, body) or time.time() >= self.batch.expires_at:
                    break
                await asyncio.sleep(RETRY_S)
            self.answers.add(line, status, body)
            self.on_line()
        finally:
            room.release()

    async def cancel(self) -> None:
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)

    async def finish(self, grace_s: float | None) -> None:
        """Wait for the lines in flight (at most ``grace_s``, then cancel the rest)."""
        if grace_s is not None and self.running:
            _, late = await asyncio.wait(self.running, timeout=grace_s)
            for task in late:
                task.cancel()
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)


def _not_now(status: int, body: Any) -> bool:
    """An answer that says "later", not "no": the line's model is still loading."""
    error = body.get("error") if isinstance(body, dict) else None
    return status == 503 and isinstance(error, dict) and error.get("code") == "model_not_ready"


def _add_usage(batch: Batch, record: dict[str, Any]) -> None:
    body = (record.get("response") or {}).get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(usage, dict):
        tokens = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        batch.usage["input_tokens"] += tokens
        batch.usage["total_tokens"] += tokens
