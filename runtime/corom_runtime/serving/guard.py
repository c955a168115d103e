"""ASGI middleware that checks a request before any route sees it.

- Host and Origin against an allow-list (a server bound to loopback must not be driven by a web page
  through DNS rebinding or a cross-site form: 403); a malformed Host, or a Host, Content-Type or
  Content-Length given twice, is a 400 (HTTP says so: the last one winning is how smuggling starts);
- browsers' CORS: with `allowed_origins`, Starlette's `CORSMiddleware` answers preflights and marks
  allowed answers (Access-Control-Allow-Origin); every other Origin is refused with 403;
- POST bodies must say `application/json` (415: a browser cannot send that cross-site without a
  preflight), and may not carry both Content-Length and Transfer-Encoding (400, request smuggling);
- a declared body over the size limit is refused at once (413, Connection: close) without reading it,
  so `Expect: 100-continue` clients never upload it; a body is bounded in total time (408 once
  `body_timeout_s` has passed since the request head, however the bytes trickle in), and on shutdown a
  body still arriving is cut off with 503 (`begin_shutdown`);
- an answer that leaves a request body unread (401, 404, 405, 413, 415, 408 ...) says Connection: close:
  the unread bytes are never parsed as a next request (the protocol drops them, see `runner`);
- every answer is counted by route and status (`corom_http_responses_total`): the route label is one
  of the app's paths or "other", never the client's text.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

from corom_runtime.serving.http_errors import HTTPError, error_response
from corom_runtime.serving.metrics import Metrics

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
HTTP_RESPONSES = "corom_http_responses_total"
# a Host header: a name or IPv4 address, or a bracketed IPv6 address, with an optional port (RFC 9110 7.2)
_HOST = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::\d{0,5})?")
# headers that HTTP allows once: a second copy is a 400, not "the last one wins"
_SINGLE = (b"host", b"content-type", b"content-length")
# health checks probe 127.0.0.1 from inside the container whatever --allowed-host names
_HEALTH = "/health"


@dataclass(frozen=True)
class GuardSettings:
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 10.0  # the whole body, counted from the request head
    # None: no Host check (a server bound to a public address is reached by names we cannot know)
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()


def host_of(value: str) -> str | None:
    """'localhost:8080' -> 'localhost'; '[::1]:80' -> '::1'; None for anything that is not a host
    (such as '[localhost]evil.com', 'a b', 'host:port:port')."""
    match = _HOST.fullmatch(value.strip().lower())
    if match is None:
        return None
    return match.group("v6") or match.group("name")


def _is_loopback(client) -> bool:
    try:
        return bool(client) and ip_address(client[0]).is_loopback
    except ValueError:
        return False


def check_host_and_origin(headers: dict[bytes, bytes], settings: GuardSettings, path: str = "",
                          client: tuple[str, int] | None = None) -> None:
    """Raise `HTTPError` for a malformed Host (400) or a Host or Origin outside the allow-lists (403):
    a pure decision. Origins: with `allowed_origins`, an Origin must be one of them (or name an allowed
    host); without it, on a Host-checked server, it must name an allowed host."""
    raw_host = headers.get(b"host", b"").decode("latin-1")
    host = host_of(raw_host)
    if host is None:
        raise HTTPError(400, f"malformed Host header {raw_host[:100]!r}: send a host name or address, "
                             "with an optional port")
    allowed = {h.lower() for h in settings.allowed_hosts} if settings.allowed_hosts is not None else None
    exempt = path == _HEALTH and host in LOOPBACK_HOSTS and _is_loopback(client)
    if allowed is not None and "*" not in allowed and host not in allowed and not exempt:
        # the allow-list is not echoed: it tells a stranger which names the server answers to
        raise HTTPError(403, f"Host {raw_host[:100]!r} is not allowed; start the server with "
                             "--allowed-host NAME to serve it")
    origin = headers.get(b"origin")
    if origin is None or (allowed is None and not settings.allowed_origins):
        return  # no browser, or a public server with neither list: the API key is the protection
    text = origin.decode("latin-1")
    if text in settings.allowed_origins:
        return
    origin_host = host_of(urlsplit(text).netloc) if "://" in text else None
    if allowed is None or origin_host is None or origin_host not in allowed:
        raise HTTPError(403, f"Origin {text[:100]!r} is not allowed; start the server with "
                             f"--allowed-origin ORIGIN to let that web page call it")


def check_duplicates(raw_headers: list[tuple[bytes, bytes]]) -> None:
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in _SINGLE:
            if name in seen:
                raise HTTPError(400, f"the {name.decode()} header is given twice; send it once")
            seen.add(name)


def check_framing(method: str, headers: dict[bytes, bytes]) -> None:
    if method != "POST":
        return
    if b"content-length" in headers and b"transfer-encoding" in headers:
        raise HTTPError(400, "a request may not carry both Content-Length and Transfer-Encoding")
    media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if media != b"application/json":
        raise HTTPError(415, f"Content-Type must be application/json, not {media.decode('latin-1')[:60] or 'absent'}")


def declared_body(headers: dict[bytes, bytes], max_body_bytes: int) -> bool:
    """Whether the request carries a body; raise 400 for a bad Content-Length, 413 (to close) for one
    over the limit: refused before a byte of it is read."""
    declared = headers.get(b"content-length")
    if declared is None:
        return b"transfer-encoding" in headers
    if not declared.strip().isdigit():
        raise HTTPError(400, "Content-Length must be a whole number")
    size = int(declared)
    if size > max_body_bytes:
        raise HTTPError(413, f"request body of {size} bytes is over the {max_body_bytes}-byte limit")
    return size > 0


def _timeout_at(when: float):
    """`asyncio.timeout_at` (3.11+), whose deadline `begin_shutdown` can pull in; None before 3.11."""
    return asyncio.timeout_at(when) if hasattr(asyncio, "timeout_at") else None


class RequestGuard:
    """The middleware (see the module doc); `app` is the Starlette app it protects."""

    def __init__(self, app, settings: GuardSettings) -> None:
        self.routes = frozenset(getattr(route, "path", "") for route in getattr(app, "routes", ()))
        if settings.allowed_origins:
            from starlette.middleware.cors import CORSMiddleware

            app = CORSMiddleware(app, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "content-type"], max_age=600)
        self.app, self.settings = app, settings
        self.metrics = Metrics()
        self.metrics.labelled_counter(HTTP_RESPONSES, "HTTP answers by route (a path of the app or 'other') and "
                                                      "status, the guard's and the protocol's refusals included",
                                      ("route", "status"))
        self.stopping = False
        self._reading: set = set()  # the deadlines of bodies being read now
        self._loop: asyncio.AbstractEventLoop | None = None

    def count(self, path: str | None, status: int) -> None:
        route = "none" if path is None else path if path in self.routes else "other"
        self.metrics.inc_labelled(HTTP_RESPONSES, (route, str(int(status))))

    def begin_shutdown(self) -> None:
        """The server is stopping: bodies still arriving are cut off with 503 (thread- and signal-safe)."""
        self.stopping = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._expire_all)

    def _expire_all(self) -> None:
        for deadline in list(self._reading):
            if not deadline.expired():
                deadline.reschedule(self._loop.time())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        raw = list(scope.get("headers") or [])
        headers = dict(raw)
        has_body = False

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.count(path, message["status"])
            await send(message)

        try:
            check_duplicates(raw)
            check_host_and_origin(headers, self.settings, path, scope.get("client"))
            check_framing(scope["method"], headers)
            has_body = declared_body(headers, self.settings.max_body_bytes)
        except HTTPError as exc:
            extra = {"Connection": "close"} if has_body or b"content-length" in headers \
                or b"transfer-encoding" in headers else {}
            return await error_response(exc.status, exc.message, exc.kind, {**(exc.headers or {}), **extra})(
                scope, receive, counted_send)

        self._loop = self._loop or asyncio.get_running_loop()
        timeout_s = self.settings.body_timeout_s
        deadline_at = self._loop.time() + timeout_s
        seen = 0
        body_done = not has_body
        started = False

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            if self.stopping:
                raise _stopping()
            cm = _timeout_at(deadline_at)
            try:
                if cm is None:  # Python 3.10: no deadline to pull in at shutdown
                    message = await asyncio.wait_for(receive(), max(0.0, deadline_at - self._loop.time()))
                else:
                    self._reading.add(cm)
                    try:
                        async with cm:
                            message = await receive()
                    finally:
                        self._reading.discard(cm)
            except (asyncio.TimeoutError, TimeoutError):
                if self.stopping:
                    raise _stopping() from None
                raise HTTPError(408, f"the request body did not arrive within {timeout_s:g}s of its head",
                                headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.settings.max_body_bytes:
                    raise HTTPError(413, f"request body is over the {self.settings.max_body_bytes}-byte limit",
                                    headers={"Connection": "close"})
            return message

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers_out = list(message.get("headers", []))
                if not body_done and not any(k.lower() == b"connection" for k, _ in headers_out):
                    # answered before the body was read: its bytes must never be parsed as a next request
                    message = {**message, "headers": [*headers_out, (b"connection", b"close")]}
            await counted_send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except HTTPError as exc:
            if not started:
                await error_response(exc.status, exc.message, exc.kind, exc.headers)(scope, receive, counted_send)


def _stopping() -> HTTPError:
    return HTTPError(503, "the server is shutting down and the request body was not complete: retry elsewhere",
                     headers={"Connection": "close"})

