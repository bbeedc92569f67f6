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

Modules, by job: :mod:`.gate` (the limits every connection shares, and the answers given outside
the app), :mod:`.protocol` (the guarded h11 protocol), :mod:`.drain` (the draining server and the
early SIGTERM catch), :mod:`.binding` (the pre-bound socket), :mod:`.compat` (the uvicorn range).

uvicorn internals touched
-------------------------

Supported: uvicorn ``>=0.41,<0.55`` (``pyproject.toml`` says the same); :func:`check_uvicorn`
refuses any other at server start-up. uvicorn documents ``uvicorn.run``, ``Config`` and
``Server.run`` / ``serve``, not the rest below (nor ``Server.run``'s ``sockets``); each one was
checked against every release in the range, and ``tests/test_transport_internals.py`` fails if
the transport sources use a uvicorn name missing here, or this list names one the installed
uvicorn lacks.

- ``H11Protocol.handle_events``: overridden; runs after each ``data_received`` (a new ``cycle`` is a
  complete head).
- ``H11Protocol.on_response_complete``: overridden; called when a response's last byte is sent.
- ``H11Protocol.conn``: its ``h11.Connection`` (``their_state``, ``trailing_data`` and
  ``h11.SEND_BODY`` are h11's public API).
- ``H11Protocol.cycle``: the current ``RequestResponseCycle``, ``None`` before the first head.
- ``H11Protocol.transport``: replaced by a wrapper whose ``close()`` is a lingering close.
- ``H11Protocol.app``: replaced by the draining app once a drain begins.
- ``H11Protocol.loop``: the event loop, for timers.
- ``H11Protocol.server_state``: the server's shared ``ServerState``.
- ``H11Protocol.config``: constructor keyword, when a backlogged connection is built by hand.
- ``H11Protocol.app_state``: constructor keyword, likewise.
- ``H11Protocol._loop``: the constructor's private keyword, likewise.
- ``RequestResponseCycle.scope``: the ASGI scope, before the app's task starts (the key callback).
- ``RequestResponseCycle.response_started``: whether the response head was sent.
- ``RequestResponseCycle.response_complete``: whether the response was sent in full.
- ``RequestResponseCycle.default_headers``: a draining response gets ``Connection: close``.
- ``RequestResponseCycle.keep_alive``: cleared with it.
- ``RequestResponseCycle.disconnected``: set when the body times out, so the app stops waiting.
- ``RequestResponseCycle.message_event``: set with it, to wake the app's ``receive()``.
- ``ServerState.total_requests``: counts a request answered before its body was read.
- ``ServerState.connections``: the open connections (protocols).
- ``ServerState.tasks``: the requests in flight.
- ``Server.startup``: overridden (``sockets`` keyword); logs the address, honours an early stop.
- ``Server.shutdown``: overridden (``sockets`` keyword); the drain replaces uvicorn's.
- ``Server.run``: called with its undocumented ``sockets`` keyword (the pre-bound socket).
- ``Server.servers``: the asyncio servers, closed once the accept queue is taken.
- ``Server.server_state``: the ``ServerState`` above.
- ``Server.lifespan``: its ``shutdown()`` runs after the drain; its ``state`` seeds new protocols.
- ``Server.config``: the loaded ``Config``.
- ``Server.should_exit``: set by an early SIGTERM, read by uvicorn's main loop.
- ``Server.force_exit``: a second signal cuts the drain short.
- ``Config.http_protocol_class``: the protocol class ``Config.load()`` resolved.
- ``LifespanOn.shutdown``: the app's shutdown, after the drain.
- ``LifespanOn.state``: the lifespan state handed to each connection.

Behaviour relied on, not names: ``H11Protocol.eof_received`` returns ``None`` (the client's FIN
closes the transport, ending a lingering close); ``Server.serve`` re-raises a signal it caught
once it returns (:class:`EarlyStop` absorbs it); ``Server.serve`` runs ``shutdown`` after a
``startup`` that set ``should_exit`` (:class:`EarlyStop`'s drain; uvicorn does so since 0.41, the
reason for the lower bound).
"""

from blipitm.server.transport.binding import BindError, bind
from blipitm.server.transport.compat import (
    SUPPORTED_UVICORN,
    UnsupportedUvicornError,
    check_uvicorn,
)
from blipitm.server.transport.drain import DRAIN_QUIET_S, DrainingServer, EarlyStop
from blipitm.server.transport.gate import RETRY_AFTER_S, Gate, draining_app
from blipitm.server.transport.protocol import LINGER_S, GuardedH11Protocol, protocol_class

__all__ = [
    "DRAIN_QUIET_S",
    "LINGER_S",
    "RETRY_AFTER_S",
    "SUPPORTED_UVICORN",
    "BindError",
    "DrainingServer",
    "EarlyStop",
    "Gate",
    "GuardedH11Protocol",
    "UnsupportedUvicornError",
    "bind",
    "check_uvicorn",
    "draining_app",
    "protocol_class",
]
