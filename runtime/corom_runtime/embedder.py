"""The public API: `Embedder` loads an artifact and turns texts into sentence embeddings."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifact import Artifact, load_artifact
from .batching import pad_batch, plan_batches
from .engines import ENGINES, VARIANTS, engine_installed
from .errors import ArtifactError
from .providers import SessionSettings, ort_devices
from .selection import Machine, choose_device, choose_variant, cpu_model
from .session import EncoderSession, open_session
from .tokenization import TextTokenizer, TokenizedText, check_texts

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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ItemReport:
    """Per input: how many tokens the model saw, and whether the text was cut to fit."""

    tokens: int
    truncated: bool


def present_devices(engines: frozenset[str], want_openvino_devices: bool) -> tuple[str, ...]:
    """Devices present here: ONNX Runtime's providers, plus OpenVINO's where asked (it costs an import)."""
    present = list(ort_devices())
    if want_openvino_devices and "openvino" in engines:
        from .openvino_session import openvino_devices

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
        self.artifact = artifact
        self.variant = variant
        self.session = session
        self.tokenizer = tokenizer
        spec = artifact.variants[variant]
        self.info = EmbedderInfo(
            artifact=str(artifact.path), model=artifact.name, variant=variant, engine=spec.engine,
            precision=spec.precision, recipe=spec.recipe,
            device=session.device, providers=list(session.providers), threads=session.threads,
            max_length=artifact.max_length, dim=artifact.dim, pooling=artifact.pooling,
            normalize=artifact.normalize, score=artifact.score, parity=dict(spec.parity),
        )

    @classmethod
    def load(
        cls,
        path_or_preset: str | Path = "all-minilm-l6-v2",
        variant: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        *,
        allow_fallback: bool = False,
        settings: SessionSettings | None = None,
        warmup: bool = True,
    ) -> "Embedder":
        """Load an artifact folder (or a preset name: `models/build/NAME`).

        variant: "auto" picks, among the variants that passed their gate and whose engine is
        installed, the fastest that `corom verify` measured on this CPU (else the engine table's
        order: OpenVINO int8, OpenVINO bf16, ONNX Runtime int8, ...; fp16 on CUDA, the plain graph on
        TensorRT); or a name from `corom_runtime.engines.VARIANTS`. device: "auto" (the first
        accelerator present, else "cpu"), "cpu", "cuda", "tensorrt", or OpenVINO's "gpu"/"npu"; an
        absent device raises `ProviderUnavailableError` unless `allow_fallback` lets it run on the CPU.
        `embedder.info` shows every choice.
        """
        artifact = load_artifact(path_or_preset)
        settings = settings or SessionSettings()
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a whole number of at least 1, got {threads!r}")
            settings = SessionSettings(**{**asdict(settings), "threads": threads})
        machine = this_machine(settings.resolved_threads(), device)
        supported = artifact.variants[variant].devices if variant in artifact.variants else None
        chosen_device = choose_device(device, machine.devices, allow_fallback, tuple(supported) if supported else None)
        name = choose_variant(artifact.variants, variant, chosen_device, machine, artifact.path)
        spec = artifact.variants[name]
        if not spec.passed:
            log.warning("variant %s of %s did not pass its parity gate: %s", name, artifact.path, spec.parity)
        model_path = artifact.check_variant(name)
        tokenizer_path = artifact.check_tokenizer()
        session = open_session(spec, model_path, chosen_device, settings, artifact.max_length)
        try:
            tokenizer = TextTokenizer.from_file(tokenizer_path, artifact.max_length)
        except Exception as exc:
            raise ArtifactError(f"{tokenizer_path} is not a valid tokenizer ({exc}); {artifact.rebuild_hint}") from exc
        # one tiny run always: it proves the graph's width is the manifest's (a wrong embedding_dim
        # would otherwise surface as a broadcasting error in the middle of someone's batch)
        probe = session.run(*pad_batch(tokenizer.encode(["warm up"])))
        if probe.ndim != 2 or probe.shape[1] != artifact.dim:
            raise ArtifactError(
                f"{artifact.path / 'manifest.json'}: field 'embedding_dim' is {artifact.dim} but {model_path.name} "
                f"outputs shape {list(probe.shape)}; {artifact.rebuild_hint}")
        embedder = cls(artifact, name, session, tokenizer)
        if warmup:  # a second, batched run: the engines allocate their buffers for more than one row
            embedder.encode(["warm up", "a somewhat longer warm-up text of a few more tokens"])
        log.info("loaded %s", embedder.info)
        return embedder

    @property
    def dim(self) -> int:
        return self.artifact.dim

    # -- encoding ---------------------------------------------------------------------------

    def embed_tokenized(self, items: Sequence[TokenizedText], batch_size: int = 32,
                        max_batch_tokens: int | None = None) -> np.ndarray:
        """Embed tokenized inputs: sort by length, pad per batch, return rows in the given order."""
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for batch in plan_batches([item.length for item in items], batch_size, max_batch_tokens):
            ids, mask = pad_batch([items[i] for i in batch])
            out[batch] = self.session.run(ids, mask)
        return out

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        normalize_embeddings: bool | None = None,
        show_progress_bar: bool = False,
        return_report: bool = False,
        max_batch_tokens: int | None = None,
    ) -> Any:
        """Embed texts; float32 `[len(texts), dim]` in the caller's order (1-D for a single str).

        Close to sentence-transformers' `encode`. `normalize_embeddings=None` keeps the model's own
        convention (the artifact says whether normalisation is in the graph); True L2-normalises.
        With `return_report=True` returns `(embeddings, [ItemReport, ...])`.
        """
        single = isinstance(texts, str)
        checked = check_texts([texts] if single else texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        out = np.empty((len(checked), self.dim), dtype=np.float32)
        reports: list[ItemReport] = []
        progress = _progress(len(checked), show_progress_bar)
        for start in range(0, len(checked), WINDOW):
            items = self.tokenizer.encode(checked[start:start + WINDOW])
            out[start:start + len(items)] = self.embed_tokenized(items, batch_size, max_batch_tokens)
            if return_report:
                reports.extend(ItemReport(tokens=i.length, truncated=i.truncated) for i in items)
            progress(len(items))
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        result = out[0] if single else out
        return (result, reports) if return_report else result

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
            raise ValueError('pipeline input must be a dict with "source_sentence": [text] '
                             '(and optionally "sentences_to_compare": [texts])')
        source = check_texts(inputs["source_sentence"])
        if len(source) != 1:
            raise ValueError(f"source_sentence must hold exactly one text, got {len(source)}")
        compare = check_texts(inputs.get("sentences_to_compare") or [])
        emb = self.encode(source + compare)
        scores = self.similarity(emb[:1], emb[1:])[0].tolist() if compare else []
        return {"text_embedding": emb, "scores": scores}


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional in the lean runtime
        done = [0]

        def log_progress(n: int) -> None:
            done[0] += n
            log.info("embedded %d/%d", done[0], total)

        return log_progress
    bar = tqdm(total=total, unit="text", desc="embedding")

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update
