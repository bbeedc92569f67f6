"""The guarded h11 protocol: request-head and body timeouts, the connection cap with keyless
eviction, early answers that close, and lingering close (the package docstring says why)."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from blipitm.server.errors import ErrorCode
from blipitm.server.middleware import KEY_ACCEPTED
from blipitm.server.transport.gate import Gate, draining_app, raw_response

# After our last response, how long a closing connection may keep sending before it is cut off.
LINGER_S = 2.0


class _LingeringTransport:
    """The transport uvicorn's request cycles see: ``close()`` becomes a lingering close."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.close_gracefully()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout, a connection cap and lingering close.

    Use :func:`protocol_class` to bind it to a :class:`Gate`.
    """

    gate: ClassVar[Gate]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lingering = False
        self._raw: asyncio.Transport | None = None
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self.last_input = 0.0  # loop time of the last byte received (or response sent)

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw = transport
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        self.last_input = self.loop.time()
        gate = self.gate
        if gate.admitted >= gate.max_connections:
            victim = gate.displaceable() if gate.keys_enabled else None
            if victim is None:
                self._refuse_over_cap(transport)
                return
            victim.displace()
        gate.admitted += 1
        gate.keyless[self] = None
        self._admitted = True
        if gate.draining:
            self.app = draining_app
        self._arm_head_timer()

    def _refuse_over_cap(self, transport: asyncio.Transport) -> None:
        transport.write(self._over_cap_response())
        self.close_gracefully()

    def _over_cap_response(self) -> bytes:
        limit = self.gate.max_connections
        return raw_response(
            503,
            "Service Unavailable",
            f"too many open connections (limit {limit}); retry shortly",
            ErrorCode.TOO_MANY_CONNECTIONS,
        )

    def displace(self) -> None:
        """Close this keyless connection to make room at the cap (it was idle or sending a head).

        It stops counting at once: the slot is the new connection's."""
        if self.conn.trailing_data[0] and self._raw is not None:  # part of a head: say why
            self._raw.write(self._over_cap_response())
        self._release()
        self.close_gracefully()

    def key_accepted(self) -> None:
        """A request of this connection passed the key check: it is no longer displaceable."""
        self.gate.keyless.pop(self, None)

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.gate.admitted -= 1
        self.gate.keyless.pop(self, None)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # we have said our last word; only read so that closing never meets unread data
        self.last_input = self.loop.time()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._release()
        super().connection_lost(exc)

    # -- uvicorn hooks --------------------------------------------------------------------------

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and self.cycle is not None:  # a complete request head arrived
            self._cancel_head_timer()
            # The task that runs the app has not started yet: it sees this in its scope.
            extensions = self.cycle.scope.setdefault("extensions", {})
            extensions[KEY_ACCEPTED] = {"callback": self.key_accepted}
            if self.conn.their_state is h11.SEND_BODY:
                self._arm_body_timer()
        if self._body_timer is not None and self.conn.their_state is not h11.SEND_BODY:
            self._cancel_body_timer()  # the body is complete

    def on_response_complete(self) -> None:
        self.last_input = self.loop.time()
        if self.conn.their_state is h11.SEND_BODY:
            # Answered before its body was read (a refusal from the head): rather than read the
            # rest to reuse the connection, close it; lingering discards what still arrives.
            self.server_state.total_requests += 1
            self.close_gracefully()
            return
        super().on_response_complete()  # may start a pipelined request
        if not self.transport.is_closing() and self.idle:
            self._arm_head_timer()

    # -- draining -------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No request is being read or answered (a partly received head counts as busy)."""
        between = self.cycle is None or self.cycle.response_complete
        return between and not self.conn.trailing_data[0]

    @property
    def served(self) -> bool:
        return self.cycle is not None

    def begin_drain(self) -> None:
        """Answer what is in flight, then close; any later request gets 503 (``draining_app``)."""
        self.app = draining_app
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # Say so in the response: a client that reads a plain keep-alive response sends its
            # next request on the connection. (uvicorn's keep_alive=False alone closes silently.)
            cycle.default_headers = [*cycle.default_headers, (b"connection", b"close")]
            cycle.keep_alive = False
        # A response already under way keeps the connection open: the client's next request is
        # answered 503 + Connection: close by draining_app.

    def close_gracefully(self) -> None:
        """Lingering close: FIN after the buffered response, discard input until the client closes.

        Closing a socket that still has unread input makes the kernel send RST, and the client
        loses the response it has not read yet; reading on until the client's own close avoids it.
        """
        if self.lingering:
            return
        self.lingering = True
        self._cancel_head_timer()
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        if not raw.can_write_eof():
            raw.close()
            return
        raw.write_eof()
        raw.resume_reading()
        # The client's EOF closes the transport (H11Protocol.eof_received returns None).
        self._linger_timer = self.loop.call_later(LINGER_S, raw.close)

    def abort(self) -> None:
        if self._raw is not None:
            self._raw.abort()

    # -- the request-head timer -----------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.gate.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_body_timer(self) -> None:
        self._cancel_body_timer()
        self._body_timer = self.loop.call_later(self.gate.body_timeout_s, self._body_timed_out)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.lingering or cycle is None or self.conn.their_state is not h11.SEND_BODY:
            return
        if not cycle.response_started and self._raw is not None:
            message = f"the request body did not arrive within {self.gate.body_timeout_s:g} s"
            self._raw.write(
                raw_response(408, "Request Timeout", message, ErrorCode.REQUEST_TIMEOUT)
            )
            # The app waiting for the body is told the client left; its answer goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        self.close_gracefully()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.lingering or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self.conn.trailing_data[0] and self._raw is not None:  # part of a head: say why
            message = f"no complete request head within {self.gate.head_timeout_s:g} s"
            self._raw.write(
                raw_response(408, "Request Timeout", message, ErrorCode.REQUEST_TIMEOUT)
            )
        self.close_gracefully()


def protocol_class(gate: Gate) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` bound to ``gate`` (uvicorn instantiates the class itself)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"gate": gate})
