"""blipitm.common.safeio: paths that are not regular files, size caps, hostile JSON."""

from __future__ import annotations

import os
import threading

import pytest

from blipitm.common.safeio import (
    JSONDepthError,
    UnreadableFileError,
    loads_json,
    read_regular_file,
)


def test_regular_file_is_read(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"hello")
    assert read_regular_file(p, max_bytes=5) == b"hello"


def test_file_over_the_cap_is_refused(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"hello!")
    with pytest.raises(UnreadableFileError, match="over the limit of 5"):
        read_regular_file(p, max_bytes=5)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def read() -> None:
        try:
            read_regular_file(fifo, max_bytes=10)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert isinstance(result[0], UnreadableFileError)
    assert "FIFO" in str(result[0])


def test_device_through_a_symlink_is_refused(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    with pytest.raises(UnreadableFileError, match="a device"):
        read_regular_file(link, max_bytes=1 << 30)


def test_folder_is_refused(tmp_path):
    with pytest.raises(UnreadableFileError, match="a folder"):
        read_regular_file(tmp_path, max_bytes=10)


def test_deep_json_is_a_value_error():
    with pytest.raises(JSONDepthError):
        loads_json("[" * 100_000)
    with pytest.raises(ValueError):
        loads_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(JSONDepthError):
        loads_json("[" * 65 + "]" * 65)
    assert loads_json("[" * 64 + "]" * 64) is not None


def test_other_bad_json_is_a_value_error():
    for bad in (b"\xff\xfe{", "1" * 5000, "{", '{"a": }'):
        with pytest.raises(ValueError):
            loads_json(bad)
    assert loads_json('{"a": [1, {"b": "c"}]}') == {"a": [1, {"b": "c"}]}
