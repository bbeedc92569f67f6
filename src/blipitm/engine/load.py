"""``blipitm.load``: resolve a checkpoint, build the model for a protocol, wrap it in an Engine."""

from __future__ import annotations

import logging
import os

import torch

from blipitm.checkpoint import load_into, load_weights, resolve
from blipitm.config import PROTOCOLS, apply_protocol
from blipitm.engine.devices import native_compute_dtype
from blipitm.engine.engine import DEFAULT_CACHE_BYTES, BatchSizes, Engine
from blipitm.engine.types import ModelInfo
from blipitm.errors import InvalidInputError
from blipitm.model import ATTN_IMPLS, BlipITM
from blipitm.processing.image import DEFAULT_MAX_PIXELS, ImageSettings
from blipitm.processing.tokenizer import Tokenizer

log = logging.getLogger("blipitm")

DEFAULT_MODEL = "Salesforce/blip-itm-base-flickr"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def load(
    source: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    protocol: str = "blip",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    batch_sizes: BatchSizes | None = None,
    attn_impl: str = "sdpa",
    compute_dtype: str | None = None,
    decode_threads: int | None = None,
    decode_budget_pixels: int | None = None,
) -> Engine:
    """Load a BLIP ITM checkpoint and return a ready :class:`Engine`.

    ``source``: a hub id (``revision`` pins it), a local Hugging Face directory, or an original
    BLIP/LAVIS ``.pth`` file (then ``tokenizer`` names the tokenizer directory or hub id).
    ``protocol``: ``"blip"`` (the model as Salesforce evaluated it) or ``"transformers"``
    (bit-compatible with ``transformers.BlipForImageTextRetrieval``); see the README.
    ``dtype`` is how the weights are stored; ``compute_dtype`` (default: ``dtype`` where the
    hardware runs it natively, else float32) is what the arithmetic runs in.
    ``decode_threads`` and ``decode_budget_pixels`` (full-size pixels decoded at once; default
    ``max_pixels``) bound the image decoding; see :class:`Engine`.
    """
    if protocol not in PROTOCOLS:
        raise InvalidInputError(f"must be one of {PROTOCOLS}, got {protocol!r}", loc=("protocol",))
    if dtype not in DTYPES:
        raise InvalidInputError(f"must be one of {tuple(DTYPES)}, got {dtype!r}", loc=("dtype",))
    if attn_impl not in ATTN_IMPLS:
        raise InvalidInputError(
            f"must be one of {ATTN_IMPLS}, got {attn_impl!r}", loc=("attn_impl",)
        )
    torch_device = _device(device)
    if DTYPES[dtype] == torch.float16 and torch_device.type == "cpu":
        raise InvalidInputError(
            "float16 is not supported on CPU; use bfloat16 (fast on modern CPUs) or float32",
            loc=("dtype",),
        )

    resolved = resolve(source, revision=revision, tokenizer=tokenizer)
    config, overrides = apply_protocol(resolved.config, protocol)
    for o in overrides:
        log.info("protocol %s overrides %s", protocol, o)

    # Tensors are converted to the storage dtype as they are read and assigned to a model built
    # on the meta device, so no second copy of the weights ever exists (peak RSS).
    state_dict = load_weights(resolved, dtype=DTYPES[dtype])
    with torch.device("meta"):
        model = BlipITM(config)
    load_into(model, state_dict)
    del state_dict
    model = model.to(device=torch_device).eval().requires_grad_(False)
    model.set_attn_impl(attn_impl)  # type: ignore[arg-type]
    if compute_dtype is None:
        compute = native_compute_dtype(torch_device, DTYPES[dtype])
    elif compute_dtype in DTYPES:
        compute = DTYPES[compute_dtype]
    else:
        raise InvalidInputError(
            f"must be one of {tuple(DTYPES)} or None, got {compute_dtype!r}", loc=("compute_dtype",)
        )

    info = ModelInfo(
        source=resolved.source,
        kind=resolved.kind,
        revision=resolved.revision,
        commit=resolved.commit,
        protocol=protocol,
        device=str(torch_device),
        dtype=dtype,
        config=config,
        overrides=overrides,
        compute_dtype=str(compute).removeprefix("torch."),
    )
    log.info(
        "loaded %s (%s, revision=%s, commit=%s) protocol=%s device=%s dtype=%s compute=%s "
        "overrides=[%s]",
        info.source,
        info.kind,
        info.revision,
        info.commit,
        protocol,
        info.device,
        dtype,
        info.compute_dtype,
        "; ".join(str(o) for o in overrides),
    )
    return Engine(
        model,
        Tokenizer.from_dir(resolved.tokenizer_dir),
        ImageSettings.from_processor_dict(resolved.image_settings_dict),
        info,
        max_pixels=max_pixels,
        cache_bytes=cache_bytes,
        batch_sizes=batch_sizes,
        decode_threads=decode_threads,
        decode_budget_pixels=decode_budget_pixels,
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
