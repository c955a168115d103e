"""ASGI middleware that checks a request before any route sees it.

- Host and Origin against an allow-list (a server bound to loopback must not be driven by a web page
  through DNS rebinding or a cross-site form: 403);
- POST bodies must say `application/json` (415: a browser cannot send that cross-site without a
  preflight), and may not carry both Content-Length and Transfer-Encoding (400, request smuggling);
- the body is bounded in size (413, after reading the rest of a modest excess so that the client
  sees the answer instead of a reset) and in time (408: a client that stalls mid-body is cut off).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from corom_runtime.serving.http_errors import HTTPError, error_response

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class GuardSettings:
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 10.0
    # None: no Host check (a server bound to a public address is reached by names we cannot know)
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()


def host_of(value: str) -> str:
    """'localhost:8080' -> 'localhost'; '[::1]:80' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def check_host_and_origin(headers: dict[bytes, bytes], settings: GuardSettings) -> None:
    """Raise `HTTPError(403)` for a Host or Origin outside the allow-list (a pure decision)."""
    if settings.allowed_hosts is None:
        return
    allowed = {h.lower() for h in settings.allowed_hosts}
    host = headers.get(b"host", b"").decode("latin-1")
    if "*" not in allowed and host_of(host) not in allowed:
        raise HTTPError(403, f"Host {host!r} is not allowed (allowed: {sorted(allowed)}); "
                             "start the server with --allowed-host NAME to serve it")
    origin = headers.get(b"origin")
    if origin is not None:
        text = origin.decode("latin-1")
        if text not in settings.allowed_origins and host_of(urlsplit(text).netloc) not in allowed:
            raise HTTPError(403, f"Origin {text!r} is not allowed; start the server with --allowed-origin {text} "
                                 "to let that web page call it")


def check_framing(method: str, headers: dict[bytes, bytes]) -> None:
    if method != "POST":
        return
    if b"content-length" in headers and b"transfer-encoding" in headers:
        raise HTTPError(400, "a request may not carry both Content-Length and Transfer-Encoding")
    media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if media != b"application/json":
        raise HTTPError(415, f"Content-Type must be application/json, not {media.decode('latin-1') or 'absent'}")


class RequestGuard:
    """The middleware (see the module doc); `app` is the Starlette app it protects."""

    def __init__(self, app, settings: GuardSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            check_host_and_origin(headers, self.settings)
            check_framing(scope["method"], headers)
            declared = headers.get(b"content-length")
            if declared is not None:
                if not declared.strip().isdigit():
                    raise HTTPError(400, "Content-Length must be a whole number")
                if int(declared) > self.settings.max_body_bytes:
                    await self._discard(receive, int(declared))
                    raise HTTPError(413, f"request body of {int(declared)} bytes is over the "
                                         f"{self.settings.max_body_bytes}-byte limit", headers={"Connection": "close"})
        except HTTPError as exc:
            return await error_response(exc.status, exc.message, exc.kind, exc.headers)(scope, receive, send)

        seen = 0
        body_done = False
        started = False

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.settings.body_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPError(408, f"the request body did not arrive within {self.settings.body_timeout_s:g}s",
                                headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.settings.max_body_bytes:
                    raise HTTPError(413, f"request body is over the {self.settings.max_body_bytes}-byte limit",
                                    headers={"Connection": "close"})
            return message

        async def tracking_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except HTTPError as exc:
            if not started:
                await error_response(exc.status, exc.message, exc.kind, exc.headers)(scope, receive, send)

    async def _discard(self, receive, declared: int) -> None:
        """Read (and drop) a body of modest excess, so the client is not reset while still sending."""
        if declared > 8 * self.settings.max_body_bytes:
            return
        read = 0
        while read < declared:
            try:
                message = await asyncio.wait_for(receive(), self.settings.body_timeout_s)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
