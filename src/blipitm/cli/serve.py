"""``blipitm serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

Every flag comes from :data:`blipitm.server.settings.OPTIONS` and has a ``BLIPITM_*`` environment
variable; a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from blipitm.server.settings import OPTIONS, ServerSettings, from_env


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over HTTP (OpenAI / vLLM / Cohere compatible)",
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
        env_note = f" [env {opt.env}]"
        if opt.kind == "flag":
            p.add_argument(
                opt.flag,
                dest=opt.name,
                action="store_true",
                default=None,
                help=opt.help + env_note,
            )
        elif opt.kind == "list":
            p.add_argument(
                opt.flag,
                dest=opt.name,
                action="append",
                default=None,
                metavar="KEY" if opt.name == "api_keys" else "HOST",
                help=opt.help + env_note,
            )
        else:
            default = getattr(defaults, opt.name)
            p.add_argument(
                opt.flag,
                dest=opt.name,
                type=opt.parse,
                choices=opt.choices,
                default=None,
                help=f"{opt.help} (default: {default}){env_note}",
            )
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name) is not None}
    for name in ("api_keys", "url_allowlist"):
        if name in given:
            given[name] = tuple(given[name])
    return from_env(**given)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from blipitm.server.app import create_app

    settings = settings_from_args(args)
    level = getattr(logging, settings.log_level.upper())
    logging.getLogger("blipitm").setLevel(level)
    log = logging.getLogger("blipitm.server")
    log.info("starting blipitm serve: %s", settings)  # the dataclass repr omits the API keys
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        log.warning(
            "listening on %s without API keys: anyone who can reach the port can use the model",
            settings.host,
        )

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    if failed:
        print(f"blipitm: error: cannot load the model: {failed[0]}")
        return 1
    return 0
