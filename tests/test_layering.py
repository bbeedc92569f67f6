"""The layers of docs/architecture.md: a layer imports only layers above it; torch stays in the
layers that compute; nothing in src/ imports transformers; the scoring protocol is decided in
scoring.py only; the import graph of src/blipitm has no cycle; the engine's parts depend one way;
only entry points set process-wide memory settings."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "blipitm"

# Top to bottom. A module may import from its own layer and from layers listed before it.
LAYERS = [
    "errors",
    "preemption",  # yield points: the model calls them, the batcher installs what they run
    "config",
    "scoring",
    "model",
    "processing",
    "explain",  # explanation records and their drawing (numpy, PIL); the engine computes them
    "checkpoint",
    "engine",
    "common",  # shared by the siblings below: top-k, atomic files, progress, model identity
    "keys",  # the API key store (SQLite), shared by the server and the CLI
    "retrieval",
    "evaluation",
    "filtering",
    "server",
    "cli",
]
# Extra rules on top of the order.
FORBIDDEN = {
    "server": {"model", "checkpoint"},
    "model": {"processing"},
    "processing": {"model"},
    # Siblings: what both need lives in common/, so neither depends on the other.
    "evaluation": {"retrieval"},
    "filtering": {"retrieval", "evaluation"},
}
# Layers that hand numpy arrays and records around; torch is the engine's business.
NO_TORCH = {"explain", "common", "keys", "retrieval", "evaluation", "filtering", "server", "cli"}
# Modules inside the engine that make up its public records, and its batcher and jobs.
NO_TORCH_MODULES = {
    "engine/types.py",
    "engine/options.py",
    "engine/batcher.py",
    "engine/jobs.py",
    "scoring.py",
    "config.py",
}
# HTTP and metrics belong to the server: the engine (its batcher included) is driven alike by the
# server, the CLI, a Batch API or a Ray actor, and reports through an observer, not Prometheus.
NO_HTTP = {"engine"}
HTTP_PACKAGES = {"fastapi", "starlette", "uvicorn", "httpx", "pydantic", "prometheus_client"}
# Leaf packages usable from anywhere below their position, with their own rule.
TESTING = "testing"  # random checkpoints: may use config/checkpoint; only tests/bench/cli import it


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "blipitm":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_layers_import_only_upwards() -> None:
    violations = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem
        if own in ("__init__", "__main__", TESTING):
            continue
        assert own in LAYERS, f"{rel}: package {own!r} is not in docs/architecture.md's layer list"
        allowed = set(LAYERS[: LAYERS.index(own) + 1]) - FORBIDDEN.get(own, set())
        for mod in imports(path):
            target = layer_of(mod)
            if target is None or (target == "__init__" and own == "cli"):
                continue
            if target == TESTING or target not in allowed:
                violations.append(f"{rel} imports {mod}")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_src_never_imports_transformers() -> None:
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if any(m == "transformers" or m.startswith("transformers.") for m in imports(path))
    ]
    assert not offenders, f"transformers is a test-only reference, imported by {offenders}"


def test_torch_stays_inside_the_engine() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in NO_TORCH or rel.as_posix() in NO_TORCH_MODULES:
            torch = [m for m in imports(path) if m == "torch" or m.startswith("torch.")]
            offenders += [f"{rel} imports {m}" for m in torch]
    assert not offenders, "torch belongs to the engine and below:\n" + "\n".join(offenders)


def test_engine_imports_no_http_or_metrics() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in NO_HTTP:
            found = [m for m in imports(path) if m.split(".")[0] in HTTP_PACKAGES]
            offenders += [f"{rel} imports {m}" for m in found]
    assert not offenders, "HTTP and metrics are the server's:\n" + "\n".join(offenders)


# Packages whose import loads no torch: the engine comes in by a function's own import (or a
# lazy ``blipitm.engine`` name) when a model is loaded, never with the module.
TORCH_FREE_PACKAGES = (
    "blipitm.common",
    "blipitm.retrieval",
    "blipitm.evaluation",
    "blipitm.filtering",
    "blipitm.server",
    "blipitm.server.settings",
    "blipitm.server.app",  # the app loads the engine (torch) when it starts, not on import
    "blipitm.processing",
)


@pytest.mark.parametrize("package", TORCH_FREE_PACKAGES)
def test_importing_loads_no_torch(package: str) -> None:
    """What the AST check above cannot see: a ``from blipitm.engine import Engine`` at module
    level, or a torch import a layer further up, loads torch for everyone who imports this. Run
    in a fresh interpreter, since this one has imported torch long ago."""
    code = (
        "import sys\n"
        f"import {package}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
        "or m in ('blipitm.engine.engine', 'blipitm.engine.loader', 'blipitm.model'))\n"
        "print(' '.join(heavy))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    loaded = run.stdout.split()
    assert not loaded, f"import {package} loads {loaded[:5]}"


PROTOCOL_NAMES = {"blip", "transformers"}


def _names_compared(node: ast.Compare) -> set[str]:
    """String constants a comparison tests against (``x == "blip"``)."""
    operands = (node.left, *node.comparators)
    return {o.value for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)}


def test_only_scoring_decides_by_protocol_name() -> None:
    """Code asks the ScoringProtocol; nothing outside scoring.py compares a protocol's name or
    spells out the list of names."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "scoring.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Compare) and _names_compared(node) & PROTOCOL_NAMES:
                offenders.append(f"{rel}:{node.lineno} compares with a protocol name")
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if values >= PROTOCOL_NAMES:
                    offenders.append(f"{rel}:{node.lineno} lists the protocol names")
    assert not offenders, "decide through blipitm.scoring instead:\n" + "\n".join(offenders)


def test_cli_and_server_load_through_one_options_record() -> None:
    """The CLI and the server build a LoadOptions and call ``load_options``; calling ``load`` with
    their own keyword mapping would be a second copy of the load flags."""
    offenders = []
    for package in ("cli", "server"):
        for path in sorted((SRC / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module in ("blipitm", "blipitm.engine", "blipitm.engine.loader")
                    and any(alias.name == "load" for alias in node.names)
                ):
                    offenders.append(str(path.relative_to(SRC)))
    assert not offenders, f"load options through blipitm.engine.load_options: {offenders}"


def module_name(path: Path) -> str:
    parts = ("blipitm", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the blipitm modules it imports, lazy (function-level) imports included: a cycle
    through a lazy import still ties the two modules together."""
    modules = {module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module, f"{path}: use absolute imports"
                base = node.module
                # ``from pkg import mod``: the submodule; ``from mod import name``: the module
                subs = {f"{base}.{a.name}" for a in node.names} & modules.keys()
                edges |= subs or {base}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative DFS with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail: today's shape of the fixed app <-> openapi cycle.
    graph = {"app": {"openapi", "docs"}, "openapi": {"app"}, "docs": set()}
    assert find_cycle(graph) == ["app", "openapi", "app"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The engine's parts (docs/architecture.md): the image pipeline stands alone, so the captioner can
# reuse it; ITM and text build on it, never the other way; the facades (the ITM engine, the
# captioner) are imported by no part and not by each other; generation knows only the model.
FACADES = {"engine.engine", "engine.captioner"}
ENGINE_PARTS_NEVER_IMPORT = {
    "engine/images.py": {"engine.itm", "engine.texts", "engine.gradcam", "engine.generation"}
    | FACADES,
    "engine/generation.py": {"engine.images", "engine.itm", "engine.texts", "engine.gradcam"}
    | FACADES,
    "engine/captioner.py": {"engine.itm", "engine.texts", "engine.gradcam", "engine.engine"},
    "engine/engine.py": {"engine.captioner", "engine.generation"},
    "engine/texts.py": {"engine.images", "engine.itm", "engine.gradcam", "engine.engine"},
    "engine/itm.py": {"engine.gradcam", "engine.engine"},
    "engine/gradcam.py": {"engine.images", "engine.itm", "engine.texts", "engine.engine"},
    "engine/inputs.py": {"engine.images", "engine.itm", "engine.texts", "engine.engine"},
}


def test_engine_parts_depend_one_way() -> None:
    offenders = []
    for rel, banned in ENGINE_PARTS_NEVER_IMPORT.items():
        for mod in imports(SRC / rel):
            if mod.removeprefix("blipitm.") in banned:
                offenders.append(f"{rel} imports {mod}")
    assert not offenders, "the engine's parts import one way:\n" + "\n".join(offenders)


# Process-wide memory settings are made by entry points only, never by a library constructor.
MEMORY_POLICY_CALLERS = {
    "cli/common.py",
    "server/app.py",
    "filtering/runner.py",
    "filtering/ray_runner.py",  # a Ray actor is a process of its own
    "filtering/ray_scorer.py",
    "server/batch/ray_lines.py",  # batch run --ray's actors, likewise
}


def _calls(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(
        isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id == name)
            or (isinstance(node.func, ast.Attribute) and node.func.attr == name)
        )
        for node in ast.walk(tree)
    )


def test_only_entry_points_set_the_memory_policy() -> None:
    callers = {
        path.relative_to(SRC).as_posix()
        for path in SRC.rglob("*.py")
        if _calls(path, "apply_memory_policy")
    }
    setters = {
        path.relative_to(SRC).as_posix()
        for path in SRC.rglob("*.py")
        if _calls(path, "set_block_size")
    }
    assert callers == MEMORY_POLICY_CALLERS
    assert setters == {"common/memory.py"}


# The hosted-API gateway (keys, limits, credits, metering, /v1/usage) is one unit on top of the
# request path: app.py installs it in one line, the CLI wires `serve` (Redis check) and `keys`.
GATEWAY = "blipitm.server.gateway"
GATEWAY_IMPORTERS = {"server/app.py": 1, "cli/serve.py": None, "cli/keys.py": None}


def test_only_the_app_line_and_the_cli_import_the_gateway() -> None:
    violations = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("server/gateway/"):
            continue
        found = [m for m in imports(path) if m == GATEWAY or m.startswith(GATEWAY + ".")]
        if not found:
            continue
        allowed = GATEWAY_IMPORTERS.get(rel, 0)
        if allowed is not None and len(found) > allowed:
            violations.append(f"{rel} imports {', '.join(found)}")
    assert not violations, "only app.py's one line may install the gateway:\n" + "\n".join(
        violations
    )


def test_the_request_path_knows_accounts_not_keys() -> None:
    """Outside the gateway, the server asks an Account (server/account.py): no key records,
    limiters or charges."""
    violations = []
    for path in sorted((SRC / "server").rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("server/gateway/"):
            continue
        source = path.read_text()
        for name in ("KeyRecord", "Charge", "Limiter", "charge_of", "KeyService"):
            if re.search(rf"\b{name}\b", source):
                violations.append(f"{rel} names {name}")
    assert not violations, "\n".join(violations)


def test_the_server_hands_images_to_the_engine() -> None:
    """The server turns references into bytes; the engine decodes them (its settings, protocol,
    limits and one decode budget): no second budget or image pipeline in server/."""
    violations = []
    for path in sorted((SRC / "server").rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        source = path.read_text()
        for name in ("ImageSettings", "PixelBudget", "ScoringProtocol", "load_resized"):
            if re.search(rf"\b{name}\b", source):
                violations.append(f"{rel} names {name}")
    assert not violations, "\n".join(violations)


def test_every_module_imports() -> None:
    """mypy runs with ignore_missing_imports (for untyped third-party packages), which also hides
    an import of a blipitm module that no longer exists; importing every module catches it."""
    import importlib
    import pkgutil

    import blipitm

    broken = []
    for info in pkgutil.walk_packages(blipitm.__path__, "blipitm."):
        if info.name == "blipitm.__main__":  # runs the CLI
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as e:
            broken.append(f"{info.name}: {e}")
    assert not broken, "modules that fail to import:\n" + "\n".join(broken)
