"""``blipitm batch run --ray``: the same answers as the local run, each ``custom_id`` once, and a
resume that answers only the lines the output files lack.

One local Ray (2 CPUs) for the module (conftest's ``local_ray``), which the command joins; each
run starts one actor (a model load of the tiny checkpoint). The flag checks need no Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from blipitm.cli.main import main
from server_helpers import data_uri, png_bytes

try:
    import ray  # noqa: F401 (only whether it is there)
except ImportError:  # pragma: no cover - CI installs the test extra
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("ray is not installed (pip install -e '.[test]')", allow_module_level=True)

LINES = 20
# Bit-identical answers need the same engine batches and torch threads on both sides: one line
# in flight (each line its own engine batch) and 2 threads (``two_threads``; the actor's 2 CPUs).
ONE_LINE_AT_A_TIME = ["--window", "1"]
TWO_THREADS = ["--cpus-per-worker", "2"]
FAILED = ["c10", "c12", "c17", "c19", "c3", "c5"]
SUMMARY = "14 answered, 6 failed, of 20"


def body(i: int) -> dict[str, Any]:
    """Texts, images, and lines the endpoint refuses: an image that is none, an unknown model."""
    if i % 7 == 3:
        return {"input": [data_uri(b"not an image")], "modality": "image"}
    if i % 7 == 5:
        return {"input": ["a dog"], "model": "no-such-model"}
    if i % 2:
        return {"input": [data_uri(png_bytes((12 * i, 80, 200 - 9 * i)))], "modality": "image"}
    return {"input": [f"caption number {i}", "a second text"]}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    rows = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings", "body": body(i)}
        for i in range(LINES)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch_run(source: Path, out: Path, err: Path, *flags: str) -> int:
    return main(["batch", "run", str(source), "--output", str(out), "--errors", str(err), *flags])


def answers(*paths: Path) -> dict[str, dict[str, Any]]:
    """The answer lines by custom_id; a custom_id answered twice fails the test."""
    rows = [json.loads(x) for path in paths for x in path.read_text().splitlines()]
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a custom_id answered twice"
    return by_id


def what_must_be_equal(row: dict[str, Any]) -> tuple[Any, ...]:
    """An answer but for its ``id`` and ``request_id``, which are new on every run."""
    return row["response"]["status_code"], row["response"]["body"], row["error"]


@pytest.mark.usefixtures("local_ray", "two_threads")
def test_ray_run_answers_every_line_as_the_local_run(
    tiny_ckpt: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", str(tiny_ckpt), *ONE_LINE_AT_A_TIME]
    local = tmp_path / "local.jsonl", tmp_path / "local.err.jsonl"
    assert batch_run(source, *local, *model) == 1  # some lines fail: exit 1, as documented
    want = answers(*local)
    summary = capsys.readouterr().out

    got_paths = tmp_path / "ray.jsonl", tmp_path / "ray.err.jsonl"
    # 20 lines in chunks of 6: four tasks, two at a time on the one actor.
    code = batch_run(source, *got_paths, *model, *TWO_THREADS, "--ray", "--chunk-lines", "6")
    assert code == 1
    got = answers(*got_paths)
    assert summary.replace("local", "ray") == capsys.readouterr().out
    assert SUMMARY in summary

    assert sorted(got) == sorted(want) == sorted(f"c{i}" for i in range(LINES))
    for custom_id, row in want.items():
        assert what_must_be_equal(got[custom_id]) == what_must_be_equal(row), custom_id
    failed = {r["custom_id"]: r for r in map(json.loads, got_paths[1].read_text().splitlines())}
    assert sorted(failed) == FAILED
    assert {r["response"]["status_code"] for r in failed.values()} == {400, 404}
    assert failed["c3"]["error"]["code"] == "invalid_input"


@pytest.mark.usefixtures("local_ray")
def test_ray_run_resumes_answering_only_the_lines_not_yet_answered(
    tiny_ckpt: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output cut short (7 answers and a torn 8th, as a killed run leaves it; failed lines
    too, without --errors): the --ray run keeps those 7 answers as they are and answers the
    other 13 lines, each once."""
    whole = tmp_path / "whole.jsonl"
    assert batch_run(source, whole, whole, "--model", str(tiny_ckpt)) == 1
    rows = whole.read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    kept = b"".join(rows[:7])
    out.write_bytes(kept + rows[7][:30])
    capsys.readouterr()

    flags = ["--model", str(tiny_ckpt), "--ray", "--chunk-lines", "4", "--cpus-per-worker", "1"]
    assert batch_run(source, out, out, *flags) == 1
    assert out.read_bytes().startswith(kept)  # the earlier answers, untouched
    earlier = {json.loads(r)["custom_id"] for r in rows[:7]}
    resumed = answers(out)
    assert sorted(resumed) == sorted(f"c{i}" for i in range(LINES))
    new = [json.loads(x)["custom_id"] for x in out.read_bytes()[len(kept) :].splitlines()]
    assert sorted(new) == sorted(set(resumed) - earlier)  # only the rest was answered
    assert SUMMARY in capsys.readouterr().out  # the earlier answers count


@pytest.mark.usefixtures("local_ray")
def test_a_model_no_actor_can_load_is_one_error_naming_the_model(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    flags = ["--model", str(tmp_path / "nowhere"), "--ray", "--cpus-per-worker", "1"]
    assert batch_run(source, out, out, *flags) == 2
    err = capsys.readouterr().err
    assert "blipitm: error: model: " in err and "nowhere" in err
    assert "Traceback" not in err and out.read_text() == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ray", "--workers", "0"], "--workers: must be >= 1, got 0"),
        (["--ray", "--cpus-per-worker", "0"], "--cpus-per-worker: must be > 0, got 0.0"),
        (["--ray", "--chunk-lines", "0"], "--chunk-lines: must be >= 1, got 0"),
        (["--ray", "--gpus-per-worker", "-1"], "--gpus-per-worker: must be >= 0, got -1.0"),
        (["--ray="], "--ray: give a cluster's address"),
        (["--window", "0"], "--window: must be >= 1, got 0"),
        (["--workers", "2"], "--workers: takes effect only with --ray"),
        (["--chunk-lines", "8"], "--chunk-lines: takes effect only with --ray"),
    ],
)
def test_bad_ray_flags_are_refused_naming_the_flag_before_any_work(
    flags: list[str],
    message: str,
    source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out.jsonl"
    assert batch_run(source, out, out, "--model", str(tmp_path / "nowhere"), *flags) == 2
    assert f"blipitm: error: {message}" in capsys.readouterr().err
    assert not out.exists()
