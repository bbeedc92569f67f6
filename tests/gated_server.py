"""A real blipitm server process (uvicorn on 127.0.0.1) whose engine waits at gates, so that the
live tests can hold the inference worker and see 429, 504 and disconnects over real sockets.

    python tests/gated_server.py CKPT PORT GATE_DIR '{"max_queue": 1, ...}'

The last argument holds ServerSettings fields as JSON. Loading the model waits for the file
``GATE_DIR/load``. ``encode_texts`` (and ``explain_batch``) of a text ``hold-NAME`` creates
``GATE_DIR/entered-NAME`` and waits for ``GATE_DIR/release-NAME``. Every text the engine embeds
is printed as ``embedded: TEXT`` (explains: ``explained: TEXT``), so a test can tell from the
output which work the worker really did.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn

import blipitm
from blipitm.engine import Engine
from blipitm.server.app import create_app
from blipitm.server.settings import ServerSettings

GATE_TIMEOUT_S = 120.0  # a stuck test must not leave the process waiting forever


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)


class GatedEngine:
    """The real engine, delegated to, except that ``encode_texts`` honours the gates."""

    def __init__(self, real: Engine, gates: Path) -> None:
        self.real = real
        self.gates = gates

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def _gate(self, texts: list[str]) -> None:
        for text in texts:
            if text.startswith("hold-"):
                name = text.removeprefix("hold-")
                (self.gates / f"entered-{name}").touch()
                wait_for(self.gates / f"release-{name}")

    def encode_texts(self, texts: list[str]) -> Any:
        self._gate(texts)
        for text in texts:
            print(f"embedded: {text}", flush=True)
        return self.real.encode_texts(texts)

    def explain_batch(self, image: Any, texts: list[str], **kwargs: Any) -> Any:
        self._gate(texts)
        for text in texts:
            print(f"explained: {text}", flush=True)
        return self.real.explain_batch(image, texts, **kwargs)


def main(argv: list[str]) -> int:
    ckpt, port, gates, overrides = argv
    settings = ServerSettings.of(**json.loads(overrides))

    def factory(_: ServerSettings) -> Any:
        wait_for(Path(gates) / "load")
        return GatedEngine(blipitm.load(ckpt), Path(gates))

    app = create_app(settings, factory)
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
