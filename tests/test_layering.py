"""DESIGN.md §3: a layer imports only layers above it; torch stays in the layers that compute;
nothing in src/ imports transformers; the scoring protocol is decided in scoring.py only."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "blipitm"

# Top to bottom. A module may import from its own layer and from layers listed before it.
LAYERS = [
    "errors",
    "config",
    "scoring",
    "model",
    "processing",
    "checkpoint",
    "engine",
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
}
# Layers that hand numpy arrays and records around; torch is the engine's business.
NO_TORCH = {"retrieval", "evaluation", "filtering", "server", "cli"}
# Modules inside the engine that make up its public records.
NO_TORCH_MODULES = {"engine/types.py", "scoring.py", "config.py"}
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
        assert own in LAYERS, f"{rel}: package {own!r} is not in DESIGN.md's layer list"
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
    their own keyword mapping is the second copy of the load flags that issue 9 removed."""
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
