"""Bearer-token check: constant-time, over every configured key, and the key never logged.

Two kinds of key: the static ``--api-key`` keys (unlimited operator keys, checked here) and the
per-key store of ``--keys-db`` (:mod:`blipitm.server.gateway.accounts`), asked when no static key
matches. :meth:`Authenticator.authenticate` answers a typed verdict: :class:`Operator`,
:class:`Metered` (a key of the store) or :class:`Refused` (with the reason the client reads).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import TYPE_CHECKING

from blipitm.server.gateway.verdict import INVALID, OPERATOR, AuthVerdict, Refused

if TYPE_CHECKING:
    from blipitm.server.gateway.accounts import KeyService


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of the key length too
    # (hmac.compare_digest on raw strings leaks the length of the expected value).
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class KeyChecker:
    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        """True if ``authorization`` is ``Bearer <one of the keys>``.

        Every key is compared (no early exit), so timing does not reveal which key nearly matched.
        """
        if not self._digests:
            return True
        token = bearer_token(authorization)
        if token is None:
            return False
        got = _digest(token)
        ok = False
        for want in self._digests:
            ok |= hmac.compare_digest(got, want)
        return ok


def needs_key(path: str, protect_metrics: bool) -> bool:
    """Routes behind the key: the API (/v1, /v2), and /metrics when asked."""
    if path.startswith(("/v1/", "/v2/")) or path in ("/v1", "/v2"):
        return True
    return protect_metrics and path == "/metrics"


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Bearer <token>``, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    """Static operator keys first, then the key store."""

    def __init__(self, static: KeyChecker, service: KeyService | None) -> None:
        self.static = static
        self.service = service

    @property
    def enabled(self) -> bool:
        return self.static.enabled or self.service is not None

    def authenticate(self, authorization: str | None) -> AuthVerdict:
        if not self.enabled or (self.static.enabled and self.static.check(authorization)):
            return OPERATOR
        token = bearer_token(authorization)
        if token is None:
            return Refused("missing API key; send `Authorization: Bearer <key>`")
        if self.service is None:
            return Refused(INVALID)
        return self.service.authenticate(token)
