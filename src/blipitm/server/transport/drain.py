"""The draining server: uvicorn's server on one pre-bound socket, with a SIGTERM drain that
resets nothing (the package docstring describes it)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from blipitm.server.transport.compat import check_uvicorn
from blipitm.server.transport.gate import Gate
from blipitm.server.transport.protocol import GuardedH11Protocol

log = logging.getLogger("blipitm.server")

# While draining, an idle keep-alive connection is closed once it has been this long without a byte
# from the client: one sending a sequence of requests sends its next one well within it.
DRAIN_QUIET_S = 2.0


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
        check_uvicorn()
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
