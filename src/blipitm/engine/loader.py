"""``blipitm.load``: resolve a checkpoint, build the model for a protocol, wrap it in an Engine."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

from blipitm.checkpoint import ResolvedCheckpoint, load_into, load_weights, resolve
from blipitm.config import AttnImpl, BlipConfig, Task
from blipitm.engine.devices import TORCH_DTYPES, dtype_name, native_compute_dtype
from blipitm.engine.engine import Engine
from blipitm.engine.options import DEFAULT_MODEL, LoadOptions
from blipitm.engine.types import ModelInfo
from blipitm.errors import InvalidInputError
from blipitm.model import BlipITM, int8_supported
from blipitm.processing.image import ImageSettings
from blipitm.processing.tokenizer import Tokenizer
from blipitm.scoring import ScoringProtocol, get_protocol

log = logging.getLogger("blipitm")


def load(source: str | os.PathLike[str] = DEFAULT_MODEL, **options: Any) -> Engine:
    """Load a BLIP ITM checkpoint and return a ready :class:`Engine`.

    The keyword arguments are the fields of :class:`LoadOptions`, which says what each means;
    ``load(source, **options)`` is ``load_options(LoadOptions(source, **options))``.
    """
    return load_options(LoadOptions(source, **options))


def load_options(options: LoadOptions, resolved: ResolvedCheckpoint | None = None) -> Engine:
    """Load the checkpoint ``options`` name, as they say; what the CLI calls (``resolved``: the
    checkpoint's files, if already found)."""
    built = build_model(options, "itm", BlipITM, resolved)
    assert isinstance(built.model, BlipITM)
    return Engine(
        built.model,
        Tokenizer.from_dir(built.resolved.tokenizer_dir),
        ImageSettings.from_processor_dict(built.resolved.image_settings_dict),
        built.info,
        built.protocol,
        max_pixels=options.max_pixels,
        max_text_chars=options.max_text_chars,
        cache_bytes=options.cache_bytes,
        batch_sizes=options.batch_sizes,
        decode_threads=options.decode_threads,
        decode_budget_pixels=options.decode_budget_pixels,
    )


class Model(Protocol):
    """What :func:`build_model` needs of a model class (BlipITM, BlipCaptioner)."""

    def set_attn_impl(self, impl: AttnImpl) -> None: ...

    def quantize_int8(self) -> None: ...


@dataclass(frozen=True)
class Built:
    """A model loaded as ``LoadOptions`` say, with what was resolved on the way."""

    model: torch.nn.Module
    resolved: ResolvedCheckpoint
    protocol: ScoringProtocol
    info: ModelInfo


def resolve_options(options: LoadOptions) -> ResolvedCheckpoint:
    """The checkpoint files ``options`` name (its source, revision and tokenizer)."""
    return resolve(options.source, revision=options.revision, tokenizer=options.tokenizer)


def build_model(
    options: LoadOptions,
    task: Task,
    model_class: Callable[[BlipConfig], torch.nn.Module],
    resolved: ResolvedCheckpoint | None = None,
) -> Built:
    """Resolve the checkpoint (unless ``resolved`` is given), check it holds ``task``'s model,
    configure it for the protocol, and load its weights strictly into ``model_class`` on the
    device, in the dtypes asked."""
    torch_device = _device(options.device)
    if options.dtype == "float16" and torch_device.type == "cpu":
        raise InvalidInputError(
            "float16 is not supported on CPU; use bfloat16 (fast on modern CPUs) or float32",
            loc=("dtype",),
        )
    if options.dtype == "int8":
        _check_int8(torch_device, options)
    # int8 layers are quantized from float32 weights after loading.
    storage = torch.float32 if options.dtype == "int8" else TORCH_DTYPES[options.dtype]

    resolved = resolved or resolve_options(options)
    resolved.require(task)
    scoring = get_protocol(options.protocol)
    config, overrides = scoring.configure(resolved.config)
    for override in overrides:
        log.info("protocol %s overrides %s", options.protocol, override)

    # Tensors are converted to the storage dtype as they are read and assigned to a model built
    # on the meta device, so no second copy of the weights ever exists (peak RSS).
    state_dict = load_weights(resolved, dtype=storage)
    with torch.device("meta"):
        model = model_class(config)
    load_into(model, state_dict)
    del state_dict
    model = model.to(device=torch_device).eval().requires_grad_(False)
    settable = cast(Model, model)
    settable.set_attn_impl(options.attn_impl)
    if options.dtype == "int8":
        settable.quantize_int8()
    if options.compute_dtype is None:
        compute = native_compute_dtype(torch_device, storage)
    else:
        compute = TORCH_DTYPES[options.compute_dtype]

    info = ModelInfo(
        source=resolved.source,
        kind=resolved.kind,
        revision=resolved.revision,
        commit=resolved.commit,
        protocol=scoring.name,
        device=str(torch_device),
        dtype=options.dtype,
        config=config,
        overrides=overrides,
        compute_dtype=dtype_name(compute),
        task=task,
    )
    log.info(
        "loaded %s (%s, %s, revision=%s, commit=%s) protocol=%s device=%s dtype=%s compute=%s "
        "overrides=[%s]",
        info.source,
        task,
        info.kind,
        info.revision,
        info.commit,
        options.protocol,
        info.device,
        options.dtype,
        info.compute_dtype,
        "; ".join(str(x) for x in overrides),
    )
    return Built(model, resolved, scoring, info)


def _check_int8(device: torch.device, options: LoadOptions) -> None:
    if device.type != "cpu":
        raise InvalidInputError(
            "int8 runs on the CPU only; on a GPU use bfloat16 or float16", loc=("dtype",)
        )
    if not int8_supported():
        raise InvalidInputError(
            f"this torch build ({torch.__version__}) has no int8 matmul (torch._int_mm); use "
            "bfloat16 or float32",
            loc=("dtype",),
        )
    if options.compute_dtype not in (None, "float32"):
        raise InvalidInputError(
            "int8 layers compute the rest of the model in float32; leave compute_dtype unset",
            loc=("compute_dtype",),
        )


def _device(device: str) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(
            f"{device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'", loc=("device",)
        ) from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            "CUDA was requested but torch sees no GPU (CPU-only build or no driver); use 'cpu'",
            loc=("device",),
        )
    return d
