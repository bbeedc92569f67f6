"""Every Python and shell example in README.md and docs/*.md runs, so that none can drift.

The harness is generic, keyed to no example's text:

- Fenced ```python``` blocks and ```bash``` / ```sh``` / ```shell``` blocks are examples; a page
  runs top to bottom in one fresh working directory, as a reader would follow it. Each Python
  block is a self-contained script (a reader copies one block).
- The model: the default model and every ``Salesforce/blip-itm-*`` hub id the page names are a
  tiny random checkpoint in an offline hub cache (``HF_HUB_OFFLINE=1``), so the examples run
  verbatim; a local ``--model ./dir`` (or ``blipitm.load("./dir")``) is a copy of it. Every
  ``Salesforce/blip-image-captioning-*`` id, and the default captioner where a page captions, is
  a tiny random captioner checkpoint the same way.
- Files the examples name are written first: images (``dog.jpg``, ``photos/old.jpg``), image
  folders (``photos/``), ``--annotations`` files over their ``--image-root``, caption lists
  (``captions.txt``).
- Shell: ``blipitm`` is this checkout's CLI; ``$KEY`` is set (the docs' placeholder for an API
  key); curl fails on HTTP errors (``CURL_HOME``). Two kinds of command are handled specially:
  ``pip install`` is not run (it needs the network and would change the environment under test;
  this checkout is what runs), and ``blipitm serve`` is started in the background with the same
  flags on a free port on 127.0.0.1, and later blocks reach it there (``localhost:8000`` is
  rewritten to that port, and ``BLIPITM_BASE_URL`` is its URL, for snippets that read the
  address from it as written). Everything else in a block runs, in bash with
  ``set -euo pipefail``.
- A block is excluded only by a marker comment on the line right before its fence that says
  why: ``<!-- example: not run — needs the network -->``. Every other block must run and
  succeed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blipitm import DEFAULT_CAPTION_MODEL, DEFAULT_MODEL
from blipitm.testing.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*example:\s*not run\s*[—–:-]+\s*(?P<reason>\S.*?)\s*-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*example\b")
HUB_ID = re.compile(r"\bSalesforce/blip-itm-[\w.-]+")
CAPTIONER_HUB_ID = re.compile(r"\bSalesforce/blip-image-captioning-[\w.-]+")
CAPTIONS_USED = re.compile(r"blipitm caption\b|load_captioner\(")
TIMEOUT_S = 300  # per block and for a server to become ready; generous for a loaded machine
SKIPPED = {"pip": "pip install is not run: it needs the network, and this checkout is under test"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str  # "python" or "shell"
    code: str
    not_run: str | None  # the marker's reason

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.language})"


def extract_blocks(page: Path, text: str | None = None) -> list[Block]:
    """The example blocks of a markdown page, with their markers. A malformed marker (no
    reason, or not right before a runnable fence) is an error, never a silent skip."""
    lines = (page.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            _check_stray_marker(page, lines, i)
            i += 1
            continue
        close = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        language = LANGUAGES.get(m["lang"].lower())
        marker = _marker_before(page, lines, i)
        if language is None:
            if marker is not None:
                raise ValueError(f"{page}:{i + 1}: example marker before a block that never runs")
        else:
            indent = len(m["indent"])
            code = "\n".join(line[indent:] for line in lines[i + 1 : close]) + "\n"
            blocks.append(Block(page, i + 1, language, code, marker))
        i = close + 1
    return blocks


def _marker_before(page: Path, lines: list[str], fence: int) -> str | None:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not ANY_MARKER.search(lines[j]):
        return None
    m = MARKER.match(lines[j])
    if m is None:
        raise ValueError(
            f"{page}:{j + 1}: malformed example marker {lines[j].strip()!r}; write "
            "'<!-- example: not run — REASON -->'"
        )
    return m["reason"]


def _check_stray_marker(page: Path, lines: list[str], i: int) -> None:
    if ANY_MARKER.search(lines[i]):
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or not FENCE.match(lines[j]):
            raise ValueError(f"{page}:{i + 1}: example marker not followed by a fenced block")


# -- shell commands -------------------------------------------------------------------------


def logical_lines(code: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, current = [], ""
    for line in code.splitlines():
        if line.endswith("\\"):
            current += line[:-1]
        else:
            out.append(current + line)
            current = ""
    if current:
        out.append(current)
    return out


def split_and(line: str) -> list[str]:
    """Split a command line at ``&&`` outside quotes and ``$(...)``."""
    parts, start, quote, depth, i, end = [], 0, "", 0, 0, len(line)
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif line.startswith("$(", i):
            depth += 1
            i += 1
        elif c == ")" and depth:
            depth -= 1
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            end = i  # a comment: nothing after it is a command
            break
        elif line.startswith("&&", i) and depth == 0:
            parts.append(line[start:i].strip())
            start = i + 2
            i += 1
        i += 1
    parts.append(line[start:end].strip())
    return [p for p in parts if p]


def program(command: str) -> list[str]:
    words = command.split()
    while words and re.fullmatch(r"\w+=\S*", words[0]):  # leading VAR=value assignments
        words = words[1:]
    if words[:3] == ["python", "-m", "pip"] or words[:3] == ["python3", "-m", "pip"]:
        return ["pip", *words[3:]]
    return words


@dataclass
class ShellPlan:
    script: list[str] = field(default_factory=list)  # commands to run, in order
    serve: str | None = None  # a `blipitm serve` command, to start in the background
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (command, reason)


def plan_shell(code: str) -> ShellPlan:
    plan = ShellPlan()
    for line in logical_lines(code):
        kept = []
        for command in split_and(line):
            words = program(command)
            if words and words[0] in SKIPPED:
                plan.skipped.append((command, SKIPPED[words[0]]))
            elif words[:2] == ["blipitm", "serve"]:
                if plan.serve is not None or kept:
                    raise ValueError(f"one `blipitm serve` per block, at its start: {line!r}")
                plan.serve = command
            else:
                kept.append(command)
        if kept:
            plan.script.append(" && ".join(kept))
    return plan


def serve_on(command: str, port: int) -> tuple[str, int]:
    """``command`` bound to 127.0.0.1:``port``, and the port the docs gave it (default 8000)."""
    documented = 8000
    m = re.search(r"--port[ =](\d+)", command)
    if m:
        documented = int(m[1])
        command = command[: m.start()] + f"--port {port}" + command[m.end() :]
    else:
        command = command.replace("blipitm serve", f"blipitm serve --port {port}", 1)
    command = re.sub(r"--host[ =]\S+", "--host 127.0.0.1", command)
    return command, documented


# -- the world the examples expect ----------------------------------------------------------

IMAGE = r"(?<![\w/.:~$-])((?:[\w-]+/)*[\w-][\w.-]*\.(?:jpe?g|png|webp))\b"
FOLDER = r"(?<![\w/.:~$-])([\w-][\w.-]*)/(?=[\s\"'),]|$)"
OUTPUT_FLAGS = ("--out", "--output", "-o", "--local-dir")
CAPTIONS = ["a dog on the grass", "a red car", "a cat on a sofa", "two people on a beach"]


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)


def provision(
    cwd: Path,
    hub: Path,
    blocks: list[Block],
    tiny: Path,
    tiny_pth: Path,
    tiny_captioner: Path | None = None,
) -> None:
    """Write what the examples name, relative to ``cwd``; hub ids into the ``hub`` cache."""
    text = "\n".join(b.code for b in blocks)
    shell = "\n".join(b.code for b in blocks if b.language == "shell")
    repos = {repo: tiny for repo in {DEFAULT_MODEL, *HUB_ID.findall(text)}}  # commands default
    captioners = set(CAPTIONER_HUB_ID.findall(text))
    if CAPTIONS_USED.search(text):
        captioners.add(DEFAULT_CAPTION_MODEL)
    if captioners:
        assert tiny_captioner is not None, "a page captions: pass a captioner checkpoint"
        repos |= dict.fromkeys(captioners, tiny_captioner)
    for repo, source in sorted(repos.items()):
        snapshot = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
        if not snapshot.exists():
            shutil.copytree(source, snapshot)
            (snapshot.parents[1] / "refs").mkdir()
            (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    local_models = re.findall(r"--model[ =](\S+)", text)
    local_models += re.findall(r"blipitm\.load\(\s*[\"']([^\"']+)[\"']", text)
    for name in local_models:
        target = cwd / name
        # owner/name is a hub id: only the ones above exist; any other must fail, not be faked.
        if re.fullmatch(r"[\w-]+/[\w.-]+", name) or Path(name).is_absolute() or target.exists():
            continue
        if name.endswith((".pth", ".pt", ".bin")):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny_pth, target)
        else:
            shutil.copytree(tiny, target)
    for seed, name in enumerate(sorted(set(re.findall(IMAGE, text)))):
        if not (cwd / name).exists():
            write_image(cwd / name, seed)
    for m in re.finditer(FOLDER, shell):
        before = shell[: m.start()].split()
        if before and before[-1] in OUTPUT_FLAGS:
            continue
        folder = cwd / m[1]
        if not folder.exists():
            for k in range(3):
                write_image(folder / f"{m[1]}-{k}.jpg", 100 + k)
    for ann, root in re.findall(r"--annotations[ =](\S+)\s+--image-root[ =](\S+)", shell):
        images = sorted(p for p in (cwd / root).rglob("*") if p.suffix in (".jpg", ".png"))
        entries = [
            {"image": str(p.relative_to(cwd / root)), "caption": [CAPTIONS[i % 4], "a photo"]}
            for i, p in enumerate(images)
        ]
        (cwd / ann).write_text(json.dumps(entries))
    for name in re.findall(r"(?<![\w/.-])([\w-][\w./-]*\.txt)\b", shell):
        if not (cwd / name).exists():
            (cwd / name).write_text("\n".join(CAPTIONS) + "\n")


# -- running a page -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `blipitm serve` example running in the background until the page is done."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.command, self.documented_port = serve_on(command, self.port)
        self.log = log
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", f"exec {self.command}"],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.command!r} never became ready:\n{self.output()}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=5) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def rewrite(self, code: str) -> str:
        return re.sub(
            rf"\b(?:localhost|127\.0\.0\.1):{self.documented_port}\b",
            f"127.0.0.1:{self.port}",
            code,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Outcome:
    block: Block
    ran: bool
    skipped: list[tuple[str, str]]


def environment(world: Path) -> dict[str, str]:
    bin_dir = world / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "blipitm"  # this checkout's CLI, whatever is installed
    cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m blipitm.cli.main "$@"\n')
    cli.chmod(0o755)
    (world / ".curlrc").write_text("fail-with-body\nshow-error\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BLIPITM_"))}
    return env | {
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]]),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
        "HF_HOME": str(world / "hf"),
        "HF_HUB_CACHE": str(world / "hub"),
        "HF_HUB_OFFLINE": "1",
        "CURL_HOME": str(world),
        "KEY": "docs-example-key",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def run_page(
    blocks: list[Block],
    world: Path,
    tiny: Path,
    tiny_pth: Path,
    tiny_captioner: Path | None = None,
) -> Iterator[Outcome]:
    cwd = world / "work"
    cwd.mkdir()
    env = environment(world)
    runnable = [b for b in blocks if b.not_run is None]
    provision(cwd, world / "hub", runnable, tiny, tiny_pth, tiny_captioner)
    server: Server | None = None
    try:
        for block in blocks:
            if block.not_run is not None:
                yield Outcome(block, ran=False, skipped=[])
                continue
            code = server.rewrite(block.code) if server else block.code
            skipped: list[tuple[str, str]] = []
            if block.language == "python":
                script = cwd / f"example_{block.line}.py"
                script.write_text(code)
                argv = [sys.executable, str(script)]
            else:
                plan = plan_shell(code)
                skipped = plan.skipped
                if plan.serve is not None:
                    if server is not None:
                        server.stop()
                    server = Server(plan.serve, cwd, env, world / f"serve-{block.line}.log")
                    env = env | {"BLIPITM_BASE_URL": f"http://127.0.0.1:{server.port}"}
                body = server.rewrite("\n".join(plan.script)) if server else "\n".join(plan.script)
                argv = ["bash", "-c", "set -euo pipefail\n" + body]
            done = subprocess.run(
                argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
            if done.returncode != 0:
                logs = f"\nserver log:\n{server.output()}" if server else ""
                raise AssertionError(
                    f"example {block} failed (exit {done.returncode}):\n{code}\n"
                    f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}{logs}"
                )
            yield Outcome(block, ran=True, skipped=skipped)
    finally:
        if server is not None:
            server.stop()


# -- tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BLIP captioner (BlipForConditionalGeneration) in the hub layout."""
    return make_checkpoint(tmp_path_factory.mktemp("captioner"), preset="tiny", task="caption")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(
    page: Path, tiny_ckpt: Path, tiny_pth: Path, tiny_captioner: Path, tmp_path: Path
) -> None:
    blocks = extract_blocks(page)
    outcomes = list(run_page(blocks, tmp_path, tiny_ckpt, tiny_pth, tiny_captioner))
    assert [o.block for o in outcomes] == blocks  # every block was reached
    for o in outcomes:
        assert o.ran == (o.block.not_run is None), o.block
        for command, reason in o.skipped:
            assert reason, command


def test_the_docs_have_examples() -> None:
    """The extractor finds what is there (a harness that finds nothing passes vacuously)."""
    readme = extract_blocks(ROOT / "README.md")
    assert {b.language for b in readme if b.not_run is None} == {"python", "shell"}
    assert any("blipitm serve" in b.code for b in readme)
    assert any(b.language == "python" for p in PAGES[1:] for b in extract_blocks(p))


def test_extract_blocks_and_markers() -> None:
    page = ROOT / "x.md"
    text = "\n".join(
        [
            "```python",
            "print(1)",
            "```",
            "<!-- example: not run — needs the network -->",
            "",
            "```bash",
            "curl https://example.com",
            "```",
            "```",
            "blipitm score IMAGE TEXT",
            "```",
            "  ```sh",
            "  echo indented",
            "  ```",
        ]
    )
    blocks = extract_blocks(page, text)
    assert [(b.line, b.language, b.not_run) for b in blocks] == [
        (1, "python", None),
        (6, "shell", "needs the network"),
        (12, "shell", None),
    ]
    assert blocks[2].code == "echo indented\n"
    for bad in (
        "<!-- example: not run -->\n```sh\necho\n```",  # no reason
        "<!-- example: skip — why -->\n```sh\necho\n```",  # not the marker's form
        "<!-- example: not run — why -->\ntext\n```sh\necho\n```",  # not right before
        "<!-- example: not run — why -->\n```\nusage\n```",  # before a block that never runs
    ):
        with pytest.raises(ValueError, match="marker"):
            extract_blocks(page, bad)


def test_plan_shell() -> None:
    plan = plan_shell(
        "pip install torch==2.13.0 . && blipitm serve --model M  # comment\n"
        "curl -s localhost:8000/v1/score \\\n"
        '  -d \'{"a": "x && y"}\' -H "$(echo a && echo b)"\n'
        "KEY=1 python -m pip install openai\n"
        "blipitm index build photos/ --out p.index  # a && b\n"
    )
    assert plan.serve == "blipitm serve --model M"
    assert [c for c, _ in plan.skipped] == [
        "pip install torch==2.13.0 .",
        "KEY=1 python -m pip install openai",
    ]
    assert plan.script == [
        'curl -s localhost:8000/v1/score   -d \'{"a": "x && y"}\' -H "$(echo a && echo b)"',
        "blipitm index build photos/ --out p.index",
    ]
    assert serve_on("blipitm serve --model M --port 8001 --host 0.0.0.0", 5555) == (
        "blipitm serve --model M --port 5555 --host 127.0.0.1",
        8001,
    )
    served = serve_on("blipitm serve --model M", 5555)
    assert served == ("blipitm serve --port 5555 --model M", 8000)


CLIENTS = (
    "openai",
    "cohere",
    "voyageai",
    "litellm",
    "langchain_openai",
    "llama_index.embeddings.openai",
)


def test_clients_page_runs_every_stock_client() -> None:
    """docs/clients.md (issue 18 item 9): a snippet per stock client, each run against the server
    (by ``test_examples_run``) with nothing marked not-run, reading the server's address from
    ``BLIPITM_BASE_URL``; the README links it."""
    page = ROOT / "docs" / "clients.md"
    blocks = extract_blocks(page)
    assert all(b.not_run is None for b in blocks)
    assert sum("blipitm serve" in b.code for b in blocks) == 1
    python = [b.code for b in blocks if b.language == "python"]
    for client in CLIENTS:
        using = [c for c in python if re.search(rf"^(from|import) {re.escape(client)}\b", c, re.M)]
        assert using, f"no snippet uses {client}"
        assert all('os.environ.get("BLIPITM_BASE_URL"' in c for c in using), client
    assert "check_embedding_ctx_length=False" in page.read_text()
    assert "model_name=" in page.read_text()
    assert "](docs/clients.md)" in (ROOT / "README.md").read_text()
