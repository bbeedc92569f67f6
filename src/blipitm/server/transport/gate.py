"""What every connection of one server shares (the limits and the drain switch), and the answers
the connection layer gives itself, outside any request the app sees."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from blipitm.server.errors import ErrorCode, envelope

# Seconds a client is told to wait before retrying when refused at the cap or while draining.
RETRY_AFTER_S = 1


class Admitted(Protocol):
    """What the gate needs of a connection it admitted (a ``GuardedH11Protocol``)."""

    lingering: bool  # closing: said its last word
    cycle: Any  # uvicorn's current request cycle, None before the first head

    def displace(self) -> None: ...


@dataclass
class Gate:
    """What every connection of one server shares: the limits and the drain switch."""

    head_timeout_s: float
    max_connections: int
    body_timeout_s: float = 60.0
    keys_enabled: bool = False  # keyless connections may be displaced at the cap
    admitted: int = 0  # open connections under the cap (refused ones are not counted)
    draining: bool = False
    # Admitted connections no request of which has passed the key check, oldest first (a dict as
    # an ordered set).
    keyless: dict[Admitted, None] = field(default_factory=dict)

    def displaceable(self) -> Admitted | None:
        """The oldest keyless connection not busy with a request (idle, or sending a head)."""
        for conn in self.keyless:
            if not conn.lingering and (conn.cycle is None or conn.cycle.response_complete):
                return conn
        return None


def raw_response(status: int, reason: str, message: str, code: ErrorCode) -> bytes:
    """A complete ``Connection: close`` response, for answers given outside any request cycle."""
    body = json.dumps(envelope(status, message, code)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: {RETRY_AFTER_S}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


async def draining_app(scope: Any, receive: Any, send: Any) -> None:
    """What a request gets once the server is draining: 503, retry elsewhere or later."""
    body = json.dumps(
        envelope(503, "the server is shutting down; retry the request", ErrorCode.SHUTTING_DOWN)
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
