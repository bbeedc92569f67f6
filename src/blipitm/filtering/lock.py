"""One run per output folder: ``DIR/.lock``, held with ``flock`` for the whole run.

The kernel releases an ``flock`` when its holder dies (SIGKILL included), so a lock left by a dead
run is simply taken over; no pid check is needed, and none is racy. The file records who holds it
(pid, host, start time) and a random token, so that a second run can say who is in its way, and
so that a Ray actor (which runs under its driver's lock, without taking it) can check before
committing a shard that its driver still holds the folder. The file is never removed: removing it
while another process opens it would let two runs lock two different files.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from types import TracebackType

from blipitm.common.safeio import loads_json, read_regular_file
from blipitm.filtering.shards import FilterError

log = logging.getLogger("blipitm.filter")

LOCK_NAME = ".lock"


class OutputLockedError(FilterError):
    """The output folder is held by another run (or was taken over while this run was in it)."""


class OutputLock:
    """``with OutputLock(out) as lock:`` holds ``out`` (created if needed) or raises
    :class:`OutputLockedError` naming the holder."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"{self.out} is in use by another blipitm filter run ({describe(self.path)}); "
                "wait for it to finish, or use another --out"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("%s: this file system cannot lock (%s); not locked", self.path, e)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "token": self.token,
        }
        data = json.dumps(holder).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def check(self) -> None:
        """Raise unless this lock still names this run (see :func:`check_owner`)."""
        check_owner(self.out, self.token)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(path: Path) -> dict[str, object]:
    with contextlib.suppress(OSError, ValueError):
        got = loads_json(read_regular_file(path, max_bytes=4096, what="lock file"))
        if isinstance(got, dict):
            return got
    return {}


def describe(path: Path) -> str:
    h = _holder(path)
    if not h:
        return "holder unknown"
    return f"pid {h.get('pid')} on host {h.get('host')}, since {h.get('started')}"


def check_owner(out: str | os.PathLike[str], token: str) -> None:
    """Raise :class:`OutputLockedError` unless ``out``'s lock file names the run ``token``:
    what a shard's writer checks before committing, so that a run that lost the folder (its
    driver died and another run took over) never commits into it."""
    path = Path(out) / LOCK_NAME
    if _holder(path).get("token") != token:
        raise OutputLockedError(
            f"{out} is now held by another run ({describe(path)}); this run's shard is not "
            "committed"
        )
