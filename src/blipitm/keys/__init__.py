"""API keys and their usage, stored in SQLite: shared by ``blipitm keys`` and ``blipitm serve``.

Torch-free and HTTP-free: the store knows keys, limits, balances and usage rows; the server's
limiter and meter (``blipitm.server.gateway``) decide what a request may do and record what
it did.
"""

from blipitm.keys.secret import KEY_PREFIX, hash_secret, new_secret
from blipitm.keys.store import (
    UNSET,
    KeyExistsError,
    KeyRecord,
    KeyStore,
    UnknownKeyError,
    UsageRow,
    parse_date,
    validate_name,
)

__all__ = [
    "KEY_PREFIX",
    "UNSET",
    "KeyExistsError",
    "KeyRecord",
    "KeyStore",
    "UnknownKeyError",
    "UsageRow",
    "hash_secret",
    "new_secret",
    "parse_date",
    "validate_name",
]
