"""The output folder's ``manifest.json``: what a run's results were made from (the inputs, the
columns read, the model's identity and what pins its scores). A run that resumes a folder is
checked against it, so that one folder never mixes two runs' scores.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipitm.common.files import atomic_write_json
from blipitm.common.identity import weights_digest
from blipitm.common.safeio import loads_json, read_regular_file
from blipitm.filtering.inputs import Shard
from blipitm.filtering.readers import Columns
from blipitm.filtering.shards import FilterError

if TYPE_CHECKING:
    from blipitm.engine import Engine

MANIFEST_VERSION = 1
log = logging.getLogger("blipitm.filter")


def open_out(
    out: Path,
    shards: list[Shard],
    columns: Columns,
    engine: Engine,
    restart: bool,
    capfilt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's manifest: the one ``out`` holds (checked against this run), else a new one.
    ``capfilt``: a CapFilt run's captioner and settings (``Captioning.record``), which a resumed
    run must repeat. Called under the output lock, so the temporary files found here are litter
    of killed runs."""
    from blipitm.common.identity import mismatch, model_record

    manifest_path = out / "manifest.json"
    if restart and out.exists():
        for sub in ("scores", "kept"):
            shutil.rmtree(out / sub, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    _remove_temporaries(out)
    pin = _scoring_pin(engine)
    if manifest_path.exists():
        old = _read_manifest(manifest_path)
        why = (
            _inputs_differ(old, shards, columns)
            or mismatch(old["model"], engine)
            or _pin_differs(old.get("scoring"), pin)
            or _capfilt_differs(old.get("capfilt"), capfilt)
        )
        if why is not None:
            raise FilterError(
                f"{out} holds another run's results: {why}. Use another --out, or --restart "
                "to discard them and start over"
            )
        return old
    (out / "scores").mkdir(parents=True, exist_ok=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "inputs": [{"name": s.name, "kind": s.kind, **s.fingerprint()} for s in shards],
        "columns": asdict(columns),
        "model": model_record(engine),
        "scoring": pin,
        **({"capfilt": capfilt} if capfilt is not None else {}),
    }
    atomic_write_json(manifest_path, manifest)
    return manifest


def _remove_temporaries(out: Path) -> None:
    """Partial score files and atomic writes' temporaries that a killed run left behind."""
    for folder in (out, out / "scores", out / "kept"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".partial" in p.name):
                log.info("removing %s, left by an interrupted run", p)
                p.unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, or a :class:`FilterError` saying it is damaged and what to do."""
    try:
        old = loads_json(read_regular_file(path, max_bytes=64 << 20, what="manifest"))
        if not (
            isinstance(old, dict)
            and isinstance(old.get("inputs"), list)
            and all(isinstance(i, dict) for i in old["inputs"])
            and isinstance(old.get("columns"), dict)
            and isinstance(old.get("model"), dict)
        ):
            raise ValueError("not a filter manifest")
        return old
    except (OSError, ValueError) as e:
        raise FilterError(
            f"{path} is damaged ({e}): remove {path.parent}, or run again with --restart to "
            "discard its results and start over"
        ) from None


def _scoring_pin(engine: Engine) -> dict[str, Any]:
    """What changes the scores beyond the probe's tolerance (same weights in bf16 pass it):
    the weight and compute dtypes, the protocol, the hub commit and the weight files' digest."""
    info = engine.info
    return {
        "dtype": info.dtype,
        "compute_dtype": info.compute_dtype,
        "protocol": info.protocol,
        "commit": info.commit,
        "weights_sha256": weights_digest(info.source),
    }


def _pin_differs(old: Any, now: dict[str, Any]) -> str | None:
    if not isinstance(old, dict):
        return None  # a manifest written before the pin: the probe check alone
    if (old.get("dtype"), old.get("compute_dtype")) != (now["dtype"], now["compute_dtype"]):
        return (
            f"it was scored with dtype {old.get('dtype')} (compute {old.get('compute_dtype')}), "
            f"now {now['dtype']} (compute {now['compute_dtype']})"
        )
    for key in ("protocol", "commit"):
        if old.get(key) != now[key]:
            return f"it was scored with {key} {old.get(key)}, now {now[key]}"
    if old.get("weights_sha256") != now["weights_sha256"]:
        return (
            f"its model weights' files changed since (sha256 {str(old.get('weights_sha256'))[:12]}"
            f", now {str(now['weights_sha256'])[:12]})"
        )
    return None


def _capfilt_differs(old: Any, now: dict[str, Any] | None) -> str | None:
    if old == now:
        return None
    if now is None:
        return "it was a CapFilt run (--capfilt), this one is not"
    if old is None:
        return "it was not a CapFilt run, this one is (--capfilt)"
    if old.get("captioner") != now["captioner"]:
        return f"it was captioned by {old.get('captioner')}, now by {now['captioner']}"
    changed = sorted(k for k in now if k != "captioner" and old.get(k) != now[k])
    return "its CapFilt settings differ: " + ", ".join(
        f"{k} {old.get(k)} (now {now[k]})" for k in changed
    )


def _inputs_differ(old: dict[str, Any], shards: list[Shard], columns: Columns) -> str | None:
    if old.get("columns") != asdict(columns):
        return f"it was read with columns {old.get('columns')}, now {asdict(columns)}"
    now = [{"name": s.name, "kind": s.kind, **s.fingerprint()} for s in shards]
    before = old.get("inputs", [])
    if len(now) != len(before):
        return f"it has {len(before)} input shards, now {len(now)}"
    for a, b in zip(before, now, strict=True):
        if a != b:
            return f"input {b['path']} changed since (was {a.get('path')}, {a.get('size')} bytes)"
    return None
