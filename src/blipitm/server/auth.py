"""Bearer-token check: constant-time, over every configured key, and the key never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence


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
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        got = _digest(token.strip())
        ok = False
        for want in self._digests:
            ok |= hmac.compare_digest(got, want)
        return ok


def needs_key(path: str, protect_metrics: bool) -> bool:
    """Routes behind the key: the API (/v1, /v2), and /metrics when asked."""
    if path.startswith(("/v1/", "/v2/")) or path in ("/v1", "/v2"):
        return True
    return protect_metrics and path == "/metrics"
