"""Dynamic batching: many concurrent callers, one inference per batch.

One worker thread owns the queue. Each entry carries its reply channel (a future) and its timings.
The worker closes a batch when it holds `max_batch_size` texts or `max_batch_tokens` padded tokens,
or when the oldest entry has waited `max_wait_ms`; the batch is sorted by length, run once, and each
caller gets exactly its own rows. Cancelled entries are dropped; a full queue refuses new work
(`OverloadedError`) instead of growing without bound; `close()` drains what was accepted.

A small request that finds the batcher idle (nothing queued, nothing running) may run at once in the
caller's thread: there is nobody to batch it with, and handing it to the worker and back costs two
thread wake-ups (0.15 ms of a 2.5 ms served query, docs/decisions.md). Requests arriving meanwhile
queue as usual and the worker takes them when it is done. Only a caller that blocks anyway opts in
(`encode`; the server for a request alone in flight): an event loop that ran every request inline
would serialize them and never batch. An inline request blocks its caller for the inference: on an event
loop, every other request and /health wait for it, so the server bounds inline work by *time* (the
speed it measured at start, `seconds_per_token`), not by tokens alone, and never runs inline while the
shape buckets compile (a first-hit compile takes far longer than the estimate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from corom_runtime.embedder import ChunkPlan, Chunking, Embedder, Truncation
from corom_runtime.errors import BatcherClosedError, InvalidInputError, OverloadedError, RequestTooLargeError, positive_int
from corom_runtime.serving.metrics import SIZE_BUCKETS, Metrics
from corom_runtime.tokenization import TokenizedText, check_texts

log = logging.getLogger(__name__)


MAX_WAIT_MS = 60_000.0


@dataclass(frozen=True)
class BatcherSettings:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    # 0 = greedy: when the worker is free it takes whatever is queued; requests that arrive during an
    # inference form the next batch (faster on CPUs: docs/decisions.md). A positive value makes a free
    # worker linger for fuller batches, which pays where a batch costs little more than one input (GPUs).
    max_wait_ms: float = 0.0
    max_queue: int = 4096  # texts waiting, across all entries
    # an idle batcher may run a request of at most this many padded tokens (texts x longest) in the
    # caller's thread (module doc); 0: every request goes through the worker. 512: a few ms of
    # inference at most, about what a request arriving meanwhile would wait for the worker anyway
    inline_max_tokens: int = 512
    # and, where the batcher knows this machine's speed (`DynamicBatcher(seconds_per_token=...)`: the
    # server measures it at start), at most this many milliseconds of estimated inference: the time an
    # inline request holds the event loop (and /health). 0: never inline where the speed is known
    inline_max_ms: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue"):
            positive_int(getattr(self, name), f"batcher setting {name}")
        inline = self.inline_max_tokens
        if isinstance(inline, bool) or not isinstance(inline, int) or inline < 0:
            raise InvalidInputError(f"batcher setting inline_max_tokens must be a whole number of at least 0, got {inline!r}")
        ms = self.inline_max_ms
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or not 0 <= ms <= MAX_WAIT_MS:
            raise InvalidInputError(f"batcher setting inline_max_ms must be a finite number from 0 to {MAX_WAIT_MS}, got {ms!r}")
        wait = self.max_wait_ms
        # inf would make the worker wait forever (and time.sleep(inf) raises); nan never compares true
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait) \
                or not 0 <= wait <= MAX_WAIT_MS:
            raise InvalidInputError(f"batcher setting max_wait_ms must be a finite number from 0 to {MAX_WAIT_MS}, got {wait!r}")


@dataclass
class RequestTimings:
    """Seconds a request spent tokenizing (in the caller), queued, and in its batch's inference."""

    tokenize_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_texts: int = 0


@dataclass
class Ticket:
    """What `submit` hands the caller: the future of its rows, its timings and its token count."""

    future: Future
    timings: RequestTimings = field(default_factory=RequestTimings)
    token_count: int = 0
    # a chunked request: the future holds its windows' rows; `plan.pool` turns them into its texts'
    plan: ChunkPlan | None = None

    def result(self, timeout: float | None = None) -> np.ndarray:
        """float32 `[texts, dim]`, in the order submitted (a chunked text: its windows, averaged)."""
        rows = self.future.result(timeout)
        return self.plan.pool(rows) if self.plan is not None else rows

    def cancel(self) -> bool:
        """Drop the request if it is still queued (True); a running batch cannot be recalled (False)."""
        return self.future.cancel()

    def done(self) -> bool:
        return self.future.done()


@dataclass
class _Entry:
    items: list[TokenizedText]
    ticket: Ticket
    enqueued: float
    longest: int  # tokens of its longest text, computed once: the worker reads it on every decision

    @property
    def texts(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Decision:
    """The worker's next step: take the first `take` entries now, or (take 0) wait until `wait_until`
    (None: until something is queued)."""

    take: int
    wait_until: float | None = None


def decide(queue: Sequence[_Entry], settings: BatcherSettings, now: float, closing: bool,
           queued_texts: int | None = None) -> Decision:
    """The batching decision, as a pure function of a queue snapshot, the settings and the time.

    A batch closes when the queue holds `max_batch_size` texts, when its padded size would reach
    `max_batch_tokens`, when the oldest entry has waited `max_wait_ms`, or when the batcher is closing.
    It then takes entries FIFO up to the size and padded-token limits, at least one (so none starves).
    `queued_texts`: the texts in `queue`, where the caller keeps the count (saves a scan of a deep queue).
    """
    if not queue:
        return Decision(0, None)
    queued = sum(e.texts for e in queue) if queued_texts is None else queued_texts
    deadline = queue[0].enqueued + settings.max_wait_ms / 1000.0
    ready = closing or queued >= settings.max_batch_size or now >= deadline \
        or queued * max(e.longest for e in queue) >= settings.max_batch_tokens
    if not ready:
        return Decision(0, deadline)
    take = texts = longest = 0
    for entry in queue:
        new_texts, new_longest = texts + entry.texts, max(longest, entry.longest)
        if take and (new_texts > settings.max_batch_size or new_texts * new_longest > settings.max_batch_tokens):
            break
        take, texts, longest = take + 1, new_texts, new_longest
    return Decision(take)


def runs_inline(texts: int, longest: int, settings: BatcherSettings, idle: bool, *,
                seconds_per_token: float | None = None, warming: bool = False) -> bool:
    """Whether a request of `texts` texts (the longest `longest` tokens) whose caller allows it skips the
    queue and runs in the caller's thread: only on an idle batcher, only a small request, never when
    the batcher is set to linger for company (`max_wait_ms` > 0), never while shape buckets compile
    (`warming`), and, where this machine's speed is known (`seconds_per_token` of padded input), only
    when its estimated inference fits `inline_max_ms`."""
    padded = texts * longest
    if warming or not idle or settings.max_wait_ms != 0 or texts > settings.max_batch_size \
            or padded > settings.inline_max_tokens:
        return False
    return seconds_per_token is None or padded * seconds_per_token * 1000.0 <= settings.inline_max_ms


class DynamicBatcher:
    """Batches concurrent `encode` calls of many threads or asyncio tasks into shared inferences.

    >>> batcher = DynamicBatcher(Embedder.load("all-minilm-l6-v2"))   # doctest: +SKIP
    >>> batcher.encode(["one sentence"]).shape                         # doctest: +SKIP
    (1, 384)
    >>> await batcher.aencode(["from a coroutine"])                    # doctest: +SKIP
    >>> batcher.close()                                                # doctest: +SKIP
    """

    def __init__(self, embedder: Embedder, settings: BatcherSettings = BatcherSettings(),
                 metrics: Metrics | None = None, seconds_per_token: float | None = None) -> None:
        self.embedder = embedder
        self.settings = settings
        # this machine's inference time per padded token (`runs_inline`'s time bound); None: unknown,
        # inline requests are bounded by tokens alone (a caller blocking its own thread)
        self.seconds_per_token = seconds_per_token
        # True while the engine compiles shape buckets in the background (set by the server)
        self.warming: Callable[[], bool] = lambda: False
        self.metrics = metrics or Metrics()
        self._queue: deque[_Entry] = deque()
        self._queued_texts = 0
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False  # an inference is running (the worker's or an inline one): one at a time
        m = self.metrics
        m.counter("corom_requests_total", "Requests accepted by the batcher")
        m.counter("corom_requests_rejected_total", "Requests refused because the queue was full")
        m.counter("corom_requests_cancelled_total", "Requests dropped because the caller went away")
        m.counter("corom_requests_failed_total", "Requests that failed in inference")
        m.counter("corom_texts_total", "Texts embedded (a chunked text counts once)")
        m.counter("corom_windows_total", "Model inputs embedded: a text that fits is one, a chunked text one per window")
        m.counter("corom_batches_total", "Inferences run")
        m.counter("corom_inline_total", "Requests run in the caller's thread on an idle batcher")
        m.counter("corom_worker_errors_total", "Worker rounds that failed on an internal error")
        m.histogram("corom_queue_seconds", "Time a request waited in the queue")
        m.histogram("corom_tokenize_seconds", "Time to tokenize a request")
        m.histogram("corom_inference_seconds", "Time of one batched inference")
        m.histogram("corom_batch_texts", "Texts per batched inference", SIZE_BUCKETS)
        m.gauge("corom_queue_texts", "Texts waiting in the queue", lambda: self._queued_texts)
        self._worker = threading.Thread(target=self._run, name="corom-batcher", daemon=True)
        self._worker.start()

    # -- callers ----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued_texts

    @property
    def healthy(self) -> bool:
        """The worker is alive and taking work (what `/health` reports)."""
        return self._worker.is_alive() and not self._closing

    def submit(self, texts: Sequence[str], *, prompt: str = "", cut: Truncation | None = None,
               chunking: Chunking | None = None, inline: bool = False) -> Ticket:
        """Queue texts; `ticket.result()` is float32 `[len(texts), dim]`. `prompt` goes before every
        text; `cut` says what to do with over-length ones (default: cut on the right); `chunking` embeds
        them as windows instead (the queue and its limits count windows). `inline=True`: a small request
        on an idle batcher runs now, in this thread, and the ticket is done on return (module doc).

        The ticket also carries `.timings` (filled in as the request moves) and `.token_count`.

        Raises at once on bad input (`TypeError` naming the index), a request larger than the whole
        queue (`RequestTooLargeError`: it could never be queued), a full queue (`OverloadedError`) or a
        closed batcher (`BatcherClosedError`).
        """
        checked = check_texts(texts)
        if len(checked) > self.settings.max_queue:
            raise RequestTooLargeError(f"{len(checked)} texts in one request, more than the queue holds "
                                       f"(max_queue {self.settings.max_queue}, server flag --max-queue): split it "
                                       "into smaller requests")
        ticket = Ticket(Future())
        if not checked:
            ticket.future.set_result(np.empty((0, self.embedder.dim), dtype=np.float32))
            return ticket
        start = time.perf_counter()
        # in the caller's thread: tokenizing runs in parallel
        if chunking is None:
            items = self.embedder.tokenize(checked, prompt, cut)
        else:
            # windows are counted against the queue from token counts before any is built (a 1 MB text
            # with a huge max_windows built ~1 GB of window lists before the check below)
            ticket.plan = self.embedder.chunk_plan(checked, prompt, chunking, cut.truncate if cut else True,
                                                   max_windows_total=self.settings.max_queue)
            items = ticket.plan.items
            if len(items) > self.settings.max_queue:
                raise RequestTooLargeError(f"{len(checked)} texts make {len(items)} windows, more than the queue "
                                           f"holds (max_queue {self.settings.max_queue}, server flag --max-queue): "
                                           "split the request")
        ticket.timings.tokenize_s = time.perf_counter() - start
        ticket.token_count = sum(item.length for item in items)
        with self._cond:
            if self._closing or not self._worker.is_alive():
                raise BatcherClosedError("the batcher is closed and takes no new requests")
            if self._queued_texts + len(items) > self.settings.max_queue:
                self.metrics.inc("corom_requests_rejected_total")
                raise OverloadedError(
                    f"overloaded: {self._queued_texts} texts already queued (limit {self.settings.max_queue}); "
                    "retry later or raise max_queue"
                )
            longest = max(item.length for item in items)
            entry = _Entry(items, ticket, time.perf_counter(), longest)
            inline = inline and runs_inline(len(items), longest, self.settings, not self._queue and not self._busy,
                                            seconds_per_token=self.seconds_per_token, warming=self.warming())
            if inline:
                self._busy = True
            else:
                self._queue.append(entry)
                self._queued_texts += len(items)
                self._cond.notify()
        self.metrics.inc("corom_requests_total")
        self.metrics.observe("corom_tokenize_seconds", ticket.timings.tokenize_s)
        if inline:
            self._run_inline(entry)
        return ticket

    def encode(self, texts: Sequence[str], timeout: float | None = None) -> np.ndarray:
        """Blocking: submit and wait for the embeddings (on an idle batcher, run them at once)."""
        return self.submit(texts, inline=True).result(timeout)

    async def aencode(self, texts: Sequence[str]) -> np.ndarray:
        """Awaitable: cancelling the awaiting task cancels the queued request."""
        return await asyncio.wrap_future(self.submit(texts).future)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish every accepted one, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def abandon_queued(self, reason: str = "the server is shutting down") -> int:
        """Fail every request still queued with `BatcherClosedError` (the batch running now finishes);
        return how many. A shutdown past its drain deadline answers the rest this way."""
        with self._cond:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            self._queued_texts = 0
            self._cond.notify_all()
        for entry in dropped:
            if entry.ticket.future.set_running_or_notify_cancel():
                entry.ticket.future.set_exception(BatcherClosedError(reason))
        return len(dropped)

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run_inline(self, entry: _Entry) -> None:
        """Run one entry in the caller's thread (`runs_inline`), then hand the batcher back to the worker."""
        try:
            entry.ticket.future.set_running_or_notify_cancel()  # nobody else holds it yet: always True
            self.metrics.inc("corom_inline_total")
            self._infer([entry])
        except Exception:  # noqa: BLE001 - the same supervision as a worker round
            log.exception("an inline inference failed on an internal error")
            self.metrics.inc("corom_worker_errors_total")
            if not entry.ticket.future.done():
                entry.ticket.future.set_exception(RuntimeError("internal error in the batcher"))
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify()  # the worker takes whatever queued meanwhile

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        """The worker: supervised, so a bug in one round fails that round's requests, not the server."""
        while True:
            batch: list[_Entry] = []
            try:
                with self._cond:
                    while True:
                        # while an inline request runs, wait for it: one inference at a time
                        decision = Decision(0, None) if self._busy else \
                            decide(self._queue, self.settings, time.perf_counter(), self._closing, self._queued_texts)
                        if decision.take:
                            batch = [self._queue.popleft() for _ in range(decision.take)]
                            self._queued_texts -= sum(e.texts for e in batch)
                            self._busy = True
                            break
                        if self._closing and not self._queue and not self._busy:
                            return
                        timeout = None if decision.wait_until is None else max(0.0, decision.wait_until - time.perf_counter())
                        self._cond.wait(timeout)
                live = []
                for entry in batch:
                    # claims the future; False means the caller cancelled it while it was queued
                    if entry.ticket.future.set_running_or_notify_cancel():
                        live.append(entry)
                    else:
                        self.metrics.inc("corom_requests_cancelled_total")
                if live:
                    self._infer(live)
            except Exception:  # noqa: BLE001 - a worker bug must not silently stall every caller
                log.exception("the batcher's worker failed a round; its requests failed, the worker goes on")
                self.metrics.inc("corom_worker_errors_total")
                for entry in batch:
                    if not entry.ticket.future.done():
                        with contextlib.suppress(InvalidStateError):  # the caller cancelled it meanwhile
                            entry.ticket.future.set_exception(RuntimeError("internal error in the batcher"))
            finally:
                if batch:
                    with self._cond:
                        self._busy = False

    def _infer(self, entries: list[_Entry]) -> None:
        now = time.perf_counter()
        items = [item for e in entries for item in e.items]
        try:
            rows = self.embedder.embed_tokenized(items, self.settings.max_batch_size, self.settings.max_batch_tokens)
        except Exception:  # noqa: BLE001 - isolate the request that breaks the batch
            if len(entries) == 1:
                self.metrics.inc("corom_requests_failed_total")
                log.exception("inference failed for one request")
                entries[0].ticket.future.set_exception(RuntimeError("inference failed for this request; see the server log"))
                return
            for entry in entries:
                self._infer([entry])
            return
        elapsed = time.perf_counter() - now
        self.metrics.inc("corom_batches_total")
        self.metrics.inc("corom_windows_total", len(items))
        self.metrics.inc("corom_texts_total", sum(len(e.ticket.plan.spans) if e.ticket.plan is not None
                                                  else len(e.items) for e in entries))
        self.metrics.observe("corom_inference_seconds", elapsed)
        self.metrics.observe("corom_batch_texts", len(items))
        start = 0
        for entry in entries:
            n, timings = len(entry.items), entry.ticket.timings
            timings.queue_s = now - entry.enqueued
            timings.inference_s = elapsed
            timings.batch_texts = len(items)
            self.metrics.observe("corom_queue_seconds", timings.queue_s)
            entry.ticket.future.set_result(rows[start:start + n])
            start += n
