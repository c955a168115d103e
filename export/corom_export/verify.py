"""`corom verify`: every variant against the PyTorch reference, through the real runtime.

The variants run through `corom_runtime.Embedder` (tokenizer, length-sorted batching, sessions) on
the same tokenized texts as the reference, so the figures are those users get.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from corom_runtime import Embedder
from corom_runtime.artifacts.artifact import load_artifact, sha256_file
from corom_runtime.batching import pad_batch, plan_batches
from corom_runtime.shaping import QUANTIZATION_FILE
from corom_runtime.cpu_check import CHECK_FILE, CheckSet, Platform, matching_record, pick_check_texts
from corom_runtime.catalog import TIERS, VARIANTS, Gate, engine_installed
from corom_runtime.errors import CoromError
from corom_runtime.machine import cpu_model
from corom_runtime.tokenization import TextTokenizer, TokenizedText

from .corpus import calibration_texts, parity_corpus, workload_corpus
from corom_runtime.tiers import RETRIEVAL_KEY, retrieval_ndcg, tiers_of

from .parity import Parity, batch_invariance, compare, cosine_rows, scores
from .reference import SentenceEncoder, build_reference
from .sources import resolve
from .stsb import find_stsb, load_pairs, stsb_missing, stsb_spearman

log = logging.getLogger(__name__)


@dataclass
class VariantResult:
    variant: str
    parity: Parity | None
    gate: Gate
    measured_with: str
    failures: list[str]
    stsb_spearman: float | None = None
    skipped: str | None = None  # why it was not measured here (its engine is not installed)
    speed: dict = field(default_factory=dict)
    # retrieval nDCG@10 over the parity corpus, judged by the reference (`tiers.retrieval_ndcg`)
    retrieval_ndcg: float | None = None

    @property
    def passed(self) -> bool:
        return self.parity is not None and not self.failures

    def figures(self) -> dict:
        """The record the manifest keeps (and the fidelity tiers are derived from)."""
        return {**(self.parity.to_dict() if self.parity else {}), "stsb_spearman": self.stsb_spearman,
                RETRIEVAL_KEY: self.retrieval_ndcg}

    def tiers(self, reference_stsb: float | None) -> tuple[str, ...]:
        """The fidelity tiers it passed here (none where it failed its own gate)."""
        return tiers_of(self.figures(), reference_stsb) if self.passed else ()


@dataclass
class VerifyReport:
    artifact: Path
    results: list[VariantResult] = field(default_factory=list)
    reference_stsb: float | None = None
    stsb_skipped: str | None = None

    @property
    def passed(self) -> bool:
        """Every variant measured here passed (variants whose engine is absent are skipped, not failed)."""
        return all(r.passed for r in self.results if r.skipped is None)

    @property
    def passed_any(self) -> bool:
        """Some variant passed: the artifact can serve (what lets a new export replace an old one)."""
        return any(r.passed for r in self.results)

    def table(self) -> str:
        wide = len("/".join(TIERS))  # a variant that passed every tier: its column still lines up
        head = (f"{'variant':12} {'min cos':>10} {'max |diff|':>11} {'top-10':>7} {'nDCG@10':>8} {'batch inv':>10} "
                f"{'STSb':>7} {'texts/s':>8} {'gate':>6}  {'tiers':{wide}} measured with")
        lines = [head, "-" * len(head)]
        if self.reference_stsb is not None:
            lines.append(f"{'pytorch':12} {1.0:>10.6f} {0.0:>11.2e} {1.0:>7.4f} {1.0:>8.4f} {1.0:>10.7f} "
                         f"{self.reference_stsb:>7.4f} {'-':>8} {'ref':>6}  {'':{wide}} torch")
        for r in self.results:
            p = r.parity
            stsb = f"{r.stsb_spearman:.4f}" if r.stsb_spearman is not None else "-"
            if p is None:
                state = "skip" if r.skipped else "FAIL"
                lines.append(f"{r.variant:12} {'-':>10} {'-':>11} {'-':>7} {'-':>8} {'-':>10} {stsb:>7} {'-':>8} "
                             f"{state:>6}  {'-':{wide}} {r.skipped or '; '.join(r.failures)}")
                continue
            speed = f"{r.speed['texts_per_s']:.0f}" if r.speed else "-"
            ndcg = f"{r.retrieval_ndcg:.4f}" if r.retrieval_ndcg is not None else "-"
            tiers = "/".join(r.tiers(self.reference_stsb)) or "none"
            lines.append(f"{r.variant:12} {p.min_cosine:>10.6f} {p.max_abs_diff:>11.2e} {p.top10_agreement:>7.4f} "
                         f"{ndcg:>8} {p.batch_invariance:>10.7f} {stsb:>7} {speed:>8} {'pass' if r.passed else 'FAIL':>6}"
                         f"  {tiers:{wide}} {r.measured_with}" + ("" if r.passed else f"  ({'; '.join(r.failures)})"))
        if self.stsb_skipped:
            lines.append(f"STSb skipped: {self.stsb_skipped}")
        return "\n".join(lines)


def reference_embed(encoder: SentenceEncoder, items: list[TokenizedText], dim: int, pad_id: int,
                    batch_size: int = 32) -> np.ndarray:
    out = np.empty((len(items), dim), dtype=np.float32)
    with torch.inference_mode():
        for batch in plan_batches([i.length for i in items], batch_size):
            ids, mask = pad_batch([items[i] for i in batch], pad_id)
            out[batch] = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return out


def measure_batch_invariance(embedder: Embedder, items: list[TokenizedText], n: int = 64, batch: int = 16,
                             seed: int = 0) -> float:
    """Min cosine between `n` texts embedded alone and the same texts inside unsorted mixed-length
    batches (each padded to its longest, as a server's batch of concurrent requests would be)."""
    rng = random.Random(seed)
    picked = rng.sample(items, min(n, len(items)))
    pad = embedder.artifact.pad_id
    alone = np.concatenate([embedder.session.run(*pad_batch([item], pad)) for item in picked])
    mixed = np.concatenate([embedder.session.run(*pad_batch(picked[i:i + batch], pad))
                            for i in range(0, len(picked), batch)])
    return batch_invariance(alone, mixed)


SPEED_ROUNDS = 3
SPEED_TEXTS = 128  # long passages: 1 s a round for the slowest CPU variant here (AMD EPYC Zen 5)
# `auto` ranks variants by their speed on long passages: there the matrix work is, and there they differ
# (on the AMD EPYC Zen 5: ov-int8 1.12x ov-bf16 on long passages, a tie on the parity corpus's short
# mix, so the tie went to ov-bf16 and long-passage users got the slower faithful variant); on short
# texts every variant ties, and a variant that ranks first here is not slower there
SPEED_WORKLOAD = "long"


def speed_items(tokenizer: TextTokenizer, n: int) -> list[TokenizedText]:
    """The speed pass's texts: the first `n` passages of the long benchmark workload (a fixed,
    hash-checked corpus file)."""
    return tokenizer.encode(workload_corpus(SPEED_WORKLOAD, n_queries=0, n_passages=n).passages)


def measure_speeds(embedders: dict[str, Embedder], items: list[TokenizedText], rounds: int = SPEED_ROUNDS) -> dict:
    """texts/s of each variant through the runtime's own path, for `variant="auto"`: rounds interleaved
    across the variants (A B C, A B C, ...) and the best round kept, so a burst of load on the machine
    hits every variant alike and cannot demote one (the parity pass is not the speed measurement)."""
    best: dict[str, float] = {}
    for embedder in embedders.values():
        embedder.embed_tokenized(items[:64])
    for _ in range(rounds):
        for name, embedder in embedders.items():
            start = time.perf_counter()
            embedder.embed_tokenized(items)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return {name: {"texts_per_s": round(len(items) / seconds, 1), "cpu": cpu_model(),
                   "threads": embedders[name].info.threads, "texts": len(items),
                   "method": f"best of {rounds} interleaved rounds, {SPEED_WORKLOAD} passages", "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            for name, seconds in best.items()}


def others_that_passed(artifact, names: list[str]) -> list[str]:
    """The CPU variants outside `names` that passed their gate and whose engine is installed: a verify
    of `names` times them too, so that every speed `auto` ranks comes from one run."""
    return [name for name, entry in artifact.variants.items()
            if name not in names and entry.passed and "cpu" in entry.devices and engine_installed(entry.engine)]


def write_addressed(folder: Path, name: str, write) -> tuple[str, str]:
    """Write a new file by `write(path)` under a name of its own content (`check.npz` ->
    `check.<sha256[:16]>.npz`), atomically, never over a file a manifest may name: an interrupted
    verify or a load racing it sees the old file with its old checksum until the manifest moves on.
    Returns (file name, sha256)."""
    stem, _, suffix = name.partition(".")
    tmp = folder / f".{stem}.{os.getpid()}.{random.randrange(1 << 30)}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        sha = sha256_file(tmp)
        final = f"{stem}.{sha[:16]}.{suffix}"
        os.replace(tmp, folder / final)
    finally:
        tmp.unlink(missing_ok=True)
    return final, sha


def write_check_set(folder: Path, texts: list[str], n_queries: int, reference: np.ndarray,
                    worst: np.ndarray) -> dict:
    """The artifact's load-time check set (`corom_runtime.cpu_check`): queries, the hardest passages
    (lowest cosine any variant reached here) and a random spread, with the reference's vectors.
    Returns the manifest's record of it."""
    queries, passages = pick_check_texts(n_queries, worst)
    rows = queries + passages
    check = CheckSet(texts=[texts[i] for i in rows], n_queries=len(queries), vectors=reference[rows])
    file, sha = write_addressed(folder, CHECK_FILE, check.write)
    return {"file": file, "sha256": sha, "texts": len(rows), "queries": len(queries)}


QUANTIZATION_TEXTS = 512


def write_quantization_set(folder: Path, encoder: SentenceEncoder, tokenizer: TextTokenizer, dim: int,
                           pad_id: int, n: int = QUANTIZATION_TEXTS) -> dict:
    """The PyTorch reference's vectors of `n` calibration texts (never evaluated): what int8/uint8
    vector precision scales each dimension by, at any truncate_dim (`corom_runtime.shaping`)."""
    vectors = reference_embed(encoder, tokenizer.encode(calibration_texts(n)), dim, pad_id)

    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, vectors=vectors.astype(np.float32))
    file, sha = write_addressed(folder, QUANTIZATION_FILE, write)
    return {"file": file, "sha256": sha, "texts": len(vectors)}


TOP_K = 10          # the retrieval gate's k (`parity.top_k`)
FULL_SIZES = (200, 2000)  # `corom verify`'s defaults: the figures an artifact's gate is recorded at


def check_sizes(n_queries: int, n_passages: int, threads: int | None = None) -> None:
    """Refuse sizes that cannot measure the gates, before anything runs or is written (a usage error,
    exit 2): top-10 agreement needs queries, and more passages than 10 (over 10 or fewer every query's
    top 10 is every passage: agreement 1.0 whatever the variant)."""
    most_q, most_p = FULL_SIZES
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or not 1 <= n_queries <= most_q:
        raise CoromError(f"--queries must be a whole number from 1 to {most_q} (the parity corpus's queries), "
                         f"got {n_queries!r}")
    if isinstance(n_passages, bool) or not isinstance(n_passages, int) or not 2 * TOP_K <= n_passages <= most_p:
        raise CoromError(f"--passages must be a whole number from {2 * TOP_K} to {most_p}, got {n_passages!r}: "
                         f"top-{TOP_K} agreement over fewer passages is 1.0 for any variant")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise CoromError(f"--threads must be a whole number of at least 1, got {threads!r}")


def recorded_sizes(parity: dict) -> tuple[int, int] | None:
    """(queries, passages) a variant's recorded figures were measured on; None: no figures. Records
    without sizes came from full runs (older versions always wrote the defaults' figures)."""
    if not parity or parity.get("min_cosine") is None:
        return None
    return int(parity.get("queries", FULL_SIZES[0])), int(parity.get("passages", FULL_SIZES[1]))


def _smaller(sizes: tuple[int, int], recorded: tuple[int, int] | None) -> bool:
    return recorded is not None and (sizes[0] < recorded[0] or sizes[1] < recorded[1])


def _remove_replaced(folder: Path, before: dict, after: dict) -> None:
    """After the manifest moved on, delete the check/quantization files only the old one named."""
    for name in ("check", "quantization"):
        old, new = before.get(name) or {}, after.get(name) or {}
        if old.get("file") and old.get("file") != new.get("file"):
            (folder / old["file"]).unlink(missing_ok=True)


def verify_artifact(path: Path, n_queries: int = 200, n_passages: int = 2000, variants: list[str] | None = None,
                    stsb: bool = True, threads: int | None = None, write: bool = True, *,
                    stsb_pairs: int | None = None, speed_texts: int = SPEED_TEXTS,
                    speed_rounds: int = SPEED_ROUNDS) -> VerifyReport:
    """Measure every variant's parity (and STSb Spearman); record the figures and `passed` in the manifest.

    The gate always sees the parity corpus's first `n_queries` / `n_passages`; `stsb_pairs` (the first
    N STSb pairs, None: all 1,500) and the speed pass's size only trade precision of those two figures
    for time (the test suite's session artifact uses that; `corom verify` takes the defaults).
    """
    check_sizes(n_queries, n_passages, threads)
    artifact = load_artifact(path)
    manifest = artifact.manifest
    before = {"check": dict(manifest.check), "quantization": dict(manifest.quantization)}
    names = variants or list(artifact.variants)
    unknown = set(names) - set(artifact.variants)
    if unknown:
        raise CoromError(f"{path} has no variant(s) {sorted(unknown)}; it has {sorted(artifact.variants)}")
    if threads:
        torch.set_num_threads(threads)
    checkpoint = resolve(manifest.source)
    encoder = build_reference(checkpoint, artifact.pooling, artifact.normalize)
    tokenizer = TextTokenizer.from_file(artifact.tokenizer_path, artifact.max_length)
    corpus = parity_corpus(n_queries=n_queries, n_passages=n_passages)
    texts = corpus.queries + corpus.passages
    items = tokenizer.encode(texts)
    print(f"verifying {len(names)} variant(s) on {len(items)} texts ({n_queries} queries, {n_passages} passages)", file=sys.stderr, flush=True)
    reference = reference_embed(encoder, items, artifact.dim, artifact.pad_id)

    report = VerifyReport(artifact=artifact.path)
    worst = np.ones(len(items), dtype=np.float32)  # per text, the lowest cosine any variant reached
    embedders: dict[str, Embedder] = {}
    platforms: dict[str, Platform] = {}
    pairs = None
    stsb_dir = find_stsb() if stsb else None
    if stsb and stsb_dir is None:
        report.stsb_skipped = stsb_missing()
    elif stsb_dir is not None:
        pairs = load_pairs(stsb_dir).head(stsb_pairs)
        report.reference_stsb = stsb_spearman(
            lambda texts: reference_embed(encoder, tokenizer.encode(texts), artifact.dim, artifact.pad_id), pairs)

    for name in names:
        entry = artifact.variants[name]
        gate = VARIANTS[name].gate if name in VARIANTS else Gate(min_cosine=1.0)
        if not engine_installed(entry.engine):
            report.results.append(VariantResult(name, None, gate, "-", [], skipped=f"{entry.engine} is not installed"))
            print(f"  {name}: skipped ({entry.engine} is not installed)", file=sys.stderr, flush=True)
            continue
        if "cpu" not in entry.devices:
            report.results.append(VariantResult(name, None, gate, "-", [], skipped="not a CPU variant"))
            continue
        try:  # measured here, so not checked here first (verify_here=False)
            embedder = Embedder.load(artifact.path, variant=name, device="cpu", threads=threads, warmup=False,
                                     verify_here=False)
        except CoromError as exc:
            report.results.append(VariantResult(name, None, gate, "-", [f"cannot run on the CPU: {exc}"]))
            continue
        candidate = embedder.embed_tokenized(items)
        worst = np.minimum(worst, cosine_rows(reference, np.nan_to_num(candidate)))
        parity = replace(compare(reference, candidate, n_queries, artifact.score),
                         batch_invariance=measure_batch_invariance(embedder, items[n_queries:]))
        result = VariantResult(name, parity, gate, ", ".join(embedder.info.providers), parity.failures(gate),
                               retrieval_ndcg=retrieval_ndcg(
                                   scores(reference[:n_queries], reference[n_queries:], artifact.score),
                                   scores(np.nan_to_num(candidate[:n_queries]), np.nan_to_num(candidate[n_queries:]),
                                          artifact.score)))
        if pairs is not None:
            result.stsb_spearman = stsb_spearman(embedder.encode, pairs)
        report.results.append(result)
        platforms[name] = Platform.here(entry.engine)
        if result.passed:
            embedders[name] = embedder
        print(f"  {name}: min cos {parity.min_cosine:.6f}, top-10 {parity.top10_agreement:.4f}, nDCG@10 "
              f"{result.retrieval_ndcg:.4f}, batch invariance {parity.batch_invariance:.7f} -> "
              f"{'pass' if result.passed else 'FAIL'} (tiers: {'/'.join(result.tiers(report.reference_stsb)) or 'none'})",
              file=sys.stderr, flush=True)

    retimed: dict[str, dict] = {}
    if embedders:
        # a run over some variants times the others that passed here too: `auto` compares speeds, and
        # figures from two runs compare the machine's load at two times as much as the variants
        timed = dict(embedders)
        for name in others_that_passed(artifact, names):
            try:
                timed[name] = Embedder.load(artifact.path, variant=name, device="cpu", threads=threads, warmup=False,
                                            verify_here=False)
            except CoromError as exc:  # it cannot run here now: its old figure stays, and says when it was taken
                log.info("not re-timing %s: %s", name, exc)
        print(f"measuring the speed of {len(timed)} passed variant(s) ({speed_rounds} interleaved rounds)",
              file=sys.stderr, flush=True)
        speeds = measure_speeds(timed, speed_items(tokenizer, speed_texts), speed_rounds)
        for r in report.results:
            r.speed = speeds.get(r.variant, {})
        retimed = {name: speeds[name] for name in timed if name not in embedders}

    if write:
        sizes = (n_queries, n_passages)
        # a run on fewer texts than a variant's record may demote it (a failure on a subset is one on
        # the whole), never replace the full run's figures that `auto` ranks by with its own
        kept = {r.variant for r in report.results if r.passed and r.variant in embedders
                and _smaller(sizes, recorded_sizes(manifest.variants[r.variant].parity))}
        for name in sorted(kept):
            print(f"  {name}: passed on {n_queries} queries and {n_passages} passages, fewer than its recorded "
                  f"figures were measured on {recorded_sizes(manifest.variants[name].parity)}: those are kept",
                  file=sys.stderr, flush=True)
        for r in report.results:
            if r.skipped or r.variant in kept:
                continue
            entry = manifest.variants[r.variant]
            entry.passed = r.passed
            entry.speed = r.speed
            # the tiers are derived from these figures wherever needed (`tiers.variant_tiers`); the
            # label written beside them is for people reading the manifest
            entry.parity = {**r.figures(), "gate": vars(r.gate), "measured_with": r.measured_with,
                            "failures": r.failures, "queries": n_queries, "passages": n_passages,
                            "tiers": list(r.tiers(report.reference_stsb))}
            if r.variant in platforms:  # the verdict holds for this platform: replace its earlier record
                here = platforms[r.variant]
                entry.verified_on = [rec for rec in entry.verified_on if matching_record([rec], here) is None]
                entry.verified_on.append({**here.to_dict(), "passed": r.passed, "failures": r.failures,
                                          "min_cosine": r.parity.min_cosine if r.parity else None,
                                          "top10_agreement": r.parity.top10_agreement if r.parity else None,
                                          "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if not kept:  # where the verified keep their full run's speeds, the others keep theirs too
            for name, speed in retimed.items():
                manifest.variants[name].speed = speed
        if variants is None or not manifest.quantization:
            manifest.quantization = write_quantization_set(artifact.path, encoder, tokenizer, artifact.dim,
                                                           artifact.pad_id)
        if platforms and ((variants is None and not kept) or not manifest.check):
            # a full run picks the check set anew; a run over some variants (or smaller than the
            # records it keeps) keeps the one the others' figures refer to
            manifest.check = write_check_set(artifact.path, texts, n_queries, reference, worst)
        if manifest.check:
            check = CheckSet.read(artifact.check_file(manifest.check["file"], manifest.check["sha256"]))
            for name, embedder in embedders.items():  # what the load-time check compares top-10 with,
                if name in kept:
                    continue
                vectors = embedder.embed_tokenized(tokenizer.encode(check.texts))  # measured the same way
                manifest.variants[name].parity["check_top10"] = compare(
                    check.vectors, vectors, check.n_queries, artifact.score).top10_agreement
        if stsb:  # a run told to skip STSb keeps the figures an earlier run recorded
            manifest.quality = {"stsb_dev_spearman_reference": report.reference_stsb,
                                "stsb_pairs": len(pairs.gold) if pairs is not None else 0,
                                "stsb_skipped": report.stsb_skipped}
        manifest.write(artifact.path)
        _remove_replaced(artifact.path, before, {"check": manifest.check, "quantization": manifest.quantization})
    return report
