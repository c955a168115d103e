"""Is a variant trustworthy on *this* CPU and engine version? The load-time check.

A variant that passed its gate on one CPU can fail on another: OpenVINO's int8 graph that held min cos
0.987 on an AMD Zen 4 fell to 0.61 on 32 texts on an Intel Xeon with AMX, in the bf16 execution of
its unquantized ops. So "passed" holds for the platform it was measured on (CPU model, instruction
set, engine and version), recorded per variant in the manifest (`verified_on`). The artifact carries
a check set (`check.npz`: a few hundred evaluation texts, the hardest included, with the PyTorch
reference's vectors in fp16). On a platform the artifact was not verified on, `Embedder.load` runs
the variant's gate on that set once and caches the verdict in the user cache (keyed by the variant's
file hash, the check set and the platform); a variant that fails is never served there.

A few canned texts (the check set's first rows) are checked on every load: milliseconds.

>>> p = Platform(cpu="Some CPU", isa=("avx2",), engine="onnxruntime", engine_version="1.32.0")
>>> matching_record([{**p.to_dict(), "passed": True}], p)["passed"]
True
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from corom_runtime.catalog import ENGINES, VARIANTS, Gate, gate_of
from corom_runtime.machine import cpu_flags, cpu_isa, cpu_model
from corom_runtime.parity import Parity, batch_invariance, compare

log = logging.getLogger(__name__)

CHECK_FILE = "check.npz"
CANNED = 4               # rows of the check set run on every load
INVARIANCE_TEXTS = 24    # texts embedded alone and in mixed batches, for the batch-invariance figure


def engine_version(engine: str) -> str:
    """The version of an engine's module (imported by then: the session that runs it opened it)."""
    module = importlib.import_module(ENGINES[engine].module)
    return str(getattr(module, "__version__", "unknown"))


@dataclass(frozen=True)
class Platform:
    """Where a variant's figures were measured: CPU model, its kernel-relevant flags, engine, version."""

    cpu: str
    isa: tuple[str, ...]
    engine: str
    engine_version: str
    # where the variant runs: "cpu", or an accelerator with its name ("cuda:NVIDIA_H100", ...): a
    # GPU's numerics are not the CPU's the artifact was verified on
    device: str = "cpu"
    # False where the CPU cannot be told apart (no /proc/cpuinfo: macOS, some containers): such a
    # platform matches no record and no cached verdict; its variant is checked on every load
    known: bool = True

    @classmethod
    def here(cls, engine: str, device: str = "cpu") -> "Platform":
        return cls(cpu=cpu_model(), isa=cpu_isa(), engine=engine, engine_version=engine_version(engine),
                   device=device, known=bool(cpu_flags()))

    def key(self) -> str:
        text = json.dumps([self.cpu, list(self.isa), self.engine, self.engine_version, self.device])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "isa": list(self.isa)}


def matching_record(records: Sequence[dict], platform: Platform) -> dict | None:
    """The manifest's `verified_on` record for `platform`, if the artifact was verified there. Pure.
    An unknown platform matches nothing (unknown means check, never match)."""
    if not platform.known:
        return None
    for record in records:
        if record.get("known", True) is False:
            continue
        if (record.get("cpu"), tuple(record.get("isa") or ()), record.get("engine"), record.get("engine_version"),
                record.get("device", "cpu")) \
                == (platform.cpu, platform.isa, platform.engine, platform.engine_version, platform.device):
            return record
    return None


def device_label(device: str) -> str:
    """The `Platform.device` of a session's real device: "cpu", or the accelerator with its name."""
    if device == "cpu":
        return "cpu"
    from corom_runtime.engines.ort import gpu_name

    return f"{device}:{gpu_name()}"


def gate_run(variant: str, precision_run: str) -> Gate:
    """The gate for what really runs: a variant the engine runs at a lower precision than its own
    (TensorRT's fp16 on the plain fp32 graph) is held to the gate of a variant of that precision, not
    to its own (which it cannot meet) nor to none. Pure.

    >>> gate_run("fp32", "fp16") == gate_of("fp16")
    True
    """
    spec = VARIANTS.get(variant)
    if spec is None or precision_run == spec.precision:
        return gate_of(variant)
    same = next((name for name, s in VARIANTS.items() if s.precision == precision_run and s.engine == spec.engine), None)
    return gate_of(same) if same else gate_of(variant)


@dataclass(frozen=True)
class CheckSet:
    """Texts (queries first) and the PyTorch reference's vectors of them."""

    texts: list[str]
    n_queries: int
    vectors: np.ndarray

    @classmethod
    def read(cls, path: Path) -> "CheckSet":
        with np.load(path, allow_pickle=False) as data:
            return cls(texts=[str(t) for t in data["texts"]], n_queries=int(data["n_queries"]),
                       vectors=data["vectors"].astype(np.float32))

    def write(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, texts=np.array(self.texts, dtype=str), n_queries=np.array(self.n_queries),
                     vectors=self.vectors.astype(np.float16))


def pick_check_texts(n_queries: int, cosines: np.ndarray, n_queries_kept: int = 48, n_passages_kept: int = 240,
                     n_hardest: int = 96, seed: int = 0) -> tuple[list[int], list[int]]:
    """Which evaluation rows form the check set: the first `n_queries_kept` queries, the `n_hardest`
    passages (lowest worst-case cosine over the variants measured), then a random spread. Pure.

    `cosines`: per evaluation row, the lowest cosine any variant reached (queries first)."""
    passages = np.arange(n_queries, len(cosines))
    hardest = passages[np.argsort(cosines[n_queries:], kind="stable")[:n_hardest]]
    rest = sorted(set(passages.tolist()) - set(hardest.tolist()))
    spread = random.Random(seed).sample(rest, min(len(rest), n_passages_kept - len(hardest)))
    return list(range(min(n_queries, n_queries_kept))), sorted(hardest.tolist() + spread)


@dataclass
class CheckResult:
    """The verdict of a variant's gate on a platform."""

    variant: str
    platform: dict
    passed: bool
    failures: list[str]
    parity: dict = field(default_factory=dict)
    seconds: float = 0.0
    source: str = "checked"   # "manifest" (verified there at export), "cache" or "checked" (now)

    def to_dict(self) -> dict:
        return asdict(self)


# The check set over-represents the hardest texts and has 240 passages, not 2,000: its top-10
# agreement is not the full set's (ov-int8: 0.952 on the check set where the full set gave 0.975). So
# on the check set top-10 must reach what the variant reached on the same set where it was verified,
# less this margin; min cosine (every text) and batch invariance are held to the variant's own gate.
CHECK_TOP10_MARGIN = 0.03


def check_gate(gate: Gate, check_top10: float | None) -> Gate:
    """The gate of the load-time check, from the variant's gate and its top-10 on the check set where
    it was verified (None: unknown, the full gate applies). Pure.

    >>> check_gate(Gate(min_cosine=0.99, top10_agreement=0.97), 0.952).top10_agreement
    0.922
    """
    top10 = gate.top10_agreement
    if check_top10 is not None:
        top10 = min(top10, round(check_top10 - CHECK_TOP10_MARGIN, 6))
    return Gate(min_cosine=gate.min_cosine, top10_agreement=max(0.0, top10),
                batch_invariance=gate.batch_invariance, finite=gate.finite)


def run_check(embed: Callable[[list[str]], np.ndarray], run_alone: Callable[[list[str]], np.ndarray],
              check: CheckSet, gate: Gate, score: str) -> tuple[Parity, list[str]]:
    """Embed the check set through the runtime's own path and judge it by `gate`."""
    vectors = embed(check.texts)
    parity = compare(check.vectors, vectors, check.n_queries, score)
    picked = check.texts[check.n_queries:check.n_queries + INVARIANCE_TEXTS]
    if picked:
        alone = np.concatenate([run_alone([t]) for t in picked])
        parity = Parity(**{**parity.to_dict(), "batch_invariance": batch_invariance(alone, run_alone(picked))})
    return parity, parity.failures(gate)


def canned_failures(embed: Callable[[list[str]], np.ndarray], check: CheckSet, gate: Gate) -> list[str]:
    """The every-load check: the check set's first rows against the gate's min cosine and finiteness."""
    n = min(CANNED, len(check.texts))
    parity = compare(check.vectors[:n], embed(check.texts[:n]), 0, "cosine")
    return parity.failures(Gate(min_cosine=gate.min_cosine, finite=gate.finite))


# -- the verdict cache ----------------------------------------------------------------------

def cache_key(identity: str, check_sha256: str, variant: str, platform: Platform) -> str | None:
    """The verdict cache's key: the variant's content identity (`artifacts.identity.variant_identity`:
    files and the settings that change vectors), the check set, and the platform (CPU, flags, engine
    and its version, device). None for an unknown platform: its verdict is never cached."""
    if not platform.known:
        return None
    text = json.dumps([identity, check_sha256, variant, platform.key()])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def read_cached(folder: Path, key: str | None) -> dict | None:
    if key is None:
        return None
    try:
        data = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("passed"), bool) else None


def write_cached(folder: Path, key: str | None, result: CheckResult) -> None:
    """Best effort: a read-only cache only means the check runs again next time."""
    if key is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
        os.replace(tmp, folder / f"{key}.json")
    except OSError as exc:
        log.info("could not cache the check of %s in %s (%s): it will run again on the next load",
                 result.variant, folder, exc)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
