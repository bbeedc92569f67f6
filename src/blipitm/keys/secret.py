"""Key secrets: ``bk-`` plus 256 random bits, stored only as their SHA-256.

Why a plain SHA-256 and no slow KDF (bcrypt, scrypt, argon2): a KDF makes guessing a *low-entropy*
password expensive. These secrets are 256 bits from the OS's CSPRNG; no guessing attack on their
hash is feasible at any hash speed, so a slow hash would add only latency (milliseconds per request)
and no security. One SHA-256 keeps the check in microseconds.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "bk-"  # recognisable in configs and by secret scanners
_RANDOM_BYTES = 32  # 256 bits


def new_secret() -> str:
    """A fresh secret: ``bk-`` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def hash_secret(secret: str) -> bytes:
    """What the store keeps and what a presented key is looked up by."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def hint(secret: str) -> str:
    """What ``keys list`` shows to tell keys apart: the prefix and the last 4 characters."""
    return f"{KEY_PREFIX}...{secret[-4:]}"
