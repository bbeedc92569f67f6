"""Server settings: one dataclass, filled from CLI flags and ``BLIPITM_*`` environment variables.

Each setting is declared once in :data:`OPTIONS` (flag, environment variable, type, help); the CLI
builds its parser from that table, :func:`from_env` reads the environment with it, and
``docs/server.md`` documents it. Precedence: command-line flag, then environment, then default.
The options that load the model are :mod:`blipitm.engine.options`' own declarations, reused here,
and their values are one field, ``load``: the engine's own record, starting from
:data:`~blipitm.engine.options.SERVER_PRESET` (the server's defaults), validated when built.
:meth:`ServerSettings.of` and :meth:`ServerSettings.replace` take every setting by its option
name (``model``, ``max_image_pixels``, ``port``), so callers need not know which record holds it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blipitm.engine.batcher import DEFAULT_BACKGROUND_BATCH
from blipitm.engine.options import (
    LIMIT_OPTIONS,
    LOAD_OPTIONS,
    MODEL_OPTIONS,
    SERVER_PRESET,
    LoadOptions,
    Option,
    optional_str,
    options_from,
)
from blipitm.errors import InvalidInputError
from blipitm.server.family import ModelSpec, Price, check_names, read_models_file

# Lower bounds of the numeric settings: (names, bound, strict); strict means "> bound".
_BOUNDS: tuple[tuple[tuple[str, ...], int, bool], ...] = (
    (
        (
            *("max_batch_size", "max_queue", "max_items", "decode_threads", "port"),
            *("max_body_bytes", "max_image_bytes", "max_connections"),
            "max_images",
            *("batch_max_file_bytes", "batch_max_file_lines", "batch_max_active", "batch_window"),
            "batch_worker_lines",
        ),
        1,
        False,
    ),
    (("max_wait_ms", "url_max_redirects"), 0, False),
    (
        (
            *("request_timeout_s", "url_timeout_s", "head_timeout_s", "body_timeout_s"),
            "drain_timeout_s",
        ),
        0,
        True,
    ),
    (("image_credits", "metrics_key_labels", "max_loaded_models"), 0, False),
    (("rate_window_s",), 0, True),
    (("batch_credit_factor",), 0, False),
)


@dataclass(frozen=True)
class ServerSettings:
    # -- model and the engine's limits (the flags of LOAD_OPTIONS: --model ... --max-text-chars) --
    load: LoadOptions = SERVER_PRESET
    served_model_name: str | None = None  # None: the --model string
    index: str | None = None  # retrieval index for POST /v1/search
    more_models: tuple[str, ...] = ()  # --model repeated: served too, with the same options
    models_file: str | None = None  # TOML: every model served, each with its settings (family.py)
    max_loaded_models: int = 0  # 0: no limit; else the least recently used idle one is evicted
    load_on_demand: bool = False  # models other than the default load on their first request
    # -- network --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never printed
    protect_metrics: bool = False
    # -- per-key API keys (see server/gateway/, docs/keys.md) -------------------------------------
    keys_db: str | None = None
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    image_credits: int = 1
    rate_window_s: float = 60.0
    metrics_key_labels: int = 100
    # -- OpenAI's Batch API (see server/batch/) ---------------------------------------------------
    batch_dir: str | None = None  # None: the Batch API is off
    batch_max_file_bytes: int = 200 * 1024 * 1024
    batch_max_file_lines: int = 50_000
    batch_credit_factor: float = 0.5
    batch_max_active: int = 4
    batch_window: int = 64
    batch_worker_lines: int = DEFAULT_BACKGROUND_BATCH
    # -- connections (see server/transport/) -------------------------------------------------------
    head_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 512
    drain_timeout_s: float = 25.0
    # -- batching and backpressure --------------------------------------------------------------
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout_s: float = 60.0
    decode_threads: int = 4
    # -- limits ---------------------------------------------------------------------------------
    max_body_bytes: int = 32 * 1024 * 1024
    max_items: int = 2048  # OpenAI's own limit on inputs; above LangChain's chunk_size (1000)
    max_images: int = 256
    max_image_bytes: int = 16 * 1024 * 1024
    # -- image URLs -----------------------------------------------------------------------------
    allow_url_fetch: bool = False
    url_allowlist: tuple[str, ...] = ()
    url_timeout_s: float = 10.0
    url_max_redirects: int = 3
    # -- logging and disclosure -----------------------------------------------------------------
    log_level: str = "info"
    expose_paths: bool = False
    # Test-only: lets URL fetching reach 127.0.0.0/8 and ::1 so tests can serve images from a local
    # HTTP server. Deliberately not an Option: no flag or environment variable can set it.
    _allow_loopback_for_tests: bool = False

    def __post_init__(self) -> None:
        for names, low, strict in _BOUNDS:
            for name in names:
                value = getattr(self, name)
                if value < low or (strict and value == low):
                    op = ">" if strict else ">="
                    raise InvalidInputError(f"must be {op} {low}, got {value}", loc=(name,))
        if any(not k for k in self.api_keys):
            raise InvalidInputError("an API key must not be empty", loc=("api_keys",))
        if self.redis_url is not None and self.keys_db is None:
            raise InvalidInputError(
                "--redis shares per-key limits; it needs --keys-db with the keys", loc=("redis",)
            )

    @classmethod
    def of(cls, **values: Any) -> ServerSettings:
        """The defaults with ``values``, each by its option name (``model``, ``port``); the load
        options among them go into ``load`` (a given ``load`` is their base)."""
        return cls().replace(**values)

    def replace(self, **changes: Any) -> ServerSettings:
        """A copy with ``changes`` by option name, as :meth:`of` takes them; a bad value names
        its option (``max_image_pixels``, not the record's ``max_pixels``)."""
        load = changes.pop("load", self.load)
        given = {name: changes.pop(name) for name in list(changes) if name in _LOAD_NAMES}
        return dataclasses.replace(self, load=options_from(given, base=load), **changes)

    @property
    def model(self) -> str:
        """The ``--model`` string: what clients may pass as ``model`` besides the served name."""
        return str(self.load.source)

    @property
    def model_name(self) -> str:
        """The name clients pass as ``model`` and see in ``/v1/models``.

        Without ``--served-model-name`` it is the ``--model`` string, except that an absolute
        path is shortened to its last part unless ``expose_paths``: responses never show where
        files live on the server.
        """
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.expose_paths else public_path(self.model)

    def models(self) -> list[ModelSpec]:
        """The models to serve, the default first: the ``--model`` ones, or with
        ``--models-file`` the file's (see :mod:`blipitm.server.family`). Reads the file."""
        price = Price(1, self.image_credits)
        if self.models_file is not None:
            specs = read_models_file(self.models_file, self.load, self.image_credits)
            if self.load_on_demand:  # the flag's rule for entries that do not say
                specs = [specs[0], *(dataclasses.replace(m, preload=False) for m in specs[1:])]
        else:
            first = ModelSpec(
                self.model_name, self.load, aliases=(self.model,), index=self.index, price=price
            )
            specs = [first]
            for source in self.more_models:
                name = source if self.expose_paths else public_path(source)
                load = self.load.replace(source=source)
                spec = ModelSpec(
                    name, load, aliases=(source,), preload=not self.load_on_demand, price=price
                )
                specs.append(spec)
        check_names(specs)
        return specs


_LOAD_NAMES = frozenset(opt.name for opt in LOAD_OPTIONS)


def value_of(settings: ServerSettings, opt: Option) -> Any:
    """The value of ``opt`` in ``settings``: a load option's is in ``settings.load``."""
    return getattr(settings.load, opt.field) if opt.field else getattr(settings, opt.name)


def public_path(path: str) -> str:
    """``path`` as a response may show it: an absolute path becomes its last part."""
    return os.path.basename(path.rstrip("/\\")) if os.path.isabs(path) else path


# -- the option table -----------------------------------------------------------------------------


def _parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _parse_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


_LIMIT = {opt.name: opt for opt in LIMIT_OPTIONS}

OPTIONS: tuple[Option, ...] = (
    *MODEL_OPTIONS,
    Option(
        "served_model_name",
        "name clients pass as `model` and see in /v1/models (default: the --model string)",
        optional_str,
    ),
    Option(
        "index",
        "retrieval index folder served by POST /v1/search (see `blipitm index build`)",
        optional_str,
    ),
    Option(
        "models_file",
        "TOML file naming every model to serve, each with its own options, names, index and "
        "price (docs/server.md, 'Several models'); then --model and --index are not used",
        optional_str,
        metavar="PATH",
    ),
    Option(
        "max_loaded_models",
        "most models loaded at once (0: all); to load another, the least recently used idle "
        "one is unloaded (and loaded again when asked for)",
        int,
    ),
    Option(
        "load_on_demand",
        "load the models other than the default on their first request, not at start-up",
        _parse_bool,
        kind="flag",
    ),
    Option("host", "interface to bind; 0.0.0.0 exposes the server to the network"),
    Option("port", "TCP port", int),
    Option(
        "api_keys",
        "accepted API key (repeat the flag for several; env: comma-separated); with keys set, "
        "/v1 and /v2 need `Authorization: Bearer KEY`",
        _parse_list,
        kind="list",
        flag_name="--api-key",
        metavar="KEY",
    ),
    Option("protect_metrics", "require the API key for /metrics too", _parse_bool, kind="flag"),
    Option(
        "keys_db",
        "SQLite key store of per-key API keys with limits, credits and usage (see "
        "`blipitm keys`); /v1 and /v2 then need one of its keys (or an --api-key)",
        optional_str,
        metavar="PATH",
    ),
    Option(
        "redis_url",
        "Redis URL (redis://host:6379/0) holding the per-key rate, concurrency and credit "
        "counters, so several replicas enforce one key's limits together",
        optional_str,
        flag_name="--redis",
        metavar="URL",
    ),
    Option("image_credits", "credits one image costs (a text costs 1)", int),
    Option(
        "rate_window_s", "window of the per-minute key limits (seconds; tests shorten it)", float
    ),
    Option(
        "metrics_key_labels",
        "key names with their own label in /metrics; later ones count as `other`",
        int,
    ),
    Option(
        "batch_dir",
        "turn on OpenAI's Batch API (/v1/files, /v1/batches), keeping its files and batches in "
        "this folder; unfinished batches resume when the server restarts",
        optional_str,
        metavar="DIR",
    ),
    Option("batch_max_file_bytes", "largest batch input file (bytes); larger: 413", int),
    Option("batch_max_file_lines", "most lines in a batch input file; more: 413", int),
    Option(
        "batch_credit_factor",
        "share of the online price a batch line costs a metered key (rounded up per line)",
        float,
    ),
    Option("batch_max_active", "most unfinished batches per key (or per operator)", int),
    Option(
        "batch_window",
        "batch lines in flight at once (queued behind online requests, merged into engine batches)",
        int,
    ),
    Option(
        "batch_worker_lines",
        "most batch lines in one worker batch (it yields to online requests between two layers: "
        "larger runs batches faster, smaller gives online requests a shorter layer to wait for)",
        int,
    ),
    Option(
        "head_timeout_s",
        "seconds a connection has to send a complete request head (after opening, or after its "
        "previous response); then 408 and close",
        float,
    ),
    Option(
        "body_timeout_s",
        "seconds a request body has to arrive in full once its head has; then 408 and close",
        float,
    ),
    Option(
        "max_connections",
        "most open connections; beyond it a new one gets 503 at once (with API keys on, the "
        "oldest connection that has not yet sent a valid key is closed for it instead)",
        int,
    ),
    Option(
        "drain_timeout_s",
        "on SIGTERM, seconds to finish accepted requests (new ones get 503) before exiting",
        float,
    ),
    Option("max_batch_size", "most requests merged into one worker batch", int),
    Option("max_wait_ms", "how long the worker waits to fill a batch (milliseconds)", float),
    Option("max_queue", "queued requests before new ones get 429", int),
    Option("request_timeout_s", "deadline per request (seconds); past it: 504", float),
    Option("decode_threads", "threads that decode images and fetch URLs", int),
    _LIMIT["cache_bytes"],
    Option("max_body_bytes", "largest request body (bytes); larger: 413", int),
    Option("max_items", "most inputs / documents / pairs per request; more: 413", int),
    Option(
        "max_images",
        "most images per request (each waits resized, 442 kB at 384 px, and costs an image-encoder "
        "pass), and captions per /v1/explain request; more: 413",
        int,
    ),
    _LIMIT["max_image_pixels"],
    _LIMIT["max_decoded_pixels"],
    Option("max_image_bytes", "largest encoded image, base64-decoded or fetched (bytes)", int),
    _LIMIT["max_text_chars"],
    Option("allow_url_fetch", "accept http(s) image URLs (off by default)", _parse_bool, "flag"),
    Option(
        "url_allowlist",
        "only fetch from these hosts (repeatable; env: comma-separated); default: any public host",
        _parse_list,
        kind="list",
        metavar="HOST",
    ),
    Option("url_timeout_s", "connect / read timeout of one image fetch (seconds)", float),
    Option("url_max_redirects", "redirects followed per image URL, each re-checked", int),
    Option(
        "log_level",
        "uvicorn / blipitm log level",
        choices=("critical", "error", "warning", "info", "debug"),
    ),
    Option(
        "expose_paths",
        "show absolute server paths (the model's source, load errors) in responses",
        _parse_bool,
        kind="flag",
    ),
)


def option(name: str) -> Option:
    for opt in OPTIONS:
        if opt.name == name:
            return opt
    raise KeyError(name)


def env_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings given by ``BLIPITM_*`` variables, parsed; a bad value names its variable."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = environ.get(opt.env)
        if raw is None:
            continue
        try:
            value = opt.parse(raw)
        except ValueError as e:
            raise InvalidInputError(f"cannot parse {raw!r}: {e}", loc=(opt.env,)) from None
        if opt.choices is not None and value not in opt.choices:
            raise InvalidInputError(f"must be one of {opt.choices}, got {raw!r}", loc=(opt.env,))
        out[opt.name] = value
    return out


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
    """Defaults, then the environment, then ``overrides`` (e.g. parsed CLI flags)."""
    return ServerSettings.of(**{**env_values(environ), **overrides})


def markdown_table() -> str:
    """The flag / environment table of ``docs/server.md``."""
    defaults = ServerSettings()
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        default = value_of(defaults, opt)
        if isinstance(default, tuple):
            shown = "none" if not default else ",".join(default)
        elif isinstance(default, bool):
            shown = "off" if not default else "on"
        else:
            shown = "—" if default is None else str(default)
        flag = opt.flag + (f" {opt.metavar}" if opt.metavar else "")
        help_text = opt.help + (f" ({'/'.join(opt.choices)})" if opt.choices else "")
        rows.append(f"| `{flag}` | `{opt.env}` | `{shown}` | {help_text} |")
    return "\n".join(rows)
