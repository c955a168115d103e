"""Which device and which variant to run: pure decisions over the engine table and a manifest.

`Embedder.load` gathers the facts (devices present, engines installed, this CPU) and asks these
functions; tests call them with made-up facts, no engine needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from corom_runtime.catalog import DEFAULT_FIDELITY, DEVICES, ENGINES, TIERS, VARIANTS, auto_order, engines_of
from corom_runtime.errors import ArtifactError, ProviderUnavailableError
from corom_runtime.artifacts.manifest import VariantEntry
from corom_runtime.tiers import check_fidelity, faithfulness, figures_of, missing_figures, variant_tiers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Machine:
    """What this machine offers: devices present, engines installed, CPU model and threads."""

    devices: tuple[str, ...]
    engines: frozenset[str]
    cpu: str
    threads: int


def choose_device(device: str, present: tuple[str, ...], allow_fallback: bool = False,
                  supported: tuple[str, ...] | None = None) -> str:
    """Resolve "auto" to the first present accelerator (table order) that `supported` allows, else
    the CPU; refuse an absent device unless `allow_fallback` lets it fall back to the CPU (logged)."""
    if device != "auto" and device not in DEVICES:
        raise ValueError(f"device must be one of {['auto', *DEVICES]}, got {device!r}")
    allowed = [d for d in DEVICES if d in present and (supported is None or d in supported)]
    if device == "auto":
        return allowed[0] if allowed else "cpu"
    if device in present:
        return device
    engine = ENGINES[engines_of(device)[0]]
    message = f"device {device!r} ({DEVICES[device].description}) is not available here (present: {list(present)})"
    if allow_fallback:
        log.warning("%s; falling back to the CPU as allowed", message)
        return "cpu"
    hint = {"cuda": "install onnxruntime-gpu (pip install 'corom-onnx[gpu]') on a machine with an NVIDIA GPU",
            "tensorrt": "install onnxruntime-gpu with TensorRT on a machine with an NVIDIA GPU"}.get(
        device, f"{engine.install}, on a machine with that device")
    raise ProviderUnavailableError(f"{message}: {hint}, or use device='cpu'")


# Speeds within this fraction of the fastest are a tie, which goes to the more faithful variant (then
# the engine table's order): a few percent of measurement noise must not buy a user worse neighbours.
SPEED_TIE = 0.05


def measured_speed(entry: VariantEntry, machine: Machine, device: str = "cpu") -> float | None:
    """texts/s that `corom verify` measured for this variant on this CPU with these threads, if any.
    Speeds are measured on the CPU: they rank nothing on another device."""
    speed = entry.speed or {}
    if device == "cpu" and speed.get("cpu") == machine.cpu and speed.get("threads") == machine.threads:
        value = speed.get("texts_per_s")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None
    return None


def rank_by_speed(order: list[str], speeds: dict[str, float | None], tie: float = SPEED_TIE,
                  fidelity: dict[str, int] | None = None) -> list[str]:
    """`order` (the table's preference) re-ranked by measured speed: the fastest first, where among the
    speeds within `tie` of the fastest the most faithful (`fidelity`: higher is more faithful, e.g.
    `tiers.faithfulness`) goes first, then the table's order; unmeasured variants follow in table
    order. Pure.

    >>> rank_by_speed(["a", "b", "c"], {"a": 100.0, "b": 103.0, "c": 200.0})
    ['c', 'a', 'b']
    >>> rank_by_speed(["a", "b"], {"a": 104.0, "b": 100.0}, fidelity={"a": 1, "b": 2})
    ['b', 'a']
    """
    fidelity = fidelity or {}
    measured = [n for n in order if speeds.get(n)]
    ranked: list[str] = []
    while measured:
        best = max(speeds[n] for n in measured)
        tied = [n for n in measured if speeds[n] >= best * (1 - tie)]
        pick = max(tied, key=lambda n: (fidelity.get(n, 0), -tied.index(n)))
        ranked.append(pick)
        measured.remove(pick)
    return ranked + [n for n in order if not speeds.get(n)]


def choose_variant(variants: dict[str, VariantEntry], requested: str, device: str, machine: Machine,
                   artifact: Path, fidelity: str | None = None, reference_stsb: float | None = None) -> str:
    """The variant to run on `device`: the first of `variant_order`."""
    return variant_order(variants, requested, device, machine, artifact, fidelity, reference_stsb)[0]


def variant_order(variants: dict[str, VariantEntry], requested: str, device: str, machine: Machine,
                  artifact: Path, fidelity: str | None = None, reference_stsb: float | None = None) -> list[str]:
    """The variants to try on `device`, best first (`Embedder.load` falls back along it when one
    fails its gate on this CPU).

    An explicit name is the only one: it must exist, suit the device and have its engine installed
    (and pass `fidelity`'s tier where one is named). "auto" takes the variants that passed their gate,
    suit the device, whose engine is installed and that passed the tier (`tiers.variant_tiers`;
    `reference_stsb` is the manifest's, which the fast tier's STSb figure is judged against), in the
    engine table's order for the device (`engines.auto_order`), re-ranked by the speed measured on this
    CPU and thread count (`rank_by_speed`: a tie goes to the more faithful). `fidelity` None ("auto"):
    the default tier. The tiers nest, so a tier's variants include every stricter tier's (a faithful
    request may be served an exact variant, never a fast one). A tier no variant that runs here
    passed is an error naming the tiers each passed, and so is a named variant that did not pass a
    named tier.
    """
    named = check_fidelity(fidelity)
    labels = {n: variant_tiers(e, reference_stsb) for n, e in variants.items()}
    if requested != "auto":
        entry = variants.get(requested)
        if entry is None:
            raise ArtifactError(f"variant {requested!r} is not in {artifact}; it has {sorted(variants)}")
        if device not in entry.devices:
            raise ArtifactError(f"variant {requested!r} is built for {entry.devices}, not {device!r}; "
                                f"pick a device it runs on or another variant")
        if entry.engine not in machine.engines:
            raise ProviderUnavailableError(
                f"variant {requested!r} runs on {entry.engine}, which is not installed: "
                f"{ENGINES[entry.engine].install}")
        if named and named not in labels[requested]:
            lacks = missing_figures(TIERS[named], figures_of(requested, entry.parity, entry.passed), reference_stsb)
            why = (f"; its record lacks {', '.join(lacks)}: re-run `corom verify` to measure them" if lacks and entry.passed
                   else "" if entry.passed else "; it failed its own gate")
            raise ArtifactError(f"variant {requested!r} of {artifact} did not pass the {named!r} tier "
                                f"({TIERS[named].description}); it passed {list(labels[requested]) or 'none'}{why}: "
                                "ask for another tier, or leave the variant to auto")
        return [requested]
    order = [v.name for v in auto_order(device) if v.name in variants] + [n for n in variants if n not in VARIANTS]
    runnable = [n for n in order if variants[n].passed and device in variants[n].devices
                and variants[n].engine in machine.engines]
    if not runnable:
        skipped = [n for n in order if variants[n].passed and device in variants[n].devices]
        needed = sorted({variants[n].engine for n in skipped})
        why = (f"those that passed need {' or '.join(needed)}, not installed here; install one: "
               + " / ".join(ENGINES[e].install for e in needed if e in ENGINES)
               if skipped else "none passed its parity gate for it")
        raise ArtifactError(f"no variant of {artifact} can run on {device!r}: {why}")
    passed = ", ".join(f"{n}: {'/'.join(labels[n]) or 'none'}" for n in runnable)
    tier = named or DEFAULT_FIDELITY
    # the tiers nest (`tiers.tiers_of`): a stricter tier's variants are among these, so "up" needs no
    # fallback of its own, and there is never one down
    candidates = [n for n in runnable if tier in labels[n]]
    if not candidates:
        stricter = " or a stricter one" if list(TIERS).index(tier) > 0 else ""
        lacking = [n for n in runnable
                   if missing_figures(TIERS[tier], figures_of(n, variants[n].parity, True), reference_stsb)]
        rerun = (f", or re-run `corom verify`: the records of {', '.join(lacking)} lack figures the {tier!r} "
                 "tier reads" if lacking else "")
        raise ArtifactError(f"no variant of {artifact} that runs on {device!r} passed the {tier!r} tier "
                            f"({TIERS[tier].description}){stricter}; tiers passed: {passed}. Ask for a tier one "
                            f"of them passed (tiers: {list(TIERS)}){rerun}")
    speeds = {n: measured_speed(variants[n], machine, device) for n in candidates}
    return rank_by_speed(candidates, speeds, fidelity={n: faithfulness(labels[n]) for n in candidates})
