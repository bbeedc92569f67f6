"""The connection layer under the app: binding, connection limits, and a drain that resets nothing.

uvicorn's stock h11 protocol and server are extended in these places:

- **Request-head timeout.** A connection gets ``head_timeout_s`` to deliver a complete request
  head, counted from when it opened or its previous response ended. uvicorn's keep-alive timer is
  cancelled by the first byte, so without this a client sending one header byte per second holds a
  connection forever. Past the timeout: ``408`` if part of a head arrived, else a quiet close.
- **Request-body timeout.** Once a head has arrived, its body has ``body_timeout_s`` to arrive in
  full; past it: ``408`` and close. Without it one byte every few seconds holds a connection (and
  with ``max_connections`` of them, the server) for ever.
- **Early answers close.** A response sent before its request's body was read (401, 404, 405, 413
  from the head) closes the connection: the unread rest is discarded, never buffered, and a client
  trickling a refused body loses its connection at once.
- **Connection cap.** Beyond ``max_connections`` open connections, a new one is answered ``503``
  with ``Retry-After`` at once and closed; nothing of it is parsed. With API keys on, connections
  that have not yet presented a valid key (``keyless``) get no slot for ever: at the cap, the
  oldest keyless connection not busy with a request is closed to admit the new one (``503``), so
  idle or slow-head connections cannot lock out clients that hold a key; connections whose request
  passed the key check are never displaced.
- **Drain on SIGTERM** (:class:`DrainingServer`). Stock uvicorn closes the listening socket (the
  kernel resets every connection still in its accept queue) and closes idle connections at once
  (a request already sent but not yet read is reset, as closing a socket with unread data sends
  RST). Here, instead: connections the kernel already accepted are taken off the accept queue
  *before* the socket closes; requests in flight are answered; a request arriving on any other
  connection is answered ``503`` + ``Retry-After`` + ``Connection: close``; and every close is a
  *lingering* close (send FIN, read and discard until the client closes), so a close never meets
  unread data. A response in flight when the drain begins says ``Connection: close`` (a client
  that reads a plain keep-alive response sends its next request on the connection, which would be
  lost); an idle keep-alive connection is closed only after ``DRAIN_QUIET_S`` without a byte, so a
  client in the middle of a request sequence gets its ``503`` instead of a vanished connection.
  The process exits 0 once everything is answered, or at ``drain_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from blipitm.errors import BlipitmError
from blipitm.server.errors import ErrorCode, envelope
from blipitm.server.middleware import KEY_ACCEPTED

log = logging.getLogger("blipitm.server")

# After our last response, how long a closing connection may keep sending before it is cut off.
LINGER_S = 2.0
# Seconds a client is told to wait before retrying when refused at the cap or while draining.
RETRY_AFTER_S = 1
# While draining, an idle keep-alive connection is closed once it has been this long without a byte
# from the client: one sending a sequence of requests sends its next one well within it.
DRAIN_QUIET_S = 2.0


class BindError(BlipitmError):
    """The server cannot listen on the requested address."""


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
    keyless: dict[GuardedH11Protocol, None] = field(default_factory=dict)

    def displaceable(self) -> GuardedH11Protocol | None:
        """The oldest keyless connection not busy with a request (idle, or sending a head)."""
        for conn in self.keyless:
            if not conn.lingering and (conn.cycle is None or conn.cycle.response_complete):
                return conn
        return None


def _raw_response(status: int, reason: str, message: str, code: ErrorCode) -> bytes:
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
        return _raw_response(
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
                _raw_response(408, "Request Timeout", message, ErrorCode.REQUEST_TIMEOUT)
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
                _raw_response(408, "Request Timeout", message, ErrorCode.REQUEST_TIMEOUT)
            )
        self.close_gracefully()


def protocol_class(gate: Gate) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` bound to ``gate`` (uvicorn instantiates the class itself)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"gate": gate})


# -- binding and the server -----------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """Bind (not yet listen) ``host:port``, so that a taken port fails before anything loads.

    Listening starts when the server runs; until then connections are refused, not queued.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise BindError(
            f"cannot listen on {host}:{port}: {e.strerror}; is another server running there? "
            "Stop it or pick another --port"
        ) from None
    sock.setblocking(False)
    return sock


class EarlyStop:
    """Records SIGTERM from before the server's own signal handlers are installed.

    uvicorn installs its handlers only once its loop runs, and re-raises a caught signal when it
    returns; with this handler in place, SIGTERM during start-up drains instead of killing the
    process, and the re-raised signal after a drain does not turn exit code 0 into -15.
    """

    def __init__(self) -> None:
        self.signalled = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True


class DrainingServer(uvicorn.Server):
    """uvicorn's server on one pre-bound socket, with the drain the module docstring describes."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        listener: socket.socket,
        gate: Gate,
        drain_timeout_s: float,
        early_stop: EarlyStop | None = None,
    ) -> None:
        super().__init__(config)
        self.listener = listener
        self.gate = gate
        self.drain_timeout_s = drain_timeout_s
        self.early_stop = early_stop

    def serve_forever(self) -> None:
        """Run until SIGTERM / SIGINT (or ``should_exit``), then drain."""
        self.run(sockets=[self.listener])

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        # uvicorn logs its address only when it binds the socket itself.
        host, port = self.listener.getsockname()[:2]
        log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
        if self.early_stop is not None and self.early_stop.signalled:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        self.gate.draining = True
        # The kernel completed these handshakes already: accept them before the socket closes,
        # which would reset them.
        backlog = self._accept_backlog()
        for server in self.servers:
            server.close()
        log.info(
            "shutting down: answering %d open connection(s), up to %g s",
            len(self.server_state.connections) + len(backlog),
            self.drain_timeout_s,
        )
        for conn in backlog:
            await loop.connect_accepted_socket(self._new_protocol, conn)
        guarded = self._guarded
        for protocol in guarded():
            protocol.begin_drain()

        await self._drain(deadline)
        if self.server_state.tasks or self.server_state.connections:
            log.warning(
                "drain timeout: cancelling %d request(s), closing %d connection(s)",
                len(self.server_state.tasks),
                len(self.server_state.connections),
            )
            for task in self.server_state.tasks:
                task.cancel()
            for protocol in guarded():
                protocol.abort()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _drain(self, deadline: float) -> None:
        """Wait until ``deadline`` (or a forced exit) for requests and connections to finish."""
        loop = asyncio.get_running_loop()
        # In-flight requests finish first; idle keep-alive connections stay open meanwhile, so a
        # request that races the drain gets a 503 rather than a closed socket.
        while self.server_state.tasks and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        # Then close idle kept-alive connections; a fresh connection that has not yet sent its
        # request keeps its head timeout to send it (and be answered 503).
        while self.server_state.connections and loop.time() < deadline and not self.force_exit:
            quiet_since = loop.time() - DRAIN_QUIET_S
            for protocol in self._guarded():
                if protocol.idle and protocol.served and protocol.last_input <= quiet_since:
                    protocol.close_gracefully()
            await asyncio.sleep(0.05)

    def _guarded(self) -> list[GuardedH11Protocol]:
        return [c for c in self.server_state.connections if isinstance(c, GuardedH11Protocol)]

    def _accept_backlog(self) -> list[socket.socket]:
        accepted: list[socket.socket] = []
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError:  # the listener is gone or broken: nothing more to take
                return accepted
            conn.setblocking(False)
            accepted.append(conn)

    def _new_protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
            _loop=asyncio.get_running_loop(),
        )
