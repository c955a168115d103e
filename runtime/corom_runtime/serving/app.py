"""`corom serve`: an HTTP embedding server over the dynamic batcher (Starlette on uvicorn).

Endpoints: OpenAI-compatible `POST /v1/embeddings` and `GET /v1/models`, TEI's `POST /embed`
(`{"inputs": [...]}`), `POST /tokenize` and `GET /info`, `POST /similarity` (ModelScope's dict),
`GET /health`, Prometheus `GET /metrics`. The fields each route accepts are one table (`protocol`).
Whatever a client sends, the answer is a success or a 4xx/503 in one JSON error shape
(`http_errors`); the request guard (`guard`) checks Host/Origin, framing, size and time first;
uvicorn is run with head timeouts and a drain deadline (`runner`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import json
import logging
import math
import threading
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from corom_runtime.serving.batcher import BatcherSettings, DynamicBatcher
from corom_runtime.embedder import Chunking, Embedder, Shaping, Truncation
from corom_runtime.tokenization import DIRECTIONS
from corom_runtime.errors import InvalidInputError, positive_int
from corom_runtime.serving.http_errors import HTTPError, error_response, from_exception
from corom_runtime.serving.guard import LOOPBACK_HOSTS, GuardSettings, RequestGuard
from corom_runtime.serving.protocol import LANGCHAIN_TOKENS, check_fields, is_token_ids, model_names, served_model

log = logging.getLogger(__name__)

INTERNAL_ERRORS = "corom_http_internal_errors_total"


@dataclass(frozen=True)
class ServerSettings:
    # texts per request: OpenAI takes 2,048 (LangChain sends 1,000); the batcher splits them into batches,
    # and the queue (`batcher.max_queue`) bounds the texts in flight across requests
    max_items: int = 2048
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    # with a key set, full /health and /metrics need it too; without it /health answers liveness only
    public_health: bool = False
    allowed_hosts: tuple[str, ...] | None = None   # see guard; `serve` sets loopback names on loopback
    allowed_origins: tuple[str, ...] = ()
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    max_connections: int = 512
    max_header_bytes: int = 16 * 1024
    drain_s: float | None = None  # None: long enough for a full queue at the rate measured at start
    batcher: BatcherSettings = field(default_factory=BatcherSettings)

    def __post_init__(self) -> None:
        for name in ("max_items", "max_body_bytes", "max_connections", "max_header_bytes"):
            positive_int(getattr(self, name), f"server setting {name}")
        for name in ("body_timeout_s", "header_timeout_s", "drain_s"):
            value = getattr(self, name)
            if value is None and name == "drain_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value <= 3600:
                raise InvalidInputError(f"server setting {name} must be a number of seconds in (0, 3600], got {value!r}")
        if self.max_items > self.batcher.max_queue:
            raise InvalidInputError(f"--max-items {self.max_items} exceeds --max-queue {self.batcher.max_queue}: a "
                                    "request that large could never be queued; lower --max-items or raise --max-queue")


# Work on the event loop stalls every other request and /health: four clients posting 256-text
# bodies kept a /health probe waiting up to 2.5 s. Past these sizes, parsing, tokenizing and
# encoding run in a worker thread; below them the hop would cost more than the work.
OFFLOAD_BODY_BYTES = 16 * 1024
OFFLOAD_TEXT_CHARS = 8 * 1024
OFFLOAD_FLOATS = 16 * 1024
WATCH_AFTER_S = 0.05


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints of over 4,300 digits
        raise HTTPError(400, f"malformed JSON body: {str(exc)[:200]}") from exc
    except RecursionError as exc:
        raise HTTPError(400, "malformed JSON body: nested too deeply") from exc


async def _json(request: Request) -> Any:
    body = await request.body()
    return await asyncio.to_thread(_parse, body) if len(body) > OFFLOAD_BODY_BYTES else _parse(body)


async def _texts_body(request: Request, route: str, key: str) -> dict:
    """A route's JSON body: an object holding `key` (its texts) and only the fields `route` accepts."""
    body = await _json(request)
    if not isinstance(body, dict) or key not in body:
        raise HTTPError(400, f"body must be a JSON object with '{key}' (a string or a list of strings)")
    check_fields(route, body)
    return body


class VectorsResponse(Response):
    """JSON with numpy arrays rendered by orjson: float32 values in their shortest exact form (half the
    bytes of `json.dumps(arr.tolist())`, whose float64 repr prints 17 digits) in a tenth of the time
    (0.15 ms for one 384-d vector with the standard library)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


async def _respond(build: Callable[[], Response], floats: int) -> Response:
    """`build()` renders the JSON body; a large one is rendered off the event loop."""
    return await asyncio.to_thread(build) if floats > OFFLOAD_FLOATS else build()


def _texts(value: Any, field_name: str, max_items: int, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise HTTPError(400, f"'{field_name}' must be a string or a list of strings, got {_kind(value)}")
    if not value and not allow_empty:
        raise HTTPError(400, f"'{field_name}' is empty: send at least one text")
    if is_token_ids(value):  # before the size check: 1,000 ids are one text, not 1,000 items
        raise HTTPError(400, f"'{field_name}' holds {LANGCHAIN_TOKENS}")
    if len(value) > max_items:
        raise HTTPError(413, f"'{field_name}' has {len(value)} items; at most {max_items} per request (the server "
                             "flag --max-items sets it): split the request")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise HTTPError(400, f"'{field_name}'[{i}] is {_kind(item)}, not a string "
                                 "(token arrays are not accepted: send text)")
    return value


# Cohere's `input_type` -> the preset prompts that serve it, first found wins
INPUT_TYPES = {"search_query": ("query",), "search_document": ("passage", "document"),
               "classification": ("classification",), "clustering": ("clustering",)}


@dataclass(frozen=True)
class RequestOptions:
    """What one request asks for besides its texts: the prompt, the truncation, the output's shape."""

    prompt: str = ""
    cut: Truncation = Truncation()
    shaping: Shaping = Shaping()
    chunking: Chunking | None = None
    normalize: bool = False  # L2-normalize the pooled rows (TEI's `normalize: true` on a model that does not)
    # what the request's `input_type` did, for the answer's X-Corom-Input-Type header; None: not asked
    input_type_note: str | None = None

    def headers(self) -> dict[str, str] | None:
        return {"X-Corom-Input-Type": self.input_type_note} if self.input_type_note else None


def _prompt(embedder: Embedder, body: dict) -> tuple[str, str | None]:
    """The prompt before every text: `prompt_name` (TEI's field) or `input_type` (Cohere's), or none; and,
    where `input_type` was given, what it did (the answer's X-Corom-Input-Type header). An input_type
    the model has no prompt for is a no-op, said so: a client written for Cohere sends it to every model."""
    name, input_type = body.get("prompt_name"), body.get("input_type")
    if name is not None and input_type is not None:
        raise HTTPError(400, "give 'prompt_name' or 'input_type', not both")
    note = None
    if input_type is not None:
        if not isinstance(input_type, str) or input_type not in INPUT_TYPES:
            raise HTTPError(400, f"'input_type' must be one of {', '.join(INPUT_TYPES)}, got {str(input_type)[:40]!r}")
        name = next((n for n in INPUT_TYPES[input_type] if n in embedder.prompts), None)
        if name is None:
            return "", f"{input_type}: ignored, {embedder.info.model} has no {'/'.join(INPUT_TYPES[input_type])} prompt"
        note = f"{input_type}: prompt {name!r}"
    if name is None:
        return "", note
    if not isinstance(name, str):
        raise HTTPError(400, f"'prompt_name' must be a string, got {_kind(name)}")
    try:
        return embedder.prompt_text(prompt_name=name), note
    except ValueError as exc:
        raise HTTPError(400, str(exc)[:400]) from exc


def _normalize(embedder: Embedder, value: Any) -> bool:
    """TEI's `normalize`: whether to L2-normalize on top of the model's own convention. Absent keeps the
    model's convention (every surface returns the same vectors). Pooling and normalization are inside
    the exported graph, so a normalized model cannot give its un-normalized vectors: `false` is a 400."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HTTPError(400, f"'normalize' must be true or false, got {_kind(value)}")
    if not value and embedder.info.normalize:
        raise HTTPError(400, f"'normalize': false cannot be served: {embedder.info.model}'s vectors are L2-normalized "
                             "inside its exported graph (pooling and normalization are part of the model file), so "
                             "the un-normalized vector is not available; omit 'normalize' or send true")
    return value and not embedder.info.normalize


def _options(embedder: Embedder, body: dict) -> RequestOptions:
    """The request's prompt, truncation and output fields, checked: a bad one is a 400 naming it."""
    truncate, direction = body.get("truncate", True), body.get("truncation_direction", "right")
    if not isinstance(truncate, bool):
        raise HTTPError(400, f"'truncate' must be true or false, got {_kind(truncate)}")
    if direction not in DIRECTIONS:
        raise HTTPError(400, f"'truncation_direction' must be one of {', '.join(DIRECTIONS)}, got {str(direction)[:40]!r}")
    dims, precision = body.get("dimensions"), body.get("precision", "float32")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
        raise HTTPError(400, f"'dimensions' must be an integer from 1 to {embedder.dim}, got {_kind(dims)}")
    normalize = _normalize(embedder, body.get("normalize"))
    try:
        shaping = embedder.shaping(dims, precision, normalize)
    except ValueError as exc:  # out of range, unknown precision, an artifact without calibration
        raise HTTPError(400, str(exc).replace("truncate_dim", "'dimensions'").replace("precision", "'precision'", 1)[:400]) from exc
    try:
        chunking = Chunking.of(body.get("chunking"))
    except (ValueError, TypeError) as exc:
        raise HTTPError(400, f"'chunking': {str(exc)[:300]}") from exc
    prompt, note = _prompt(embedder, body)
    return RequestOptions(prompt, Truncation(truncate, direction), shaping, chunking, normalize, note)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def _shaped(ticket, rows: np.ndarray, options: RequestOptions) -> Any:
    """The request's answer: its rows (a chunked text's windows averaged) shaped as asked; for
    chunking pool "none", per text its windows' shaped rows and their character spans."""
    plan = ticket.plan
    shape = (lambda r: options.shaping.apply(_unit(r))) if options.normalize else options.shaping.apply
    if plan is None:
        return shape(rows)
    if options.chunking is not None and options.chunking.pool == "none":
        return [{"embeddings": shape(w), "spans": spans} for w, spans in zip(plan.windows(rows), plan.spans)]
    return shape(plan.pool(rows))


def _warm(warm_buckets: Callable[..., int], max_rows: int, stop: threading.Event) -> None:
    start = time.perf_counter()
    try:
        shapes = warm_buckets(max_rows, stop)
    except Exception:  # noqa: BLE001 - warming is an optimisation: a failure is logged, serving goes on
        log.exception("warming the shape buckets failed; they compile on first use instead")
        return
    log.info("warmed %d shape buckets in %.1f s", shapes, time.perf_counter() - start)


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "int", float: "float"}.get(type(value), type(value).__name__)


def _echo(value: Any, field_name: str) -> str | None:
    """A client string we echo back: it must be text that UTF-8 can carry (no lone surrogates)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise HTTPError(400, f"'{field_name}' must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPError(400, f"'{field_name}' is not valid Unicode text (a lone surrogate?)") from exc
    return value[:256]


def authorized(header: str | None, api_key: str | None) -> bool:
    """`Authorization: Bearer KEY` (scheme case-insensitive), compared as bytes in constant time."""
    if api_key is None:
        return True
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    # ASGI hands headers over as latin-1 text: back to the raw bytes, against the key's UTF-8 bytes
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                              api_key.encode("utf-8"))


def create_app(embedder: Embedder, settings: ServerSettings = ServerSettings(),
               warm_buckets: bool = False) -> RequestGuard:
    """The ASGI app. The batcher starts with the app and drains on shutdown (SIGTERM under uvicorn).
    `warm_buckets` (what `corom serve` does): once ready, compile every shape bucket in the background."""
    state: dict[str, Any] = {"ready": False, "batcher": None, "rate": None, "inflight": 0, "warmer": None}

    def batcher() -> DynamicBatcher:
        if state["batcher"] is None or not state["ready"]:
            raise HTTPError(503, "the server is starting or stopping")
        return state["batcher"]

    async def embed_texts(request: Request, texts: list[str],
                          options: RequestOptions = RequestOptions()) -> tuple[np.ndarray, int]:
        """Embeddings through the batcher, shaped as the request asked, and how many tokens the model
        saw. A client that goes away while its request is queued has it dropped before inference."""
        queue = batcher()
        heavy = sum(len(t) for t in texts) > OFFLOAD_TEXT_CHARS  # tokenizing happens in submit
        submit = functools.partial(queue.submit, texts, prompt=options.prompt, cut=options.cut, chunking=options.chunking)
        if heavy:
            ticket = await asyncio.to_thread(submit)
        else:
            # requests that arrived together all reach this line before any decides: only one alone in
            # flight may run inline (on the loop, one short inference); requests together are batched
            await asyncio.sleep(0)
            ticket = submit(inline=state["inflight"] == 1)
            if ticket.done():  # ran inline: the future holds the raw rows (windows), as from the worker
                return _shaped(ticket, ticket.future.result(), options), ticket.token_count
        result = asyncio.wrap_future(ticket.future)
        # a forced exit fails it after its handler is gone: retrieve the error so it is not logged as lost
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        # most answers come in milliseconds: only a request still waiting after WATCH_AFTER_S gets a
        # task that watches for its client leaving (creating one per request cost ~0.1 ms)
        done, _ = await asyncio.wait({result}, timeout=WATCH_AFTER_S)
        if done:
            return _shaped(ticket, result.result(), options), ticket.token_count
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result not in done:
            ticket.cancel()
            result.cancel()
            raise ClientDisconnect()
        return _shaped(ticket, result.result(), options), ticket.token_count

    def endpoint(handler, protected: bool = True):
        async def wrapped(request: Request) -> Response:
            if protected and not authorized(request.headers.get("authorization"), settings.api_key):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
            state["inflight"] += 1  # requests in their handlers now (one event-loop thread: no lock)
            try:
                return await handler(request)
            except ClientDisconnect:
                log.info("client %s went away before its answer", request.client)
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - every error leaves as the one JSON shape
                request_id = uuid.uuid4().hex[:16]
                error = from_exception(exc, request_id)
                if error.status == 500:
                    log.error("internal error on %s (request id %s)", request.url.path, request_id, exc_info=exc)
                    if state["batcher"] is not None:
                        state["batcher"].metrics.inc(INTERNAL_ERRORS)
                return error_response(error.status, error.message, error.kind, error.headers)
            finally:
                state["inflight"] -= 1
        return wrapped

    names = model_names(embedder.info.model, embedder.artifact.manifest.source,
                        embedder.artifact.manifest.source_preset)
    created = int(time.time())

    async def openai_embeddings(request: Request) -> Response:
        body = await _texts_body(request, "/v1/embeddings", "input")
        model = served_model(_echo(body.get("model"), "model"), names)
        texts = _texts(body["input"], "input", settings.max_items)
        options = _options(embedder, body)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise HTTPError(400, f"encoding_format must be 'float' or 'base64', got {str(fmt)[:40]!r}")
        precision = options.shaping.precision
        if options.chunking is not None and options.chunking.pool != "mean":
            raise HTTPError(400, "/v1/embeddings returns one vector per input: 'chunking' pool must be 'mean' "
                                 "(per-window vectors: /embed with pool 'none')")
        _echo(body.get("user"), "user")
        emb, tokens = await embed_texts(request, texts, options)

        def build() -> Response:
            data = []
            for i, row in enumerate(emb):
                # base64 is little-endian float32 in OpenAI's API, and every OpenAI client (the SDK asks
                # for it by default) decodes it so: int8/uint8/binary values go as exact float32 numbers
                value: Any = base64.b64encode(row.astype("<f4").tobytes()).decode() if fmt == "base64" else row
                item = {"object": "embedding", "index": i, "embedding": value}
                if precision != "float32":
                    item["dtype"] = str(row.dtype)  # the values' type (base64: carried as float32)
                data.append(item)
            return VectorsResponse({"object": "list", "data": data, "model": model,
                                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                                   headers=options.headers())
        return await _respond(build, emb.size)

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card()]})

    async def get_model(request: Request) -> Response:
        served_model(request.path_params["model"], names)
        return JSONResponse(_model_card())

    def _model_card() -> dict:
        return {"id": names[0], "object": "model", "created": created, "owned_by": "corom",
                "aliases": list(names[1:])}

    async def info(request: Request) -> Response:
        """TEI's /info, with what we add (variant, engine, device, dimensions)."""
        from corom_runtime import __version__

        b = settings.batcher
        return JSONResponse({
            "model_id": names[0], "model_sha": None, "model_dtype": embedder.info.precision,
            "model_type": {"embedding": {"pooling": embedder.info.pooling}},
            "max_concurrent_requests": settings.max_connections, "max_input_length": embedder.info.max_length,
            "max_batch_tokens": b.max_batch_tokens, "max_batch_requests": b.max_batch_size,
            "max_client_batch_size": settings.max_items, "tokenization_workers": None,
            "version": __version__, "normalize": embedder.info.normalize, "dimensions": embedder.dim,
            "variant": embedder.variant, "engine": embedder.info.engine, "device": embedder.info.device,
            "prompts": embedder.prompts})

    async def tokenize(request: Request) -> Response:
        """TEI's /tokenize: per input, its tokens as {id, text, special, start, stop} (character offsets)."""
        body = await _texts_body(request, "/tokenize", "inputs")
        texts = _texts(body["inputs"], "inputs", settings.max_items)
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise HTTPError(400, f"'add_special_tokens' must be true or false, got {_kind(special)}")
        prompt, _ = _prompt(embedder, body)
        run = functools.partial(token_spans, embedder, texts, prompt, special)
        heavy = sum(len(t) for t in texts) > OFFLOAD_TEXT_CHARS
        return JSONResponse(await asyncio.to_thread(run) if heavy else run())

    async def embed(request: Request) -> Response:
        body = await _texts_body(request, "/embed", "inputs")
        texts = _texts(body["inputs"], "inputs", settings.max_items)
        options = _options(embedder, body)
        emb, _ = await embed_texts(request, texts, options)
        if isinstance(emb, list):  # chunking pool "none": [{"embeddings": [[...], ...], "spans": [[start, end], ...]}]
            return await _respond(lambda: VectorsResponse(emb, headers=options.headers()),
                                  sum(e["embeddings"].size for e in emb))
        return await _respond(lambda: VectorsResponse(emb, headers=options.headers()), emb.size)

    async def similarity(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict) or "source_sentence" not in body:
            raise HTTPError(400, "body must be ModelScope's {'source_sentence': [text], 'sentences_to_compare': [texts]}")
        check_fields("/similarity", body)
        with_embeddings = body.get("return_embeddings", True)
        if not isinstance(with_embeddings, bool):
            raise HTTPError(400, f"'return_embeddings' must be true or false, got {_kind(with_embeddings)}")
        source = _texts(body["source_sentence"], "source_sentence", max(2, settings.max_items))
        if len(source) != 1:
            raise HTTPError(400, f"'source_sentence' must hold exactly one text, got {len(source)}")
        compare = _texts(body.get("sentences_to_compare", []), "sentences_to_compare", settings.max_items - 1,
                         allow_empty=True)
        emb, _ = await embed_texts(request, source + compare)
        scores = embedder.similarity(emb[:1], emb[1:])[0] if compare else []
        if not with_embeddings:
            return VectorsResponse({"scores": scores})
        return await _respond(lambda: VectorsResponse({"text_embedding": emb, "scores": scores}), emb.size)

    async def health(request: Request) -> Response:
        b = state["batcher"]
        status = "starting" if b is None else "ok" if state["ready"] and b.healthy else "unavailable"
        code = 200 if status == "ok" else 503
        if not (settings.public_health or authorized(request.headers.get("authorization"), settings.api_key)):
            return JSONResponse({"status": status}, code)  # liveness only: no details without the key
        return JSONResponse({"status": status, "model": embedder.info.model, "variant": embedder.variant,
                             "engine": embedder.info.engine, "device": embedder.info.device,
                             "fidelity": embedder.info.fidelity, "tiers": embedder.info.tiers,
                             "queued": b.queued if b else 0, "worker_alive": bool(b and b.healthy),
                             # shape buckets still compiling in the background: latency not yet steady
                             "warming": bool(state["warmer"] is not None and state["warmer"].is_alive()),
                             # where this variant's gate was verified: the manifest's record for this CPU,
                             # a cached verdict or a check run at start (`cpu_check`)
                             "verified": {k: embedder.info.verified.get(k) for k in ("passed", "source", "platform")}},
                            code)

    async def metrics(request: Request) -> Response:
        if not (settings.public_health or authorized(request.headers.get("authorization"), settings.api_key)):
            return error_response(401, "missing or wrong API key: /metrics needs 'Authorization: Bearer KEY'")
        text = state["batcher"].metrics.render() if state["batcher"] else ""
        text += state["http_metrics"].render() if state.get("http_metrics") else ""  # the guard's, by route/status
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["rate"] = measure_rate(embedder)
        # the measured speed bounds inline work by time: it holds the event loop (and /health) meanwhile
        state["batcher"] = DynamicBatcher(embedder, settings.batcher,
                                          seconds_per_token=1.0 / (state["rate"] * embedder.artifact.max_length))
        state["batcher"].metrics.counter(INTERNAL_ERRORS, "requests answered 500: a bug, logged with its request id")
        state["ready"] = True
        log.info("serving %s (%s on %s, %.0f long texts/s)", embedder.info.model, embedder.variant,
                 embedder.info.device, state["rate"])
        warm = getattr(embedder.session, "warm_buckets", None) if warm_buckets else None
        stop_warming = threading.Event()
        warmer = threading.Thread(target=_warm, args=(warm, settings.batcher.max_batch_size, stop_warming),
                                  name="corom-warm", daemon=True)
        if warm is not None:  # an engine that compiles per shape: every bucket now, in the background
            warmer.start()
            state["warmer"] = warmer
            state["batcher"].warming = warmer.is_alive  # no inline run while a first-hit compile may stall it
        try:
            yield
        except asyncio.CancelledError:  # a forced exit (second signal): no drain, answer nobody
            stop_warming.set()
            if warmer.is_alive():
                warmer.join(10)  # one inference at most: OpenVINO aborts a process exiting under it
            state["ready"] = False
            state["batcher"].abandon_queued("the server was stopped")
            state["batcher"].close(timeout=5)
            raise
        stop_warming.set()
        if warmer.is_alive():
            warmer.join(10)  # one inference at most
        state["ready"] = False
        state["batcher"].close()  # finishes every accepted request not abandoned at the drain deadline
        log.info("batcher drained; stopped")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        # exc.headers: a 405's Allow
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", headers=exc.headers)

    routes = [
        Route("/v1/embeddings", endpoint(openai_embeddings), methods=["POST"]),
        Route("/embed", endpoint(embed), methods=["POST"]),
        Route("/similarity", endpoint(similarity), methods=["POST"]),
        Route("/v1/models", endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(get_model), methods=["GET"]),
        Route("/info", endpoint(info), methods=["GET"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/health", endpoint(health, protected=False), methods=["GET"]),
        Route("/metrics", endpoint(metrics, protected=False), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.corom = state
    app.router.redirect_slashes = False  # '/health/' is a JSON 404, not a 307 to a Location built from the Host
    guard = RequestGuard(app, GuardSettings(settings.max_body_bytes, settings.body_timeout_s,
                                            settings.allowed_hosts, settings.allowed_origins))
    guard.state = state  # type: ignore[attr-defined]
    state["http_metrics"] = guard.metrics
    return guard


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (after the body, the next message can only be that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def token_spans(embedder: Embedder, texts: list[str], prompt: str, special: bool) -> list[list[dict]]:
    """TEI's /tokenize answer: per text (after `prompt`, cut at the model's window as it is embedded),
    its tokens with their ids, their text (the special token's own for a special one) and character offsets."""
    from corom_runtime.tokenization import _clean  # lone surrogates -> U+FFFD, as when embedding

    tokenizer = embedder.tokenizer._tokenizer  # the truncating tokenizer the model's inputs come from
    out = []
    fulls = [_clean(prompt + t) for t in texts]
    for full, e in zip(fulls, tokenizer.encode_batch(fulls, add_special_tokens=special)):
        out.append([{"id": i, "text": tok if s else full[a:b], "special": bool(s), "start": a, "stop": b}
                    for i, tok, s, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets)])
    return out


def measure_rate(embedder: Embedder, batch: int = 16) -> float:
    """Texts/s of full-length texts on this machine (warms the session up too): the drain deadline's base."""
    text = " ".join(["measure"] * (embedder.artifact.max_length * 2))
    embedder.encode([text] * 2)
    start = time.perf_counter()
    embedder.encode([text] * batch, batch_size=batch)
    return batch / max(time.perf_counter() - start, 1e-6)


def drain_seconds(max_queue: int, rate: float) -> float:
    """Time to finish a full queue of full-length texts at `rate`, with margin (10 s to 10 min)."""
    return float(min(600.0, max(10.0, 1.5 * max_queue / max(rate, 1e-3) + 5.0)))


def default_max_items(max_items: int, max_queue: int) -> int:
    """`--max-items` left at its default follows a smaller `--max-queue` (a request must fit the queue);
    one given explicitly above it stays, and `ServerSettings` refuses the pair naming both flags."""
    if max_items == ServerSettings.max_items and isinstance(max_queue, int) and 0 < max_queue < max_items:
        return max_queue
    return max_items


def server_settings_from_args(args) -> ServerSettings:
    """`corom serve`'s flags as checked settings: one mapping for `corom serve` and `--ray` (a bad flag
    fails here, before any model loads)."""
    loopback = args.host in LOOPBACK_HOSTS
    hosts = tuple(args.allowed_host) if args.allowed_host else (LOOPBACK_HOSTS if loopback else None)
    return ServerSettings(
        max_items=default_max_items(args.max_items, args.max_queue), max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("COROM_API_KEY") or None, public_health=args.public_health,
        allowed_hosts=hosts, allowed_origins=tuple(args.allowed_origin or ()),
        body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
        max_connections=args.max_connections, drain_s=args.drain_seconds,
        batcher=BatcherSettings(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                                max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                                inline_max_tokens=args.inline_max_tokens,
                                inline_max_ms=getattr(args, "inline_max_ms", BatcherSettings.inline_max_ms)),
    )


def serve(args) -> int:
    """Run the server for the CLI's parsed `args` (see `corom serve --help`). Exit status 0 after a drain."""
    import uvicorn

    from corom_runtime.serving.runner import DrainingServer, guarded_protocol

    loopback = args.host in LOOPBACK_HOSTS
    settings = server_settings_from_args(args)
    # settings are checked before the model loads: a bad flag fails in milliseconds, not after a load
    embedder = Embedder.load(args.model, variant=args.variant, device=args.device, threads=args.threads,
                             allow_fallback=args.allow_fallback, fidelity=getattr(args, "fidelity", None))
    if not loopback and settings.api_key is None:
        log.warning("binding %s without an API key: anyone who can reach it can use it", args.host)
    app = create_app(embedder, settings, warm_buckets=True)  # a long-running server: compile every shape once
    state = app.state  # type: ignore[attr-defined]
    def drain() -> float:  # decided at the signal: the rate is measured when the app starts
        return settings.drain_s or drain_seconds(settings.batcher.max_queue, state["rate"] or 1.0)

    def on_deadline() -> int:
        return state["batcher"].abandon_queued("the server is shutting down: retry elsewhere") if state["batcher"] else 0

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info",
        http=guarded_protocol(settings.header_timeout_s, settings.max_header_bytes),
        limit_concurrency=settings.max_connections, loop="auto",  # uvloop where installed ([serve] has it)
        timeout_keep_alive=5, access_log=args.access_log,
    )
    server = DrainingServer(config, drain, on_deadline)
    started = time.perf_counter()
    server.run()
    log.info("server ran %.0fs", time.perf_counter() - started)
    return 1 if server.forced else 0
