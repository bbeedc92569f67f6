"""``blipitm serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

Every flag comes from :data:`blipitm.server.settings.OPTIONS` and has a ``BLIPITM_*`` environment
variable; a flag given on the command line wins over the environment.

Start-up failures (port taken, index or model that cannot be loaded) print one line,
``blipitm: error: <what is wrong and what to do>``, and exit 2; exit 1 is left for the unexpected.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
from typing import TYPE_CHECKING, Any

from blipitm.cli.common import add_option
from blipitm.errors import BlipitmError
from blipitm.server.settings import OPTIONS, ServerSettings, from_env, value_of

if TYPE_CHECKING:
    from blipitm.server.transport import EarlyStop


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=(
            "Serve BLIP ITM over HTTP: /v1/embeddings (OpenAI), /v1/score (vLLM), /v1/rerank and "
            "/v2/rerank (Cohere/Jina), /v1/models, /v1/search (with --index), /health, /ready, "
            "/metrics. Each option can "
            "also be set by the environment variable shown; a flag wins over the environment."
        ),
        epilog="example: blipitm serve --model Salesforce/blip-itm-base-flickr --port 8000",
    )
    defaults = ServerSettings()
    for opt in OPTIONS:
        # None: not given, so the environment or the default applies. Flags and lists state no
        # default; a None default is explained in the help text itself, if at all.
        shown = value_of(defaults, opt) if opt.kind == "value" else None
        if opt.name == "model":  # repeatable: the first is the default, the others served too
            opt = dataclasses.replace(
                opt,
                kind="list",
                help=opt.help + "; repeat it to serve several (the first is "
                "the default for requests that name none)",
            )
        add_option(p, opt, default=None, shown=shown, note=f" [env {opt.env}]")
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name) is not None}
    for name in ("api_keys", "url_allowlist"):
        if name in given:
            given[name] = tuple(given[name])
    if "model" in given:  # --model repeated: the first is the default model
        given["model"], *more = given["model"]
        given["more_models"] = tuple(more)
    return from_env(**given)


def run(args: argparse.Namespace) -> int:
    from blipitm.retrieval import Index  # torch, uvicorn: not for `--help`
    from blipitm.server.transport import EarlyStop, bind, check_uvicorn

    check_uvicorn()  # the connection layer extends uvicorn internals: a tested release only
    settings = settings_from_args(args)
    level = getattr(logging, settings.log_level.upper())
    logging.getLogger("blipitm").setLevel(level)
    log = logging.getLogger("blipitm.server")

    # Start-up order: nothing slow happens before the cheap checks that can fail. SIGTERM is
    # caught before the port exists, so a stop during start-up drains instead of killing.
    early_stop = EarlyStop()
    early_stop.install()
    listener = bind(settings.host, settings.port)
    try:
        _check_keys(settings)
        for spec in settings.models():  # a bad models file or name fails here, before any model
            if spec.index is not None:  # so does a missing or damaged index
                Index.open(spec.index).close()
        return _serve(settings, listener, early_stop, log)
    finally:
        listener.close()


def _check_keys(settings: ServerSettings) -> None:
    """The key store must exist (a mistyped --keys-db is not a new, empty store: `blipitm keys
    create` makes it) and --redis must answer, before anything slow; each failure is one line."""
    if settings.keys_db is None:
        return
    from blipitm.keys import KeyStore

    KeyStore(settings.keys_db, create=False)
    if settings.redis_url is not None:
        from blipitm.server.gateway.redis_limits import check_reachable

        check_reachable(settings.redis_url)


def _serve(
    settings: ServerSettings, listener: socket.socket, early_stop: EarlyStop, log: logging.Logger
) -> int:
    import uvicorn

    from blipitm.server.app import create_app
    from blipitm.server.transport import DrainingServer, Gate, protocol_class

    log.info("starting blipitm serve: %s", settings)  # the dataclass repr omits the API keys
    open_to_all = not settings.api_keys and settings.keys_db is None
    if settings.host not in ("127.0.0.1", "localhost", "::1") and open_to_all:
        log.warning(
            "listening on %s without API keys: anyone who can reach the port can use the model",
            settings.host,
        )

    failed: list[BaseException] = []
    server: DrainingServer | None = None

    def on_load_failure(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    gate = Gate(
        head_timeout_s=settings.head_timeout_s,
        max_connections=settings.max_connections,
        body_timeout_s=settings.body_timeout_s,
        keys_enabled=not open_to_all,
    )
    config = uvicorn.Config(
        app,
        http=protocol_class(gate),
        loop="auto",  # uvloop where installed (a dependency off Windows): BENCHMARKS.md
        ws="none",  # no WebSocket routes: an upgrade request is an ordinary (404) request
        log_level=settings.log_level,
        lifespan="on",
    )
    server = DrainingServer(
        config,
        listener=listener,
        gate=gate,
        drain_timeout_s=settings.drain_timeout_s,
        early_stop=early_stop,
    )
    server.serve_forever()
    if failed:
        error = failed[0]
        if isinstance(error, BlipitmError):
            raise error  # main prints `blipitm: error: <message>` (the real cause: model or index)
        log.error("start-up failed", exc_info=error)  # not ours to word: a bug, keep the trace
        print(f"blipitm: error: start-up failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0
