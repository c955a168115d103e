"""The public API: `Embedder` loads an artifact and turns texts into sentence embeddings."""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from corom_runtime.artifacts.artifact import Artifact, load_artifact
from corom_runtime.artifacts.presets import DEFAULT_PRESET
from corom_runtime.batching import pad_batch, plan_batches
from corom_runtime.artifacts.identity import variant_identity
from corom_runtime.cpu_check import (CheckResult, CheckSet, Platform, cache_key, canned_failures, check_gate,
                                     device_label, gate_run,
                                     matching_record, read_cached, run_check, timed, write_cached)
from corom_runtime.catalog import ENGINES, engine_installed
from corom_runtime.exporter import find_exporter
from corom_runtime.errors import (ArtifactError, InvalidInputError, InvalidInputTypeError, MissingArtifactError,
                                  ProviderUnavailableError, VariantRejectedError, positive_int)
from corom_runtime.artifacts.cache import artifact_dir, cache_lock, cache_root
from corom_runtime.engines.settings import SessionSettings
from corom_runtime.engines.ort import ort_devices
from corom_runtime.selection import Machine, choose_device, variant_order
from corom_runtime.tiers import served_tier, variant_tiers
from corom_runtime.machine import cpu_model
from corom_runtime.engines.base import EncoderSession
from corom_runtime.engines.registry import open_session
from corom_runtime.progress import progress_bar
from corom_runtime.shapes import QUERY_WARM_TOKENS
from corom_runtime.shaping import (DTYPES, NEEDS_RANGES, Ranges, calibration_ranges, check_shape_options,
                                   shape_vectors, shaped_width)
from corom_runtime.tokenization import MAX_WINDOWS, TextTokenizer, TokenizedText, check_texts

log = logging.getLogger(__name__)

# Texts are tokenized and sorted in windows of this many, so 100,000 inputs never build more than
# one window of token lists at a time.
WINDOW = 4096


@dataclass(frozen=True)
class EmbedderInfo:
    """Every choice `Embedder.load` made, for logs and benchmark records."""

    artifact: str
    model: str
    variant: str
    engine: str
    precision: str
    recipe: str
    device: str
    providers: list[str]
    threads: int
    max_length: int
    dim: int
    pooling: str
    normalize: bool
    score: str
    parity: dict = field(default_factory=dict)
    # the verdict of the variant's gate on this CPU (`cpu_check`); {} where not checked
    verified: dict = field(default_factory=dict)
    # the fidelity tiers the variant passed (`tiers.variant_tiers`, from its recorded figures), and the
    # tier this embedder serves: the one asked for, else the default's (or the next up that `auto` took)
    tiers: list = field(default_factory=list)
    fidelity: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ItemReport:
    """Per input: how many tokens the model saw, and whether the text was cut to fit."""

    tokens: int
    truncated: bool


@dataclass(frozen=True)
class EncodedWindow:
    """One window of `Embedder.encode_iter`: rows `start .. start + len - 1` of the input."""

    start: int
    vectors: np.ndarray     # float32 [n, dim] (or as shaped: `encode_iter(precision=...)`), in input order
    tokens: np.ndarray      # int32 [n]: tokens the model saw
    truncated: np.ndarray   # bool [n]: the text was cut to fit max_length

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def indices(self) -> np.ndarray:
        return np.arange(self.start, self.start + len(self), dtype=np.int64)

    def __iter__(self):  # `for indices, vectors in embedder.encode_iter(...)`
        return iter((self.indices, self.vectors))

    def reports(self) -> list[ItemReport]:
        return [ItemReport(tokens=int(t), truncated=bool(c)) for t, c in zip(self.tokens, self.truncated)]


@dataclass(frozen=True)
class Shaping:
    """One call's output options, checked (see `Embedder.shaping`)."""

    truncate_dim: int | None = None
    precision: str = "float32"
    renormalize: bool = False
    ranges: Ranges | None = None

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        return shape_vectors(vectors, self.truncate_dim, self.renormalize, self.precision, self.ranges)


@dataclass(frozen=True)
class Chunking:
    """Over-length texts split into windows of the model's length instead of cut (what no peer does):
    `overlap` tokens shared by neighbouring windows, at most `max_windows` per text (a longer text is cut
    after them, and reported truncated; with truncate=False refused). `max_windows` is at most
    `tokenization.MAX_WINDOWS` (1024)."""

    overlap: int = 32
    pool: str = "mean"
    max_windows: int = 32

    @classmethod
    def of(cls, value: object) -> "Chunking | None":
        """`None`/False: no chunking; "mean": the defaults; a dict: `overlap`, `pool`, `max_windows`."""
        if value is None or value is False:
            return None
        if value == "mean":
            return cls()
        if not isinstance(value, dict) or set(value) - {"overlap", "pool", "max_windows"}:
            raise InvalidInputError(f"chunking must be None, 'mean' or a dict of overlap, pool, max_windows; got {value!r}")
        chunking = cls(**value)
        if isinstance(chunking.overlap, bool) or not isinstance(chunking.overlap, int) or chunking.overlap < 0:
            raise InvalidInputError(f"chunking overlap must be a whole number of tokens, got {chunking.overlap!r}")
        positive_int(chunking.max_windows, "chunking max_windows")
        if chunking.max_windows > MAX_WINDOWS:  # windows are built per text: a bound before any is
            raise InvalidInputError(f"chunking max_windows must be at most {MAX_WINDOWS} (windows of the model's "
                                    f"length per text), got {chunking.max_windows}: split longer documents "
                                    "before embedding them")
        if chunking.pool not in ("mean", "none"):
            raise InvalidInputError(f"chunking pool must be 'mean' or 'none', got {chunking.pool!r}")
        return chunking


@dataclass(frozen=True)
class ChunkPlan:
    """The windows of a chunked call and how they pool back into one vector per text."""

    items: list[TokenizedText]    # what is embedded: texts that fit, and the windows of the others
    owner: np.ndarray             # int64 [len(items)]: the text each row belongs to
    reports: list[TokenizedText]  # per text: the tokens the model saw, and whether it was still cut
    over: list[int]               # the texts that were split
    renormalize: bool             # the model's vectors are unit length: so is a mean of them, again
    spans: list[list[tuple[int, int]]]  # per text, its windows' character spans (in row order)

    def windows(self, rows: np.ndarray) -> list[np.ndarray]:
        """Rows of `items` -> per text, its windows' rows (pool "none")."""
        return [rows[self.owner == i] for i in range(len(self.reports))]

    def pool(self, rows: np.ndarray) -> np.ndarray:
        """Rows of `items` -> one mean vector per text (a text that fits: its own row, unchanged)."""
        out = np.zeros((len(self.reports), rows.shape[1]), dtype=np.float32)
        np.add.at(out, self.owner, rows)
        out /= np.bincount(self.owner, minlength=len(self.reports)).astype(np.float32)[:, None]
        if self.renormalize and self.over:
            out[self.over] /= np.maximum(np.linalg.norm(out[self.over], axis=1, keepdims=True), 1e-12)
        return out


@dataclass(frozen=True)
class ChunkedText:
    """One text's windows (`Embedder.encode_chunks`): their vectors and character spans in the text."""

    vectors: np.ndarray             # float32 [windows, dim]
    spans: list[tuple[int, int]]    # (start, end) characters of each window's text
    truncated: bool                 # more windows than max_windows: the rest was cut


@dataclass(frozen=True)
class Truncation:
    """What to do with a text longer than the model's window (TEI's `truncate`, `truncation_direction`)."""

    truncate: bool = True
    direction: str = "right"


def present_devices(engines: frozenset[str], want_openvino_devices: bool) -> tuple[str, ...]:
    """Devices present here: ONNX Runtime's providers, plus OpenVINO's where asked (it costs an import)."""
    present = list(ort_devices())
    if want_openvino_devices and "openvino" in engines:
        from corom_runtime.engines.openvino import openvino_devices

        present += [d for d in openvino_devices() if d not in present]
    return tuple(present)


def this_machine(threads: int, device: str) -> Machine:
    engines = frozenset(name for name in ENGINES if engine_installed(name))
    return Machine(devices=present_devices(engines, device in ("gpu", "npu")), engines=engines,
                   cpu=cpu_model(), threads=threads)


class Embedder:
    """Sentence embeddings from a `corom export` artifact, on CPU, CUDA or TensorRT.

    Thread-safe: one Embedder may serve many threads at once.

    >>> emb = Embedder.load("all-minilm-l6-v2", device="cpu")            # doctest: +SKIP
    >>> emb.encode(["how long does a master degree take"]).shape         # doctest: +SKIP
    (1, 384)
    >>> emb.pipeline({"source_sentence": ["a"], "sentences_to_compare": ["a", "b"]})["scores"]  # doctest: +SKIP
    [1.0, 0.47]
    """

    def __init__(self, artifact: Artifact, variant: str, session: EncoderSession, tokenizer: TextTokenizer) -> None:
        self._ranges: dict[tuple, Ranges] = {}  # calibration ranges per (truncate_dim, normalization)
        self.artifact = artifact
        self.variant = variant
        self.session = session
        self.tokenizer = tokenizer
        spec = artifact.variants[variant]
        self.info = EmbedderInfo(
            artifact=str(artifact.path), model=artifact.name, variant=variant, engine=spec.engine,
            precision=getattr(session, "precision", None) or spec.precision, recipe=spec.recipe,
            device=session.device, providers=list(session.providers), threads=session.threads,
            max_length=artifact.max_length, dim=artifact.dim, pooling=artifact.pooling,
            normalize=artifact.normalize, score=artifact.score, parity=dict(spec.parity),
            tiers=list(variant_tiers(spec, artifact.manifest.quality.get("stsb_dev_spearman_reference"))),
        )

    @classmethod
    def load(
        cls,
        path_or_preset: str | Path = DEFAULT_PRESET,
        variant: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        *,
        allow_fallback: bool = False,
        settings: SessionSettings | None = None,
        warmup: bool = True,
        export_missing: bool = True,
        verify_here: bool = True,
        fidelity: str | None = None,
    ) -> "Embedder":
        """Load an artifact folder, or a preset by name from the user cache (`corom_runtime.artifacts.presets`).

        A preset not exported yet is exported into the cache first when the exporter is installed
        (`export_missing`; minutes, once), else the error names the one command to run.

        variant: "auto" picks, among the variants that passed their gate and whose engine is
        installed, the fastest that `corom verify` measured on this CPU (else the engine table's
        order: OpenVINO int8, OpenVINO bf16, ONNX Runtime int8, ...; fp16 on CUDA, the plain graph on
        TensorRT); or a name from `corom_runtime.catalog.VARIANTS`. device: "auto" (the first
        accelerator present, else "cpu"), "cpu", "cuda", "tensorrt", or OpenVINO's "gpu"/"npu"; an
        absent device raises `ProviderUnavailableError` unless `allow_fallback` lets it run on the CPU.
        `embedder.info` shows every choice.

        fidelity: the tier "auto" serves (`corom_runtime.catalog.TIERS`): "exact", "faithful" or "fast";
        the fastest variant that passed it on this CPU (a speed tie goes to the more faithful). None
        ("auto"): "faithful". The tiers nest: a variant that passed a tier passed every looser one, so a
        faithful request may be served an exact variant, never a fast one. A tier no variant passed here,
        or a named variant that did not pass a named tier, is an error.

        verify_here: a variant is served only where its gate holds. On a CPU or engine version the
        artifact was not verified on, its gate is checked once on the artifact's check set (seconds;
        the verdict is cached); "auto" then falls back to the next variant that passes here, a named
        variant raises `VariantRejectedError`. `corom verify` and the benchmarks, which measure
        variants themselves, pass False.
        """
        artifact = artifact_or_export(path_or_preset, export_missing)
        settings = settings or SessionSettings()
        if threads is not None:
            positive_int(threads, "threads")
            settings = SessionSettings(**{**asdict(settings), "threads": threads})
        machine = this_machine(settings.resolved_threads(), device)
        supported = artifact.variants[variant].devices if variant in artifact.variants else None
        chosen_device = choose_device(device, machine.devices, allow_fallback, tuple(supported) if supported else None)
        order = variant_order(artifact.variants, variant, chosen_device, machine, artifact.path, fidelity,
                              artifact.manifest.quality.get("stsb_dev_spearman_reference"))
        tokenizer_path = artifact.check_tokenizer()
        try:
            tokenizer = TextTokenizer.from_file(tokenizer_path, artifact.max_length)
        except Exception as exc:
            raise ArtifactError(f"{tokenizer_path} is not a valid tokenizer ({exc}); {artifact.rebuild_hint}") from exc
        # on every device: a GPU (or a CPU fallback) runs other kernels than those verified
        check_set = artifact.check_set() if verify_here else None
        rejected: list[str] = []
        for name in order:
            embedder = cls._open(artifact, name, chosen_device, settings, tokenizer)
            if check_set is None:
                break
            verdict = embedder._verify_here(check_set)
            if verdict.passed:
                break
            why = (f"variant {name!r} of {artifact.path} fails its gate on this CPU ({verdict.platform['cpu']}, "
                   f"{verdict.platform['engine']} {verdict.platform['engine_version']}): {'; '.join(verdict.failures)}")
            if variant != "auto":
                where = ("it failed when the artifact was verified on this CPU" if verdict.source == "manifest"
                         else "it passed where the artifact was verified, not here")
                raise VariantRejectedError(f"{why}. {where[0].upper()}{where[1:]}: choose another variant "
                                           "(or variant='auto', which falls back by itself)")
            log.warning("%s; trying the next variant", why)
            rejected.append(why)
        else:
            raise VariantRejectedError("no variant passes its gate on this CPU: " + " | ".join(rejected))
        if embedder.session.device != chosen_device:
            message = (f"{chosen_device} was asked for, but {embedder.info.engine} runs {embedder.variant} on "
                       f"{embedder.session.device} (providers {embedder.session.providers}): its {chosen_device} "
                       "provider is installed but cannot run here (driver, libraries or device missing)")
            if device != "auto" and not allow_fallback:
                raise ProviderUnavailableError(f"{message}; fix that, or pass device='cpu' or allow_fallback=True")
            log.warning("%s; running on %s", message, embedder.session.device)
        embedder.info = replace(embedder.info, fidelity=served_tier(tuple(embedder.info.tiers), fidelity))
        if warmup:
            # an engine that compiles per shape (OpenVINO) compiles a single query's shapes now, not on
            # the first query of each length: a first shape cost 1.5-2.5x its run (docs/decisions.md)
            warm = getattr(embedder.session, "warm_buckets", None)
            if warm is not None:
                warm(1, max_tokens=QUERY_WARM_TOKENS)
            # a second, batched run: the engines allocate their buffers for more than one row
            embedder.encode(["warm up", "a somewhat longer warm-up text of a few more tokens"])
        log.info("loaded %s", embedder.info)
        return embedder

    @classmethod
    def _open(cls, artifact: Artifact, name: str, device: str, settings: SessionSettings,
              tokenizer: TextTokenizer) -> "Embedder":
        model_path = artifact.check_variant(name)
        session = open_session(artifact.variants[name], model_path, device, settings, artifact.max_length,
                               identity=variant_identity(artifact, name))
        # one tiny run always: it proves the graph's width is the manifest's (a wrong embedding_dim
        # would otherwise surface as a broadcasting error in the middle of someone's batch)
        probe = session.run(*pad_batch(tokenizer.encode(["warm up"]), artifact.pad_id))
        if probe.ndim != 2 or probe.shape[1] != artifact.dim:
            raise ArtifactError(
                f"{artifact.path / 'manifest.json'}: field 'embedding_dim' is {artifact.dim} but {model_path.name} "
                f"outputs shape {list(probe.shape)}; {artifact.rebuild_hint}")
        return cls(artifact, name, session, tokenizer)

    def _verify_here(self, check: CheckSet) -> CheckResult:
        """This variant's gate on this platform: the canned texts always; then the manifest's record
        for this platform, else a cached verdict, else the check set, once (cached)."""
        name, gate = self.variant, gate_run(self.variant, self.info.precision)
        entry = self.artifact.variants[name]
        platform = Platform.here(entry.engine, device_label(self.session.device))
        embed = lambda texts: self.embed_tokenized(self.tokenizer.encode(texts))  # noqa: E731
        canned = canned_failures(embed, check, gate)
        if canned:
            return self._record(CheckResult(name, platform.to_dict(), False, [f"canned texts: {f}" for f in canned],
                                            source="canned"))
        record = matching_record(entry.verified_on, platform)
        if record is not None:
            return self._record(CheckResult(name, platform.to_dict(), bool(record.get("passed")),
                                            list(record.get("failures") or []), source="manifest"))
        key = cache_key(variant_identity(self.artifact, name), self.artifact.manifest.check["sha256"], name, platform)
        folder = cache_root() / "checks"
        with cache_lock(f"check-{key}"):
            cached = read_cached(folder, key)
            if cached is not None:
                return self._record(CheckResult(**{**cached, "source": "cache"}))
            log.warning("variant %s of %s was verified on %s, not on this CPU (%s, %s %s): checking its gate on "
                        "%d texts, once", name, self.artifact.path,
                        ", ".join(sorted({r.get("cpu", "?") for r in entry.verified_on})) or "no recorded CPU",
                        platform.cpu, platform.engine, platform.engine_version, len(check.texts))

            def run_alone(texts: list[str]) -> np.ndarray:
                return self.session.run(*pad_batch(self.tokenizer.encode(texts), self.artifact.pad_id))

            here_gate = check_gate(gate, entry.parity.get("check_top10"))
            (parity, failures), seconds = timed(lambda: run_check(embed, run_alone, check, here_gate,
                                                                  self.artifact.score))
            result = CheckResult(name, platform.to_dict(), not failures, failures, parity.to_dict(), round(seconds, 2))
            log.warning("variant %s on this CPU: min cos %.6f, top-10 %.4f, batch invariance %.7f -> %s (%.1fs)",
                        name, parity.min_cosine, parity.top10_agreement, parity.batch_invariance,
                        "pass" if result.passed else "FAIL", seconds)
            write_cached(folder, key, result)
        return self._record(result)

    def _record(self, result: CheckResult) -> CheckResult:
        self.info = replace(self.info, verified=result.to_dict())
        return result

    @property
    def dim(self) -> int:
        return self.artifact.dim

    # -- sentence-transformers' names, so code written for it runs on an Embedder ---------------

    def get_sentence_embedding_dimension(self) -> int:
        """The vector width (sentence-transformers' name for `dim`)."""
        return self.dim

    get_embedding_dimension = get_sentence_embedding_dimension  # sentence-transformers 5.7's name

    @property
    def max_seq_length(self) -> int:
        """Tokens the model sees per text, special tokens and prompt included; longer texts are cut
        (or chunked: `encode(chunking=...)`). Fixed at export: the graph and its gates are built for it."""
        return self.artifact.max_length

    def encode_query(self, texts: str | Sequence[str], **kwargs: Any) -> Any:
        """`encode` with the model's "query" prompt, as sentence-transformers 5 does (plain `encode` for a
        model without one; an explicit `prompt_name` or `prompt` wins)."""
        return self.encode(texts, **self._default_prompt(("query",), kwargs))

    def encode_document(self, texts: str | Sequence[str], **kwargs: Any) -> Any:
        """`encode` with the model's document prompt: the first of "document", "passage", "corpus" it
        has, as sentence-transformers 5 does (plain `encode` without one)."""
        return self.encode(texts, **self._default_prompt(("document", "passage", "corpus"), kwargs))

    def _default_prompt(self, names: tuple[str, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("prompt_name") is not None or kwargs.get("prompt") is not None:
            return kwargs
        name = next((n for n in names if n in self.artifact.prompts), None)
        return {**kwargs, "prompt_name": name} if name else kwargs

    # -- encoding ---------------------------------------------------------------------------

    def embed_tokenized(self, items: Sequence[TokenizedText], batch_size: int = 32,
                        max_batch_tokens: int | None = None) -> np.ndarray:
        """Embed tokenized inputs: sort by length, pad per batch, return rows in the given order."""
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for batch in plan_batches([item.length for item in items], batch_size, max_batch_tokens):
            ids, mask = pad_batch([items[i] for i in batch], self.artifact.pad_id)
            out[batch] = self.session.run(ids, mask)
        return out

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        normalize_embeddings: bool | None = None,
        show_progress_bar: bool = False,
        return_report: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        **options: Any,
    ) -> Any:
        """Embed texts; `[len(texts), dim]` in the caller's order (1-D for a single str).

        Close to sentence-transformers' `encode`. Every option of `encode_iter` is taken by keyword
        (`max_batch_tokens`, `prompt_name`, `prompt`, `truncate_dim`, `precision`, `truncate`,
        `truncation_direction`, `chunking`: one list, with its defaults, there).
        `normalize_embeddings=None` keeps the model's own convention (the artifact says whether normalisation is in the graph); True L2-normalises.
        `prompt_name` puts the model's prompt of that name before every text (e5: "query", "passage";
        bge: "query"; see `embedder.prompts`); `prompt` puts any text. The prompt's tokens count
        towards max_length, as in sentence-transformers.
        With `return_report=True` returns `(embeddings, [ItemReport, ...])`. For inputs that do not
        fit in memory use `encode_iter`. `convert_to_numpy=False` gives a list of 1-D arrays (as
        sentence-transformers gives a list of tensors); `convert_to_tensor=True` is refused: the runtime
        has no torch (`torch.from_numpy` on the result costs no copy).

        Shaped for the index (sentence-transformers' meanings; `corom_runtime.shaping`):
        `truncate_dim=N` keeps the first N numbers, re-normalized where the vectors are normalized;
        `precision` "float32" (default), "int8"/"uint8" (per-dimension ranges calibrated at export),
        "binary"/"ubinary" (packed sign bits, N/8 bytes). Over-length texts: `truncation_direction`
        "right" (default: keep the start) or "left" (keep the end; a prompt is never cut);
        `truncate=False` raises `TextTooLongError` naming them instead; `chunking="mean"` (or
        `{"overlap": tokens, "max_windows": n}`) embeds them whole instead: windows of the model's length,
        embedded in the same batches as the other texts, averaged into one vector (a text that fits is
        unchanged; `encode_chunks` returns the windows themselves).

        >>> e5 = Embedder.load("e5-small-v2")                                         # doctest: +SKIP
        >>> q = e5.encode(["how long is a master degree"], prompt_name="query")  # doctest: +SKIP
        >>> emb.encode(["a text"], truncate_dim=128, precision="ubinary").shape       # doctest: +SKIP
        (1, 16)
        """
        if convert_to_tensor:
            raise InvalidInputError("Embedder.encode cannot return a torch tensor (convert_to_tensor=True): the runtime "
                                    "has no torch, by design. It returns numpy arrays; wrap one without a copy with "
                                    "torch.from_numpy(emb.encode(texts))")
        single = isinstance(texts, str)
        checked = check_texts([texts] if single else texts)
        truncate_dim, precision = check_shape_options(self.dim, options.get("truncate_dim"),
                                                      options.get("precision", "float32"))
        out = np.empty((len(checked), shaped_width(self.dim, truncate_dim, precision)), dtype=DTYPES[precision])
        reports: list[ItemReport] = []
        windows = self.encode_iter(checked, batch_size=batch_size, normalize_embeddings=normalize_embeddings,
                                   **options)  # an unknown option fails here, naming itself
        bar = progress_bar(len(checked), enabled=show_progress_bar)
        for window in windows:
            out[window.start:window.start + len(window)] = window.vectors
            if return_report:
                reports.extend(window.reports())
            bar.update(len(window))
        bar.close()
        result = out[0] if single else out
        if not convert_to_numpy and not single:
            result = list(result)
        return (result, reports) if return_report else result

    def encode_iter(
        self,
        texts: Iterable[str],
        batch_size: int = 32,
        window: int = WINDOW,
        normalize_embeddings: bool | None = None,
        max_batch_tokens: int | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate_dim: int | None = None,
        precision: str = "float32",
        truncate: bool = True,
        truncation_direction: str = "right",
        chunking: Any = None,
    ) -> Iterator["EncodedWindow"]:
        """Embed any iterable of texts window by window, in memory that does not grow with its length.

        Reads `window` texts, tokenizes them, embeds them in length-sorted batches and yields one
        `EncodedWindow` (its `indices` into the input, `vectors` float32 `[n, dim]`, and `tokens` /
        `truncated` per text) before reading on. Unpacks as `(indices, vectors)`. Prompts, shaping and
        truncation as in `encode`.

        >>> for indices, vectors in emb.encode_iter(open("corpus.txt")):   # doctest: +SKIP
        ...     index.add_with_ids(vectors, indices)
        """
        if isinstance(texts, (str, bytes)):
            raise InvalidInputTypeError("texts must be an iterable of strings, not a single string: wrap it as [text]")
        positive_int(batch_size, "batch_size")
        positive_int(window, "window")
        prefix = self.prompt_text(prompt_name, prompt)
        shaping = self.shaping(truncate_dim, precision, bool(normalize_embeddings))
        cut = Truncation(truncate, truncation_direction)
        chunks = Chunking.of(chunking)
        if chunks is not None and chunks.pool != "mean":
            raise InvalidInputError("encode pools a text's windows into one vector: chunking pool 'none' is "
                                    "`encode_chunks`")
        # checked above, before the first next(): a bad argument fails at the call, not later
        return self._windows(iter(texts), batch_size, window, normalize_embeddings, max_batch_tokens, prefix,
                             shaping, cut, chunks)

    @property
    def prompts(self) -> dict[str, str]:
        """The model's prompts by name (from its preset, recorded in the artifact)."""
        return dict(self.artifact.prompts)

    def prompt_text(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The text to put before every input: the model's prompt `prompt_name`, or `prompt`, or ""."""
        if prompt_name is not None and prompt is not None:
            raise InvalidInputError("give prompt_name or prompt, not both")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidInputTypeError(f"prompt must be a string, got {type(prompt).__name__}")
            return prompt
        return named_prompt(self.artifact, prompt_name)

    def shaping(self, truncate_dim: int | None = None, precision: str = "float32",
                normalize_embeddings: bool = False) -> "Shaping":
        """The checked output options of one call, with the calibration ranges int8/uint8 need."""
        truncate_dim, precision = check_shape_options(self.dim, truncate_dim, precision)
        normalized = self.artifact.normalize or normalize_embeddings
        renormalize = truncate_dim is not None and normalized
        ranges = None
        if precision in NEEDS_RANGES:
            key = (truncate_dim, renormalize, normalize_embeddings)
            ranges = self._ranges.get(key)
            if ranges is None:
                calibration = self.artifact.quantization_vectors()
                if calibration is None:
                    raise InvalidInputError(f"precision {precision!r} needs the calibration vectors {self.artifact.path} "
                                            f"lacks (exported before vector quantization): {self.artifact.rebuild_hint}")
                if normalize_embeddings and not self.artifact.normalize:
                    calibration = calibration / np.maximum(np.linalg.norm(calibration, axis=1, keepdims=True), 1e-12)
                ranges = self._ranges[key] = calibration_ranges(calibration, truncate_dim, renormalize)
        return Shaping(truncate_dim, precision, renormalize, ranges)

    def tokenize(self, texts: Sequence[str], prompt: str = "", cut: "Truncation | None" = None) -> list[TokenizedText]:
        """Checked texts -> tokens, after `prompt`, cut as `cut` says (default: on the right)."""
        cut = cut or Truncation()
        return self.tokenizer.encode(texts, prompt=prompt, truncate=cut.truncate, direction=cut.direction)

    def _windows(self, iterator: Iterator[str], batch_size: int, window: int, normalize_embeddings: bool | None,
                 max_batch_tokens: int | None, prefix: str = "", shaping: "Shaping | None" = None,
                 cut: "Truncation | None" = None, chunks: Chunking | None = None) -> Iterator[EncodedWindow]:
        start = 0
        while True:
            chunk = check_texts(list(itertools.islice(iterator, window)), start)
            if not chunk:
                return
            if chunks is None:
                items = self.tokenize(chunk, prefix, cut)
                vectors = self.embed_tokenized(items, batch_size, max_batch_tokens)
            else:
                items, vectors = self._embed_chunked(chunk, prefix, chunks, batch_size, max_batch_tokens,
                                                     cut.truncate if cut is not None else True)
            if normalize_embeddings:
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            if shaping is not None:
                vectors = shaping.apply(vectors)
            yield EncodedWindow(start=start, vectors=vectors,
                                tokens=np.fromiter((i.length for i in items), dtype=np.int32, count=len(items)),
                                truncated=np.fromiter((i.truncated for i in items), dtype=bool, count=len(items)))
            start += len(chunk)

    def _embed_chunked(self, texts: list[str], prefix: str, chunks: Chunking, batch_size: int,
                       max_batch_tokens: int | None, truncate: bool = True) -> tuple[list[TokenizedText], np.ndarray]:
        """Texts that fit as they are; the others as windows, all in the same length-sorted batches;
        each over-length text's windows averaged (and re-normalized where the model normalizes)."""
        plan = self.chunk_plan(texts, prefix, chunks, truncate=truncate)
        return plan.reports, plan.pool(self.embed_tokenized(plan.items, batch_size, max_batch_tokens))

    def chunk_plan(self, texts: Sequence[str], prefix: str, chunks: Chunking, truncate: bool = True,
                   max_windows_total: int | None = None) -> "ChunkPlan":
        """What to embed for `texts` under `chunks`: every window (a text that fits is its own one) and
        which text each belongs to. The batcher queues the windows; `plan.pool(rows)` gives the texts.

        Windows are counted from token counts before any is built: `truncate=False` refuses a text that
        needs more than `chunks.max_windows` (`TextTooLongError`), and `max_windows_total` (a queue's
        bound) a request that needs more in all (`RequestTooLargeError`)."""
        split = self.tokenizer.split_windows(texts, prefix, chunks.overlap, chunks.max_windows, truncate=truncate,
                                             max_total=max_windows_total)
        flat: list[TokenizedText] = []
        owner: list[int] = []
        reports: list[TokenizedText] = []
        over: list[int] = []
        spans: list[list[tuple[int, int]]] = []
        for i, ((windows, text_spans, was_cut), text) in enumerate(zip(split, texts)):
            flat += windows
            owner += [i] * len(windows)
            if len(windows) == 1 and not was_cut:  # it fits: its one window is what `encode` gives it
                reports.append(windows[0])
                spans.append([(0, len(text))])
            else:
                over.append(i)
                reports.append(TokenizedText(ids=[t for w in windows for t in w.ids], truncated=was_cut))
                spans.append(text_spans)
        return ChunkPlan(flat, np.asarray(owner, dtype=np.int64), reports, over, self.artifact.normalize, spans)

    def encode_chunks(self, texts: Sequence[str], overlap: int = 32, max_windows: int = 32,
                      prompt_name: str | None = None, prompt: str | None = None,
                      batch_size: int = 32) -> list[ChunkedText]:
        """Every text as windows of the model's length (`overlap` tokens shared), each window's vector
        and its character span: for indexes that keep passages. A text that fits is one window.

        >>> [c.spans for c in emb.encode_chunks([long_text])]                  # doctest: +SKIP
        [[(0, 1406), (1251, 2636), (2451, 3107)]]
        """
        checked = check_texts(texts)
        Chunking.of({"overlap": overlap, "max_windows": max_windows})
        split = self.tokenizer.split_windows(checked, self.prompt_text(prompt_name, prompt), overlap, max_windows)
        rows = self.embed_tokenized([w for windows, _, _ in split for w in windows], batch_size)
        out, start = [], 0
        for windows, spans, was_cut in split:
            out.append(ChunkedText(vectors=rows[start:start + len(windows)], spans=spans, truncated=was_cut))
            start += len(windows)
        return out

    # -- scoring ----------------------------------------------------------------------------

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The model's score function (dot for CoROM, cosine for normalised models) between rows."""
        if self.artifact.score == "cosine":
            a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
            b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        return a @ b.T

    def score(self, source: str, candidates: Sequence[str]) -> np.ndarray:
        """Scores of `source` against each candidate, as a float32 vector."""
        emb = self.encode([source, *check_texts(candidates)])
        return self.similarity(emb[:1], emb[1:])[0]

    def pipeline(self, inputs: dict) -> dict:
        """ModelScope's sentence-embedding pipeline: same input dict, same output dict.

        `{"source_sentence": [s], "sentences_to_compare": [c1, ...]}` ->
        `{"text_embedding": float32 (n+1, dim), "scores": [score(s, ci), ...]}`.
        """
        if not isinstance(inputs, dict) or "source_sentence" not in inputs:
            raise InvalidInputError('pipeline input must be a dict with "source_sentence": [text] '
                             '(and optionally "sentences_to_compare": [texts])')
        source = check_texts(inputs["source_sentence"])
        if len(source) != 1:
            raise InvalidInputError(f"source_sentence must hold exactly one text, got {len(source)}")
        compare = check_texts(inputs.get("sentences_to_compare") or [])
        emb = self.encode(source + compare)
        scores = self.similarity(emb[:1], emb[1:])[0].tolist() if compare else []
        return {"text_embedding": emb, "scores": scores}


def named_prompt(artifact: Artifact, prompt_name: str | None) -> str:
    """The artifact's prompt `prompt_name` ("" for None); an unknown name is an error listing the known
    ones. Shared by `Embedder.prompt_text` and the Ray corpus driver, which builds no `Embedder`."""
    if prompt_name is None:
        return ""
    if prompt_name not in artifact.prompts:
        known = ", ".join(repr(k) for k in artifact.prompts) or "none (this model takes no prompts)"
        raise InvalidInputError(f"unknown prompt_name {prompt_name!r} for {artifact.name}; known: {known}")
    return artifact.prompts[prompt_name]


def artifact_or_export(path_or_preset: str | Path, export_missing: bool) -> Artifact:
    """The artifact of a folder or preset; a preset not exported yet is exported into the cache first
    when `export_missing` and the exporter is installed."""
    try:
        return load_artifact(path_or_preset)
    except MissingArtifactError as missing:
        exporter = find_exporter() if export_missing else None  # registered by the exporter: torch, only there
        if exporter is None:
            raise
        out = artifact_dir(missing.preset)
        # two processes loading the same preset from an empty cache: one exports, the other waits and reads
        with cache_lock(f"export-{missing.preset}"):
            try:
                return load_artifact(path_or_preset)
            except MissingArtifactError:
                pass
            log.warning("exporting preset %s into %s (first use; this takes minutes)", missing.preset, out)
            exporter.export_preset(missing.preset, out)
        return load_artifact(out)
