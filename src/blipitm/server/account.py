"""What a request is billed to: the seam between the request path and the hosted-API gateway.

The request context (``server/context.py``) resolves one :class:`Account` per request and asks it
three things: whether the key may use the served model (:meth:`Account.allows`), to reserve the
request's items and credits before any work (:meth:`Account.reserve`), and to bill what was done
(:meth:`Account.worked`, :meth:`Account.bill`). The gateway (``server/gateway/``) puts a metered
key's account in the ASGI scope; operator keys and open servers get :data:`UNMETERED`, which
allows everything and bills nothing. Nothing here knows keys, limits or Redis, so the request
path runs the same with or without the gateway installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from blipitm.errors import BlipitmError
from blipitm.server.family import ModelSpec

SCOPE_ACCOUNT = "blipitm.account"  # where the gateway leaves a request's account in the scope
# Set only by the Batch API's in-process calls (no header or client can): whom a batch line is
# billed to (the gateway meters it at the batch price), and that it runs as background work.
SCOPE_BATCH_CALLER = "blipitm.batch_caller"
SCOPE_BACKGROUND = "blipitm.background"


@dataclass(frozen=True)
class BatchCaller:
    """The owner of a batch (a key's name; None: an operator key or an open server) and the
    share of the online price its lines cost."""

    owner: str | None
    credit_factor: float


class Account(Protocol):
    @property
    def owner(self) -> str | None:
        """The metered key's name; None for an operator key or an open server (who see every
        key's batches and files)."""
        ...

    def allows(self, *names: str) -> bool:
        """Whether the caller may use the model known by any of ``names``."""
        ...

    async def reserve(self, texts: int, images: int, model: ModelSpec | None = None) -> None:
        """Take the request's items and credits (at ``model``'s price, and metered under its name)
        before any work; raises
        :class:`~blipitm.server.errors.OverLimit` (429) or :class:`LimiterUnavailable` (503)."""
        ...

    def worked(self, texts: int | None = None, images: int | None = None) -> None:
        """The inference worker took a job of this request (None: all of it): it is billed even
        if the client leaves."""
        ...

    def bill(self, tokens: int) -> None:
        """The response's ``usage.total_tokens``, recorded with the request."""
        ...


class Unmetered:
    """An operator key, or a server without keys: everything allowed, nothing billed."""

    owner = None

    def allows(self, *names: str) -> bool:
        return True

    async def reserve(self, texts: int, images: int, model: ModelSpec | None = None) -> None:
        return None

    def worked(self, texts: int | None = None, images: int | None = None) -> None:
        return None

    def bill(self, tokens: int) -> None:
        return None


UNMETERED: Account = Unmetered()


def account_of(scope: Mapping[str, Any]) -> Account:
    """The request's account: the gateway's, else :data:`UNMETERED`."""
    account: Account | None = scope.get(SCOPE_ACCOUNT)
    return UNMETERED if account is None else account


class LimiterUnavailable(BlipitmError):
    """Redis cannot be reached: requests of metered keys are refused (503), never let through."""
