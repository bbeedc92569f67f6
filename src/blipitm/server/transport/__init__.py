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
early SIGTERM catch) and :mod:`.binding` (the pre-bound socket).
"""

from blipitm.server.transport.binding import BindError, bind
from blipitm.server.transport.drain import DRAIN_QUIET_S, DrainingServer, EarlyStop
from blipitm.server.transport.gate import RETRY_AFTER_S, Gate, draining_app
from blipitm.server.transport.protocol import LINGER_S, GuardedH11Protocol, protocol_class

__all__ = [
    "DRAIN_QUIET_S",
    "LINGER_S",
    "RETRY_AFTER_S",
    "BindError",
    "DrainingServer",
    "EarlyStop",
    "Gate",
    "GuardedH11Protocol",
    "bind",
    "draining_app",
    "protocol_class",
]
