"""uvicorn, as `corom serve` runs it: stalled connections cut off, and a drain that answers everyone.

- A connection that has not sent a complete request head within `header_timeout_s` (a slow-loris
  client, or an idle keep-alive one) is closed with one log line, so stalled sockets cannot exhaust
  the connection bound for healthy clients.
- SIGTERM (or SIGINT): stop accepting, let the batcher finish what it accepted until the drain
  deadline, answer what is still queued then with 503, and exit 0. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from typing import Callable

import uvicorn

from corom_runtime.serving.http_errors import error_body

try:  # the C parser: a round trip of 0.20 ms where pure-Python h11 takes 0.29 (docs/decisions.md)
    from uvicorn.protocols.http import httptools_impl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError as exc:  # pragma: no cover - the [serve] extra installs it
    raise ImportError("corom serve needs httptools: pip install 'corom-onnx[serve]'") from exc

log = logging.getLogger(__name__)


def _json_error(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(error_body(status, message)).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")], body


async def _over_connection_bound(scope, receive, send) -> None:
    headers, body = _json_error(503, "too many connections: retry later")
    await send({"type": "http.response.start", "status": 503, "headers": headers + [(b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# uvicorn answers requests over its connection bound with this app: ours speaks the server's one
# JSON error shape (uvicorn's own says "Service Unavailable" in plain text)
httptools_impl.service_unavailable = _over_connection_bound


def guarded_protocol(timeout_s: float, max_head_bytes: int = 16 * 1024) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, whose connections must send each request head within `timeout_s`
    and `max_head_bytes` (request line and headers together: URL length and header count included)."""

    class GuardedProtocol(HttpToolsProtocol):
        _head_timer = None
        _head = b""
        _reading_head = True
        _discarding = False  # answered 400: what the client still sends is read and dropped

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._expired)
            self._head, self._reading_head = b"", True

        def _expired(self) -> None:
            self._head_timer = None
            # no complete request head since the connection opened or the last answer, and none queued
            waiting_for_head = self._reading_head and not self.pipeline \
                and (self.cycle is None or self.cycle.response_complete)
            if waiting_for_head and not self.transport.is_closing():
                log.info("closing connection from %s: no complete request head within %gs", self.client, timeout_s)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            if self._reading_head:
                # llhttp bounds no head size: count it ourselves, across the pieces it arrives in
                self._head += data[: max_head_bytes + 4 - len(self._head)]
                if b"\r\n\r\n" in self._head:
                    self._head, self._reading_head = b"", False
                elif len(self._head) > max_head_bytes:
                    self.send_400_response(f"request head over {max_head_bytes} bytes")
                    return
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def send_400_response(self, msg: str) -> None:
            # a request the parser cannot take (a head over the limit, bad framing): the JSON shape too
            headers, body = _json_error(400, f"malformed HTTP request ({msg.rstrip('.')}): "
                                             "is a header, the URL or the head as a whole too large?")
            head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
            if self.transport.is_closing():
                return
            self.transport.write(head + body)
            if not self.transport.can_write_eof():
                self.transport.close()
                return
            # closing now, with the rest of a large head unread, makes the kernel answer with a reset
            # that can overtake the 400: send it and FIN, drop what still comes, close when the client
            # does (or after the head timeout)
            self.transport.write_eof()
            self._discarding = True
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self.transport.close)

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return GuardedProtocol


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` with a drain deadline and a clean exit status (see the module doc)."""

    def __init__(self, config: uvicorn.Config, drain_s: Callable[[], float], on_deadline: Callable[[], int]) -> None:
        super().__init__(config)
        self.drain_of, self.on_deadline = drain_s, on_deadline
        self.drain_s = 0.0
        self.forced = False
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            log.warning("second signal: exiting now, without waiting for queued requests")
            self.forced = self.force_exit = True
            return
        self.drain_s = self.drain_of()
        # uvicorn cancels handlers still running at its own deadline: ours comes first, so they answer 503
        self.config.timeout_graceful_shutdown = int(self.drain_s) + 10
        log.info("signal %d: draining accepted requests for up to %.0fs", sig, self.drain_s)
        self.should_exit = True
        self._timer = threading.Timer(self.drain_s, self._deadline)
        self._timer.daemon = True
        self._timer.start()

    def _deadline(self) -> None:
        dropped = self.on_deadline()
        if dropped:
            log.warning("drain deadline of %.0fs passed: %d queued requests answered 503", self.drain_s, dropped)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own version re-raises the signal after a graceful shutdown, so a process that
        # drained cleanly would still end "killed by SIGTERM"; a completed drain is a success (exit 0)
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
            if self._timer is not None:
                self._timer.cancel()
