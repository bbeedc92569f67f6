"""What authentication answers: an operator, a metered key of the store, or a refusal."""

from __future__ import annotations

from dataclasses import dataclass

from blipitm.keys import KeyRecord


@dataclass(frozen=True)
class Operator:
    """A static ``--api-key`` key, or a server with no keys at all: unlimited, not metered."""


@dataclass(frozen=True)
class Metered:
    """A valid key of the store: limited and billed."""

    key: KeyRecord


@dataclass(frozen=True)
class Refused:
    """No valid key: ``reason`` is the 401's message (it never echoes the token)."""

    reason: str


AuthVerdict = Operator | Metered | Refused
OPERATOR = Operator()
INVALID = "invalid API key; send `Authorization: Bearer <key>`"
