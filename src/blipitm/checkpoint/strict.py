"""Strict loading: a checkpoint either matches the model exactly or fails with one full report.

A partial load (missing tensors left at their init values, unexpected ones ignored) gives a model
that runs and scores garbage, so every difference is an error, and all of them are listed at once
so that one run tells the user everything that is wrong.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from blipitm.checkpoint.keys import Shape, expected_shapes
from blipitm.config import BlipConfig
from blipitm.errors import CheckpointError

MAX_LISTED = 20  # per kind of problem; the counts are always complete


def _section(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    out = [f"{title} ({len(lines)}):"] + [f"  {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        out.append(f"  ... and {len(lines) - MAX_LISTED} more")
    return out


def _corrupted(name: str, tensor: torch.Tensor) -> str | None:
    if not tensor.is_floating_point():
        return f"{name}: dtype {tensor.dtype} is not floating point"
    # A finite sum proves every value finite (NaN and Inf propagate). Summing 1M-value chunks
    # keeps temporaries small: elementwise masks add ~200 MB to a base-size load's peak memory.
    chunks = tensor.detach().reshape(-1).split(1 << 20)
    if all(torch.isfinite(c.sum(dtype=torch.float32)) for c in chunks):
        return None
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        return f"{name}: {bad} of {tensor.numel()} values are NaN or Inf"
    return None


def check_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, Shape],
    *,
    what: str,
    floating: Collection[str] | None = None,
) -> None:
    """Compare ``state_dict`` with ``expected`` (name → shape); raise one error listing everything.

    Reports missing, unexpected and mis-shaped tensors, and "corrupted weights": tensors named in
    ``floating`` (default: all expected) that are not floating point or hold NaN/Inf. ``what``
    names the target in the message.
    """
    must_float = expected.keys() if floating is None else floating
    missing = [f"{k}: expected {tuple(s)}" for k, s in expected.items() if k not in state_dict]
    unexpected = [
        f"{k}: shape {tuple(v.shape)}" for k, v in state_dict.items() if k not in expected
    ]
    misshaped = [
        f"{k}: expected {tuple(expected[k])}, got {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    ]
    corrupted = [
        line
        for k, v in state_dict.items()
        if k in must_float and (line := _corrupted(k, v)) is not None
    ]
    if not (missing or unexpected or misshaped or corrupted):
        return
    counts = ", ".join(
        f"{len(items)} {label}"
        for items, label in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (misshaped, "mis-shaped"),
            (corrupted, "corrupted"),
        )
        if items
    )
    lines = [f"checkpoint does not match {what} ({counts}):"]
    lines += _section("missing tensors", missing)
    lines += _section("unexpected tensors", unexpected)
    lines += _section("mis-shaped tensors", misshaped)
    lines += _section("corrupted weights", corrupted)
    if missing or unexpected or misshaped:
        lines.append(
            "Check that config.json describes these weights (base vs large, vocabulary size) and "
            "that the file is the kind of BLIP model being loaded (image-text retrieval, or the "
            "captioner)."
        )
    if corrupted:
        lines.append("The weights file is damaged; download or convert it again.")
    raise CheckpointError("\n".join(lines))


def check_state_dict(state_dict: Mapping[str, torch.Tensor], config: BlipConfig) -> None:
    """Raise one :class:`CheckpointError` unless ``state_dict`` (HF names) fits ``config``."""
    v, t = config.vision, config.text
    what = (
        f"the model config (vision {v.hidden_size}x{v.num_hidden_layers}, "
        f"text {t.hidden_size}x{t.num_hidden_layers}, vocab {t.vocab_size})"
    )
    check_shapes(state_dict, expected_shapes(config), what=what)


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Check ``state_dict`` against ``module``'s own tensors, then load it strictly.

    A module built on the meta device gets the tensors assigned as they are, dtype included
    (there is no storage to copy into, and no second copy is made); otherwise they are cast to
    each target's dtype and copied in place.
    """
    target = module.state_dict()
    check_shapes(
        state_dict,
        {k: tuple(v.shape) for k, v in target.items()},
        what=f"the {type(module).__name__} module",
        # An integer buffer the module persists (if any) is data, not a weight to be checked.
        floating={k for k, v in target.items() if v.is_floating_point()},
    )
    on_meta = any(v.is_meta for v in target.values())
    if on_meta:
        module.load_state_dict(state_dict, strict=True, assign=True)
        return
    prepared = {k: v.to(dtype=target[k].dtype) for k, v in state_dict.items()}
    module.load_state_dict(prepared, strict=True)
