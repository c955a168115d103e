"""`corom serve`: an HTTP embedding server over the dynamic batcher (Starlette on uvicorn).

Endpoints: OpenAI-compatible `POST /v1/embeddings`, `POST /embed` (`{"inputs": [...]}`),
`POST /similarity` (ModelScope's dict), `GET /health`, Prometheus `GET /metrics`.
Bad input gets a 4xx with a message; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .dynamic_batcher import BatcherSettings, DynamicBatcher
from .embedder import Embedder
from .errors import BatcherClosedError, OverloadedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    max_items: int = 256
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    batcher: BatcherSettings = BatcherSettings()


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    # OpenAI's error shape, which its client turns into a readable exception
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413, before reading all of it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"request body of {int(declared)} bytes is over the {self.limit}-byte limit")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPError(413, f"request body is over the {self.limit}-byte limit")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except HTTPError as exc:
            await _error(exc.status, exc.message)(scope, receive, send)


async def _json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"malformed JSON body: {exc}") from exc


def _texts(value: Any, field: str, max_items: int, allow_single: bool = True) -> list[str]:
    if isinstance(value, str) and allow_single:
        value = [value]
    if not isinstance(value, list):
        raise HTTPError(400, f"'{field}' must be a string or a list of strings, got {type(value).__name__}")
    if not value:
        raise HTTPError(400, f"'{field}' is empty: send at least one text")
    if len(value) > max_items:
        raise HTTPError(413, f"'{field}' has {len(value)} items; at most {max_items} per request")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise HTTPError(400, f"'{field}'[{i}] is {type(item).__name__}, not a string "
                                 "(token arrays are not accepted: send text)")
    return value


def create_app(embedder: Embedder, settings: ServerSettings = ServerSettings()) -> Starlette:
    """The ASGI app. The batcher starts with the app and drains on shutdown (SIGTERM under uvicorn)."""
    state: dict[str, Any] = {"ready": False, "batcher": None}

    def batcher() -> DynamicBatcher:
        if state["batcher"] is None or not state["ready"]:
            raise HTTPError(503, "the server is starting or stopping", "server_error")
        return state["batcher"]

    async def embed_texts(texts: list[str]) -> tuple[np.ndarray, int]:
        """Embeddings through the batcher, and how many tokens the model saw."""
        try:
            future = batcher().submit(texts)
            return await asyncio.wrap_future(future), future.token_count
        except OverloadedError as exc:
            raise HTTPError(503, str(exc), "overloaded") from exc
        except BatcherClosedError as exc:
            raise HTTPError(503, str(exc), "server_error") from exc

    def endpoint(handler):
        async def wrapped(request: Request) -> Response:
            if settings.api_key is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                    return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error")
            try:
                return await handler(request)
            except HTTPError as exc:
                headers = {"Retry-After": "1"} if exc.status == 503 else None
                return _error(exc.status, exc.message, exc.kind, headers)
        return wrapped

    async def openai_embeddings(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict) or "input" not in body:
            raise HTTPError(400, "body must be a JSON object with 'input' (a string or a list of strings)")
        texts = _texts(body["input"], "input", settings.max_items)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise HTTPError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}")
        dims = body.get("dimensions")
        if dims is not None and dims != embedder.dim:
            raise HTTPError(400, f"this model's embeddings have {embedder.dim} dimensions; 'dimensions' cannot change that")
        emb, tokens = await embed_texts(texts)
        data = []
        for i, row in enumerate(emb):
            value: Any = base64.b64encode(row.astype("<f4").tobytes()).decode() if fmt == "base64" else row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse({"object": "list", "data": data, "model": body.get("model") or embedder.info.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def embed(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict) or "inputs" not in body:
            raise HTTPError(400, "body must be a JSON object with 'inputs' (a string or a list of strings)")
        emb, _ = await embed_texts(_texts(body["inputs"], "inputs", settings.max_items))
        return JSONResponse(emb.tolist())

    async def similarity(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict) or "source_sentence" not in body:
            raise HTTPError(400, "body must be ModelScope's {'source_sentence': [text], 'sentences_to_compare': [texts]}")
        source = _texts(body["source_sentence"], "source_sentence", 1)
        compare = body.get("sentences_to_compare") or []
        compare = _texts(compare, "sentences_to_compare", settings.max_items - 1) if compare else []
        emb, _ = await embed_texts(source + compare)
        scores = embedder.similarity(emb[:1], emb[1:])[0].tolist() if compare else []
        return JSONResponse({"text_embedding": emb.tolist(), "scores": scores})

    async def health(request: Request) -> Response:
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, 503)
        return JSONResponse({"status": "ok", "model": embedder.info.model, "variant": embedder.variant,
                             "device": embedder.info.device, "queued": state["batcher"].queued})

    async def metrics(request: Request) -> Response:
        text = state["batcher"].metrics.render() if state["batcher"] else ""
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        embedder.encode(["warm up the session before reporting healthy"])
        state["batcher"] = DynamicBatcher(embedder, settings.batcher)
        state["ready"] = True
        log.info("serving %s (%s on %s)", embedder.info.model, embedder.variant, embedder.info.device)
        try:
            yield
        finally:
            state["ready"] = False
            state["batcher"].close()  # finishes every accepted request
            log.info("batcher drained; stopped")

    routes = [
        Route("/v1/embeddings", endpoint(openai_embeddings), methods=["POST"]),
        Route("/embed", endpoint(embed), methods=["POST"]),
        Route("/similarity", endpoint(similarity), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.corom = state
    return BodyLimit(app, settings.max_body_bytes)


def serve(args) -> int:
    """Run the server for the CLI's parsed `args` (see `corom serve --help`)."""
    import uvicorn

    embedder = Embedder.load(args.model, variant=args.variant, device=args.device, threads=args.threads,
                             allow_fallback=args.allow_fallback)
    settings = ServerSettings(
        max_items=args.max_items, max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("COROM_API_KEY"),
        batcher=BatcherSettings(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                                max_wait_ms=args.max_wait_ms, max_queue=args.max_queue),
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("binding %s without an API key: anyone who can reach it can use it", args.host)
    started = time.perf_counter()
    uvicorn.run(create_app(embedder, settings), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=30)
    log.info("server ran %.0fs", time.perf_counter() - started)
    return 0
