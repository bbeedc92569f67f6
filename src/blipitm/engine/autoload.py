"""``load_any``: whatever model a checkpoint holds, loaded (what the server's family loads)."""

from __future__ import annotations

from blipitm.engine.captioner import Captioner, load_captioner_options
from blipitm.engine.engine import Engine
from blipitm.engine.loader import load_options, resolve_options
from blipitm.engine.options import LoadOptions


def load_any(options: LoadOptions) -> Engine | Captioner:
    """An :class:`Engine` for an image-text matching checkpoint, a :class:`Captioner` for a
    captioning one (read from the checkpoint once: its ``config.json`` architecture, or a
    ``.pth``'s tensor names), so that one ``--model`` list serves both kinds."""
    resolved = resolve_options(options)
    if resolved.task == "caption":
        return load_captioner_options(options, resolved)
    return load_options(options, resolved)
