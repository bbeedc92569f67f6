"""Binding the listening socket before anything slow loads, so that a taken port fails first."""

from __future__ import annotations

import socket

from blipitm.errors import BlipitmError


class BindError(BlipitmError):
    """The server cannot listen on the requested address."""


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
