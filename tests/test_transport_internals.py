"""The connection layer's hold on uvicorn (issue 19 §7): every uvicorn internal the transport
sources touch is listed in the package docstring, each listed one exists in the installed uvicorn,
and the server refuses, at start-up and in one line, a uvicorn outside the range it was tested with.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import h11
import pytest
import uvicorn

import blipitm.server.transport as transport
from blipitm.cli.main import main
from blipitm.server.transport import compat
from server_helpers import REPO, free_port

TRANSPORT = REPO / "src" / "blipitm" / "server" / "transport"
SOURCES = sorted(TRANSPORT.glob("*.py"))

# The uvicorn classes the transport extends or reaches into, and the module that defines each.
UVICORN_CLASSES = {
    "H11Protocol": "protocols/http/h11_impl.py",
    "RequestResponseCycle": "protocols/http/h11_impl.py",
    "ServerState": "server.py",
    "Server": "server.py",
    "Config": "config.py",
    "LifespanOn": "lifespan/on.py",
}
# asyncio's public protocol interface: H11Protocol implements it, and overriding it is no secret.
ASYNCIO_PUBLIC = {name for name in dir(asyncio.Protocol) if not name.startswith("__")}


def uvicorn_members() -> dict[str, set[str]]:
    """Each class's methods, class attributes, instance attributes and constructor parameters, as
    the installed uvicorn's source defines them."""
    root = Path(uvicorn.__file__).parent
    members: dict[str, set[str]] = {}
    for name, rel in UVICORN_CLASSES.items():
        tree = ast.parse((root / rel).read_text())
        cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
        found: set[str] = set()
        for item in cls.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                found.add(item.name)
                if item.name == "__init__":
                    found |= {a.arg for a in [*item.args.args, *item.args.kwonlyargs]}
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                found.add(item.target.id)
            elif isinstance(item, ast.Assign):
                found |= {t.id for t in item.targets if isinstance(t, ast.Name)}
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and isinstance(node.ctx, ast.Store)
            ):
                found.add(node.attr)
        members[name] = found - {"self", "__init__"}
    return members


def listed() -> set[tuple[str, str]]:
    """The ``Class.name`` entries of the package docstring's list of uvicorn internals."""
    doc = transport.__doc__ or ""
    section = doc.split("uvicorn internals touched", 1)[1]
    return set(re.findall(r"^- ``(\w+)\.(\w+)``", section, flags=re.MULTILINE))


def names_used() -> dict[str, set[str]]:
    """Every attribute read or written, keyword passed, and method overridden in the transport
    sources, with the files that use it."""
    used: dict[str, set[str]] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.keyword) and node.arg is not None:
                names = [node.arg]
            elif isinstance(node, ast.ClassDef):
                names = [
                    f.name
                    for f in node.body
                    if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                ]
            for name in names:
                used.setdefault(name, set()).add(path.name)
    return used


def ours() -> set[str]:
    """Names the transport itself defines: its functions, methods and attributes it assigns."""
    defined: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined.add(node.target.id)
    return defined


def test_every_uvicorn_internal_used_is_listed() -> None:
    members = uvicorn_members()
    theirs = set().union(*members.values()) - ASYNCIO_PUBLIC
    entries = {attr for _, attr in listed()}
    unlisted = {
        name: files
        for name, files in names_used().items()
        if name in theirs and name not in entries
    }
    assert not unlisted, (
        "the transport uses uvicorn internals its docstring does not list (add each to the list in "
        f"server/transport/__init__.py, once checked in every supported release): {unlisted}"
    )


def test_every_private_access_is_ours_or_listed() -> None:
    """The plain grep: a ``._name`` access or ``_name=`` keyword is the transport's own, or a
    uvicorn private listed in the docstring (ours may not shadow one of uvicorn's)."""
    theirs = set().union(*uvicorn_members().values())
    mine = ours() - theirs
    entries = {attr for _, attr in listed()}
    found = set()
    for path in SOURCES:
        text = path.read_text()
        found |= {(m, path.name) for m in re.findall(r"\.(_[A-Za-z]\w*)", text)}
        found |= {(m, path.name) for m in re.findall(r"\b(_[A-Za-z]\w*)=", text)}
    unknown = sorted((name, file) for name, file in found if name not in mine | entries)
    assert not unknown, f"private names neither the transport's own nor listed: {unknown}"
    shadowed = sorted((ours() & theirs & {name for name, _ in found}) - entries)
    assert not shadowed, f"the transport's own private names shadow uvicorn's: {shadowed}"


def test_every_listed_internal_exists_and_is_used() -> None:
    members = uvicorn_members()
    used = names_used()
    for cls, attr in sorted(listed()):
        assert cls in members, f"{cls}.{attr}: add {cls} to UVICORN_CLASSES"
        assert attr in members[cls], f"uvicorn {uvicorn.__version__} has no {cls}.{attr}"
        assert attr in used, f"{cls}.{attr} is listed but the transport no longer uses it"


def test_h11_is_used_through_its_public_api_only() -> None:
    public = {n for n in [*dir(h11), *dir(h11.Connection)] if not n.startswith("_")}
    private = {n for n in [*dir(h11), *dir(h11.Connection)] if n.startswith("_")}
    used = names_used()
    assert {"their_state", "trailing_data", "SEND_BODY"} <= public & set(used)
    assert not {name for name in used if name in private} - ours()


# -- the supported range ------------------------------------------------------------------------


def test_pyproject_requires_the_range_the_check_enforces() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    uvicorns = [r.split(";")[0].strip() for r in requirements if re.match(r"uvicorn\b", r)]
    assert uvicorns == [f"uvicorn{compat.SUPPORTED_UVICORN}"]
    low, below = (".".join(map(str, v)) for v in (compat.UVICORN_MIN, compat.UVICORN_BELOW))
    assert f">={low},<{below}" == compat.SUPPORTED_UVICORN
    assert f"``{compat.SUPPORTED_UVICORN}``" in (transport.__doc__ or "")


def test_the_installed_uvicorn_is_supported() -> None:
    compat.check_uvicorn()


@pytest.mark.parametrize("version", ["0.40.2", "0.55.0", "1.0.0", "unknown"])
def test_serve_refuses_an_unsupported_uvicorn_in_one_line(
    version: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """At start-up, before the port is bound or anything loads: one line naming both versions."""
    monkeypatch.setattr(uvicorn, "__version__", version)
    port = free_port()
    assert (
        main(["serve", "--model", "/nonexistent", "--host", "127.0.0.1", "--port", str(port)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    with socket.socket() as probe:  # refused before the port was bound
        probe.bind(("127.0.0.1", port))
    assert err == [
        f"blipitm: error: uvicorn {version} is installed, but the server's connection layer "
        "supports uvicorn>=0.41,<0.55 only (it extends uvicorn internals): "
        "pip install 'uvicorn>=0.41,<0.55'"
    ]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def test_importing_the_transport_checks_nothing() -> None:
    code = "import uvicorn; uvicorn.__version__ = '9.9.9'; import blipitm.server.transport"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=_env(), timeout=60)


def test_sigterm_during_start_up_drains(tiny_ckpt: Path) -> None:
    """A SIGTERM before uvicorn's own handlers are in place still drains and runs the app's
    shutdown, exit 0 (uvicorn before 0.41 skipped both when start-up set ``should_exit``: the
    reason for the lower bound)."""
    port = free_port()
    argv = [sys.executable, "-m", "blipitm.cli.main", "-v", "serve", "--model", str(tiny_ckpt)]
    proc = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "starting blipitm serve" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
        proc.wait()
    output = "".join(seen) + out
    assert proc.returncode == 0, output
    assert "shutting down" in output, output
    assert "Traceback" not in output, output
