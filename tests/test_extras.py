"""The server, filtering and plotting stacks are extras (issue 19 §8): the library works without
them, and a command that needs a missing one says, in one line, which ``pip install`` fixes it.

A missing package is simulated in a child process by a meta-path finder that refuses it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from blipitm.cli import extras
from server_helpers import REPO, free_port

# Installs as an import name, per extra of pyproject.toml (besides other extras it names).
EXTRA_PACKAGES = {
    "plot": {"matplotlib"},
    "server": {
        *("fastapi", "fastapi_swagger", "uvicorn", "uvloop", "prometheus_client", "httpx"),
        "python_multipart",
    },
    "filter": {"pyarrow"},
}
# httpx stays: huggingface_hub, a core dependency, needs it too (and h11, through httpcore).
EVERY_EXTRA = (set().union(*EXTRA_PACKAGES.values()) | {"redis"}) - {"httpx"}

BLOCKER = """
import sys

BLOCKED = set(sys.argv[1].split(","))


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
sys.argv = [sys.argv[0], *sys.argv[2:]]
"""


def run_blocked(blocked: set[str], code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, ",".join(sorted(blocked)), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_blocked(blocked: set[str], *argv: str) -> subprocess.CompletedProcess[str]:
    code = "from blipitm.cli.main import main\nsys.exit(main())\n"
    return run_blocked(blocked, code, *argv)


def serve_argv() -> list[str]:
    return ["serve", "--model", "/nonexistent", "--host", "127.0.0.1", "--port", str(free_port())]


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "prometheus_client", "httpx"])
def test_serve_without_the_server_extra_is_one_line(missing: str) -> None:
    result = cli_blocked({missing}, *serve_argv())
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "blipitm: error: the server needs its extra: pip install 'blipitm[server]'"
    ]


@pytest.mark.parametrize(
    ("missing", "argv", "extra"),
    [
        ("pyarrow", ["filter", "in.parquet", "--out", "out", "--threshold", "0.5"], "filter"),
        ("matplotlib", ["filter", "in.parquet", "--out", "out", "--threshold", "0.5"], "filter"),
        ("matplotlib", ["explain", "img.png", "a dog", "--out", "out"], "plot"),
    ],
)
def test_other_commands_name_their_extra(missing: str, argv: list[str], extra: str) -> None:
    result = cli_blocked({missing}, *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"blipitm: error: {extras.message(extra)}"]
    assert f"pip install 'blipitm[{extra}]'" in result.stderr


def test_the_library_and_help_need_no_extra(tiny_ckpt: Path) -> None:
    """``blipitm.load`` and scoring, the library's packages, and every ``--help``: nothing of the
    extras is imported (the imports stay lazy)."""
    code = f"""
import blipitm
import blipitm.engine, blipitm.retrieval, blipitm.evaluation, blipitm.explain, blipitm.filtering
from blipitm.cli.main import COMMANDS, main
from PIL import Image

engine = blipitm.load({str(tiny_ckpt)!r}, device="cpu")
scores = engine.score(Image.new("RGB", (64, 64), "red"), ["a red square", "a dog"])
assert 0 <= float(scores.itm_probability[0]) <= 1, scores
for command in ["", *(c.name for c in COMMANDS)]:
    try:
        main([command, "--help"] if command else ["--help"])
    except SystemExit as e:
        assert e.code == 0, (command, e.code)
loaded = sorted({{m.partition(".")[0] for m in sys.modules}} & BLOCKED)
assert not loaded, loaded
"""
    result = run_blocked(EVERY_EXTRA, code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_late_import_names_its_extra() -> None:
    """A command whose extra check passed but which still fails to import an extra's package (or
    a command with no extra of its own) gets the same line; other modules are not ours to word."""
    late = ModuleNotFoundError("No module named 'pyarrow.parquet'", name="pyarrow.parquet")
    assert str(extras.explain_missing(late, "index")) == extras.message("filter")
    plot = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    assert str(extras.explain_missing(plot, "serve")) == extras.message("server")
    assert str(extras.explain_missing(plot, "eval")) == extras.message("plot")
    other = ModuleNotFoundError("No module named 'nonesuch'", name="nonesuch")
    assert extras.explain_missing(other, "serve") is None


def test_the_extras_table_matches_pyproject() -> None:
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra, packages in EXTRA_PACKAGES.items():
        assert extra in optional and extra in extras.EXTRAS
        named = {
            r.split(";")[0].split(">")[0].split("<")[0].split("[")[0].strip().replace("-", "_")
            for r in optional[extra]
        }
        assert packages <= named, (extra, packages - named)
        assert packages - {"uvloop"} <= set(extras.EXTRAS[extra][1]), extra
    assert "blipitm[all]" in optional["test"]
    assert set(optional["all"][0].split("[")[1].rstrip("]").split(",")) == set(optional) - {
        "all",
        "test",
    }
