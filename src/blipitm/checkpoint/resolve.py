"""Turn a user's ``source`` (hub id, local directory, or ``.pth`` file) into concrete local files.

Nothing is read beyond what is needed to know the architecture: ``config.json`` for Hugging Face
checkpoints, the tensor shapes for original BLIP files. Hub access goes through ``huggingface_hub``
only, so its cache, revision pinning and ``HF_HUB_OFFLINE`` behave as users expect.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from blipitm.checkpoint import layout
from blipitm.checkpoint.io import (
    INDEX_SUFFIX,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_state_dict,
)
from blipitm.checkpoint.keys import config_from_original, is_captioner_state_dict
from blipitm.config import CAPTIONER_ARCHITECTURE, ITM_ARCHITECTURE, BlipConfig, Task
from blipitm.errors import CheckpointError, HubUnavailableError

DEFAULT_TOKENIZER = "bert-base-uncased"  # what BLIP's init_tokenizer() loads

# Files a model snapshot needs; everything else in a hub repo (other frameworks' weights, READMEs)
# is left on the hub.
MODEL_PATTERNS = [
    layout.CONFIG_NAME,
    "*.safetensors",
    layout.SAFETENSORS_INDEX_NAME,
    layout.BIN_NAME,
    "tokenizer*",
    layout.VOCAB_NAME,
    layout.SPECIAL_TOKENS_MAP_NAME,
    layout.PREPROCESSOR_CONFIG_NAME,
    layout.PROCESSOR_CONFIG_NAME,
]
TOKENIZER_PATTERNS = ["tokenizer*", layout.VOCAB_NAME, layout.SPECIAL_TOKENS_MAP_NAME]

_WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's HTTP client changed (requests → httpx → httpx2) across versions; catch
    # transport errors of whichever is installed without depending on any of them.
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


# The hub cannot be reached, or offline mode forbids it, and the cache does not have the files.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    LocalEntryNotFoundError,  # also IncompleteSnapshotError: a partial cached snapshot
    OfflineModeIsEnabled,
    *_network_errors(),
)


def task_of_config(config_dict: dict[str, Any]) -> Task:
    """The model a ``config.json`` describes, by its ``architectures`` (default: ITM)."""
    names = config_dict.get("architectures") or []
    return "caption" if CAPTIONER_ARCHITECTURE in names else "itm"


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a checkpoint's files are on this machine and what architecture they hold."""

    source: str  # as the user gave it
    kind: Literal["hf", "pth"]  # Hugging Face directory, or a bare weights file (config inferred)
    weights_path: Path
    config: BlipConfig  # as the checkpoint says; protocols may override it later
    tokenizer_dir: Path
    image_settings_dict: dict[str, Any]  # raw image-processor dict, for ImageSettings
    revision: str | None  # requested hub revision
    commit: str | None  # hub commit hash actually used
    config_dict: dict[str, Any]  # config.json as read (or as inferred, for .pth)
    task: Task = "itm"  # what the checkpoint holds: the ITM model or the captioner

    def require(self, task: Task) -> None:
        """Refuse, before any tensor is read, a checkpoint of the other model."""
        if task == self.task:
            return
        if task == "caption":
            raise CheckpointError(
                f"{self.source} holds an image-text matching model ({ITM_ARCHITECTURE}), not a "
                f"captioner ({CAPTIONER_ARCHITECTURE}); load it with blipitm.load, or caption with "
                "a captioning checkpoint such as 'Salesforce/blip-image-captioning-base'"
            )
        raise CheckpointError(
            f"{self.source} holds BLIP's captioner ({CAPTIONER_ARCHITECTURE}), not an image-text "
            f"matching model ({ITM_ARCHITECTURE}); caption with blipitm.load_captioner (`blipitm "
            "caption`), or score with a matching checkpoint such as "
            "'Salesforce/blip-itm-base-flickr'"
        )


def resolve(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> ResolvedCheckpoint:
    """Find the files of ``source``: a local HF directory, a ``.pth``/``.bin`` file, or a hub id.

    ``revision`` pins a hub branch, tag or commit. ``tokenizer`` (directory or hub id) is used
    only for bare weights files, which carry no tokenizer; by default a tokenizer beside the file
    is used, else ``bert-base-uncased``.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_hf_dir(path, source=text)
    if path.is_file():
        if path.suffix not in _WEIGHT_SUFFIXES and not path.name.endswith(INDEX_SUFFIX):
            raise CheckpointError(
                f"{path} is not a checkpoint: expected a directory, or a weights file ending in "
                f"{', '.join(_WEIGHT_SUFFIXES)}"
            )
        if (path.parent / layout.CONFIG_NAME).is_file():
            # A weights file inside an HF directory: that directory, with this file's weights.
            return _resolve_hf_dir(path.parent, source=text, weights=path)
        return _resolve_weights_file(path, source=text, tokenizer=tokenizer)
    if not _is_hub_id(text, need_owner=True):
        raise CheckpointError(
            f"{text!r}: no such file or directory, and not a hub id (expected 'owner/name', e.g. "
            "'Salesforce/blip-itm-base-flickr')"
        )
    snapshot = _download(text, revision=revision, patterns=MODEL_PATTERNS, what="model")
    commit = snapshot.name if _COMMIT.match(snapshot.name) else None
    return _resolve_hf_dir(snapshot, source=text, revision=revision, commit=commit)


# -- local Hugging Face directory -------------------------------------------------------------


def _valid_dir_help() -> str:
    return (
        f"A Hugging Face BLIP directory holds {layout.CONFIG_NAME}; weights as "
        f"{' or '.join(layout.WEIGHTS_NAMES)}; a tokenizer as "
        f"{' and/or '.join(layout.TOKENIZER_VOCAB_NAMES)}; image settings as "
        f"{layout.PREPROCESSOR_CONFIG_NAME} or {layout.PROCESSOR_CONFIG_NAME}. For an original "
        "BLIP .pth, pass the file itself."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return obj


def _image_settings(directory: Path) -> dict[str, Any] | None:
    pre = directory / layout.PREPROCESSOR_CONFIG_NAME
    if pre.is_file():
        return _read_json(pre)
    proc = directory / layout.PROCESSOR_CONFIG_NAME
    if proc.is_file():
        nested = _read_json(proc).get("image_processor")
        if isinstance(nested, dict):
            return nested
    return None


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in layout.TOKENIZER_VOCAB_NAMES)


def _resolve_hf_dir(
    directory: Path,
    *,
    source: str,
    weights: Path | None = None,
    revision: str | None = None,
    commit: str | None = None,
) -> ResolvedCheckpoint:
    config_path = directory / layout.CONFIG_NAME
    if weights is None:
        weights = next(
            (directory / n for n in layout.WEIGHTS_NAMES if (directory / n).is_file()), None
        )
    image_settings = _image_settings(directory)
    missing = []
    if not config_path.is_file():
        missing.append(layout.CONFIG_NAME)
    if weights is None:
        missing.append(" or ".join(layout.WEIGHTS_NAMES))
    if not _has_tokenizer(directory):
        missing.append(" or ".join(layout.TOKENIZER_VOCAB_NAMES))
    if image_settings is None:
        missing.append(
            f"{layout.PREPROCESSOR_CONFIG_NAME} or {layout.PROCESSOR_CONFIG_NAME} "
            "(with an image_processor entry)"
        )
    if missing or weights is None or image_settings is None:
        raise CheckpointError(
            f"{directory} is not a complete checkpoint directory; missing: "
            f"{'; '.join(missing)}. {_valid_dir_help()}"
        )
    config_dict = _read_json(config_path)
    try:
        config = BlipConfig.from_hf_dict(config_dict)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    return ResolvedCheckpoint(
        source=source,
        kind="hf",
        weights_path=weights,
        config=config,
        tokenizer_dir=directory,
        image_settings_dict=image_settings,
        revision=revision,
        commit=commit,
        config_dict=config_dict,
        task=task_of_config(config_dict),
    )


# -- bare weights file (original BLIP / LAVIS .pth) -------------------------------------------


def _resolve_weights_file(
    path: Path, *, source: str, tokenizer: str | os.PathLike[str] | None
) -> ResolvedCheckpoint:
    # The file carries no config: read the tensors (memory-mapped where possible) for the shapes.
    tensors = read_state_dict(path)
    config = config_from_original(tensors)
    task: Task = "caption" if is_captioner_state_dict(tensors.keys()) else "itm"
    architecture = CAPTIONER_ARCHITECTURE if task == "caption" else ITM_ARCHITECTURE
    return ResolvedCheckpoint(
        source=source,
        kind="pth",
        weights_path=path,
        config=config,
        tokenizer_dir=_resolve_tokenizer(tokenizer, beside=path.parent),
        image_settings_dict=layout.image_processor_dict(config.vision.image_size),
        revision=None,
        commit=None,
        config_dict=config.to_hf_dict(architecture),
        task=task,
    )


def _resolve_tokenizer(tokenizer: str | os.PathLike[str] | None, *, beside: Path) -> Path:
    if tokenizer is None:
        # Original checkpoints carry no tokenizer; one placed beside the file is the most
        # specific choice, else the one BLIP itself uses (its vocab lacks [DEC]/[ENC], whose ids
        # 30522/30523 are fixed, so that is fine).
        if _has_tokenizer(beside):
            return beside
        tokenizer = DEFAULT_TOKENIZER
    text = os.fspath(tokenizer)
    path = Path(text).expanduser()
    if path.is_dir():
        if not _has_tokenizer(path):
            raise CheckpointError(
                f"tokenizer directory {path} has neither "
                f"{' nor '.join(layout.TOKENIZER_VOCAB_NAMES)}"
            )
        return path
    if path.exists() or not _is_hub_id(text, need_owner=False):
        raise CheckpointError(
            f"tokenizer {text!r}: not a directory, and not a hub id (e.g. 'bert-base-uncased')"
        )
    snapshot = _download(text, revision=None, patterns=TOKENIZER_PATTERNS, what="tokenizer")
    if not _has_tokenizer(snapshot):
        raise CheckpointError(
            f"hub repo {text!r} has no tokenizer ({' or '.join(layout.TOKENIZER_VOCAB_NAMES)})"
        )
    return snapshot


# -- hub --------------------------------------------------------------------------------------


def _is_hub_id(text: str, *, need_owner: bool) -> bool:
    if text.endswith(_WEIGHT_SUFFIXES) or text.startswith(("~", ".", "/")):
        return False  # meant as a path
    if need_owner and text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _offline() -> bool:
    # Read at call time: huggingface_hub reads its constants once, at import.
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    # Same precedence as huggingface_hub, but read now, so that a process (or a test) that sets
    # these after importing huggingface_hub is honoured. None: huggingface_hub's own default.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _unavailable(
    repo_id: str, revision: str | None, offline: bool, cause: BaseException, what: str
) -> str:
    rev = f" at revision {revision!r}" if revision else ""
    reason = " (HF_HUB_OFFLINE is set)" if offline else ""
    cache = _cache_dir() or "the default cache (~/.cache/huggingface/hub)"
    name = repo_id.rsplit("/", 1)[-1]
    local = (
        f'tokenizer="/path/to/{name}"'
        if what == "tokenizer"
        # Both spellings: the same message reaches `blipitm serve --model` and Python callers.
        else f"--model /path/to/{name} on the command line, "
        f'blipitm.load("/path/to/{name}") in Python'
    )
    return (
        f"the Hugging Face hub could not be reached{reason} to get the {what} {repo_id!r}{rev}, "
        f"and no cached copy was found in {cache} ({type(cause).__name__}). Either set "
        "HF_HUB_OFFLINE=1 with a populated cache (HF_HUB_CACHE or HF_HOME), or pass a local "
        f"directory ({local}), or download it on a machine with access: "
        f"`hf download {repo_id} --local-dir {name}` (with older huggingface_hub: "
        f"`huggingface-cli download {repo_id} --local-dir {name}`) and copy the directory here."
    )


def _download(repo_id: str, *, revision: str | None, patterns: list[str], what: str) -> Path:
    offline = _offline()
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=_cache_dir(),
            # Offline: only the cache; online, huggingface_hub itself falls back to the cache
            # when the hub cannot be reached.
            local_files_only=offline,
        )
    except RevisionNotFoundError as e:
        raise CheckpointError(
            f"revision {revision!r} not found in hub repo {repo_id!r}; check the branch, tag or "
            "commit hash"
        ) from e
    except GatedRepoError as e:
        raise CheckpointError(
            f"hub repo {repo_id!r} is gated: accept its terms on huggingface.co and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{what} repo {repo_id!r} not found on the Hugging Face hub (or it is private: log in "
            "with `hf auth login` or set HF_TOKEN); for a local path, check that it exists"
        ) from e
    except _UNREACHABLE as e:
        raise HubUnavailableError(_unavailable(repo_id, revision, offline, e, what)) from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is None or status >= 500:
            raise HubUnavailableError(_unavailable(repo_id, revision, offline, e, what)) from e
        raise CheckpointError(f"hub request for {repo_id!r} failed: {e}") from e
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is not a valid hub id: {e}") from e
    return Path(str(snapshot))
