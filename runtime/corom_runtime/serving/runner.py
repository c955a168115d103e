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


# heads are counted by the slice of bytes fed to the parser: a head is refused once the slices fed
# while it was being parsed pass max_head_bytes + _SLICE (a head within the limit never is)
_SLICE = 1024
# how long a connection closed with a request body unread keeps reading (and dropping) it, so that
# closing does not make the kernel send a reset that can overtake the answer
_LINGER_S = 2.0
_LINGER_BYTES = 1 << 20  # ... or until it has sent this much more: then it is closed, reset or not


class _CycleTransport:
    """The transport as one request's cycle sees it: its `close()` (after an answer with Connection:
    close) becomes the protocol's lingering close when the client may still be sending."""

    def __init__(self, protocol) -> None:
        self._protocol, self._transport = protocol, protocol.transport

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_after_answer()


def guarded_protocol(timeout_s: float, max_head_bytes: int = 16 * 1024) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, whose connections must send each request head within `timeout_s`
    and `max_head_bytes` (request line and headers together: URL length and header count included).

    The head bound is counted on what the parser is fed while it is inside a head (parser callbacks
    say where a head begins and ends), so bytes of a pipelined head that arrive while an earlier
    request runs count, and body bytes never do. A refusal while a request runs waits for its answer."""
    linger_s = min(timeout_s, _LINGER_S)

    class GuardedProtocol(HttpToolsProtocol):
        _head_timer = None
        _in_head = False        # the parser is inside a request head
        _head_bytes = 0         # bytes fed while in this head (by slices: see _SLICE)
        _body_left: int | None = 0  # bytes of the current body still to come; None: unknown (chunked)
        _discarding = False     # answered and closing: what the client still sends is read and dropped
        _refusal: str | None = None  # a 400 to send once the request in progress has its answer
        _dropped = 0            # bytes dropped while closing

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._expired)

        def _expired(self) -> None:
            self._head_timer = None
            # no complete request head since the connection opened or the last answer, and none queued
            idle = not self.pipeline and (self.cycle is None or self.cycle.response_complete)
            if idle and not self._discarding and not self.transport.is_closing():
                log.info("closing connection from %s: no complete request head within %gs", self.client, timeout_s)
                self.transport.close()

        def _count(self, path: str | None, status: int) -> None:
            count = getattr(self.config.app, "count", None)  # the RequestGuard's metrics
            if count is not None:
                count(path, status)

        # -- the parser's callbacks: where heads and bodies begin and end --------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            length = next((v for k, v in self.headers if k == b"content-length"), None)
            if length is not None and length.strip().isdigit():
                self._body_left = int(length)
            else:
                self._body_left = None if any(k == b"transfer-encoding" for k, _ in self.headers) else 0
            super().on_headers_complete()
            if self.cycle is not None:
                self.cycle.transport = _CycleTransport(self)  # type: ignore[assignment]

        def on_body(self, body: bytes) -> None:
            if self._body_left:
                self._body_left = max(0, self._body_left - len(body))
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._body_left = 0
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                self._dropped += len(data)
                if self._dropped > _LINGER_BYTES:
                    self.transport.close()
                return
            if self._refusal is not None:
                return
            view, pos = memoryview(data), 0
            while pos < len(data):
                # a Content-Length body is fed whole; heads and everything else by slices
                step = self._body_left if (self._body_left and not self._in_head) else _SLICE
                piece = bytes(view[pos:pos + step])
                pos += len(piece)
                super().data_received(piece)
                if self._discarding or self._refusal is not None or self.transport.is_closing():
                    return
                if self._in_head:
                    self._head_bytes += len(piece)
                    if self._head_bytes > max_head_bytes + _SLICE:
                        # llhttp bounds no head size: a 39 MB header would be buffered whole
                        self.send_400_response(f"request head over {max_head_bytes} bytes")
                        return

        def _start_asgi_task(self, cycle, app) -> None:
            if app is _over_connection_bound:
                self._count(cycle.scope.get("path"), 503)
            super()._start_asgi_task(cycle, app)

        def on_response_complete(self) -> None:
            if self._discarding:  # closing: nothing queued behind the answer runs
                self.server_state.total_requests += 1
                return
            if self._refusal is not None:
                self.server_state.total_requests += 1
                message, self._refusal = self._refusal, None
                self.send_400_response(message)
                return
            super().on_response_complete()
            self._arm()

        def close_after_answer(self) -> None:
            """An answer said Connection: close. With a request still arriving (an early 401/413/408 ...),
            FIN and drop what comes for a moment rather than reset it; otherwise close now."""
            if self._in_head or self._body_left != 0:
                self._linger()
            else:
                self.transport.close()

        def _linger(self) -> None:
            if self.transport.is_closing():
                return
            if not self.transport.can_write_eof():
                self.transport.close()
                return
            self.transport.write_eof()
            self._discarding = True
            # closing, bounded in time and bytes: it no longer holds a place under --max-connections
            self.connections.discard(self)
            self.flow.resume_reading()  # keep reading, so the kernel's buffer drains instead of resetting
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(linger_s, self.transport.close)

        def send_400_response(self, msg: str) -> None:
            # a request the parser cannot take (a head over the limit, bad framing): the JSON shape too
            if self.cycle is not None and not self.cycle.response_complete and not self._discarding:
                # answered after the request in progress, not inside its answer; meanwhile what the
                # client sends is read and dropped (pausing would leave it blocked, and us waiting)
                self._refusal = msg
                return
            if self.transport.is_closing() or self._discarding:
                return
            self._count(None, 400)
            headers, body = _json_error(400, f"malformed HTTP request ({msg.rstrip('.')}): "
                                             "is a header, the URL or the head as a whole too large?")
            head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
            self.transport.write(head + body)
            # closing now, with the rest of a large head unread, makes the kernel answer with a reset
            # that can overtake the 400: send it and FIN, drop what still comes, close when the client
            # does (or after the linger)
            self._linger()

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
        begin_shutdown = getattr(self.config.app, "begin_shutdown", None)  # the RequestGuard
        if begin_shutdown is not None:
            begin_shutdown()  # bodies still arriving get 503 now, not at the end of their body timeout
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
