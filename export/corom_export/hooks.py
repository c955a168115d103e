"""What the exporter offers the runtime, registered as the `corom_onnx.exporter` entry point
(`corom_runtime.exporter` finds it): export on first use, and the `corom export` / `corom verify`
commands."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from corom_runtime.artifacts.cache import artifact_dir
from corom_runtime.artifacts.presets import find_preset
from corom_runtime.errors import CoromError

from .build import ExportOptions, export_artifact
from .verify import VerifyReport, check_sizes, verify_artifact


def export_preset(name: str, out: Path) -> None:
    """Export and verify a preset into `out` (the runtime holds the cache lock around this): verified
    beside `out` and swapped in only then, so an interrupted first use leaves nothing half-made."""
    export_artifact(name, out, ExportOptions(), verify=lambda work: verify_artifact(work).passed_any)


@contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) in the main thread while exporting, so the work folder beside
    --out is removed on the way out (the default action would kill the process and leave it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_out(model: str, preset: str | None) -> Path:
    """Where `corom export MODEL` writes without --out: a preset's own slot in the user cache for a
    preset name (or a folder exported as a preset with --preset); a folder's own name otherwise. A
    folder named like a preset never takes the preset's slot (Embedder.load(NAME) would serve it)."""
    known = find_preset(model)
    if known:  # the name is the preset (as `settings_for` reads it), even where a folder is named so
        return artifact_dir(known)
    if preset:
        return artifact_dir(find_preset(preset) or preset)
    name = Path(model).resolve().name if Path(model).exists() else Path(model).name
    if find_preset(name):
        raise CoromError(f"the checkpoint folder {model} is named like the preset {find_preset(name)!r}: it would "
                         f"take that preset's slot in the cache; pass --out FOLDER, or --preset "
                         f"{find_preset(name)} if it is that preset's model")
    return artifact_dir(name)


def cli_export(args: argparse.Namespace) -> int:
    if not args.no_verify:  # usage errors before minutes of export, and before anything is written
        check_sizes(args.queries, args.passages, args.threads)
    out = Path(args.out) if args.out else default_out(args.model_source, args.preset)
    options = ExportOptions(pooling=args.pooling, normalize=args.normalize, score=args.score,
                            max_length=args.max_length, int8_recipe=args.int8_recipe,
                            int8_static=args.int8_static, openvino=not args.no_openvino, force=args.force,
                            preset=args.preset)
    if args.no_verify:
        with _terminate_cleanly():
            export_artifact(args.model_source, out, options)
        print(f"exported to {out} (not verified: no variant is marked passed; run `corom verify {out}`)")
        return 0
    reports: list[VerifyReport] = []

    def verify(work: Path) -> bool:
        reports.append(verify_artifact(work, n_queries=args.queries, n_passages=args.passages,
                                       threads=args.threads))
        return reports[-1].passed_any

    with _terminate_cleanly():
        written = export_artifact(args.model_source, out, options, verify=verify)
    result = reports[-1]
    result.artifact = written or out
    code = report(result, args.json)
    if written is None:
        print(f"the existing artifact at {out} was kept: the new export has no variant that passed")
    elif not result.passed:
        print(f"written to {out}: the variants that FAILED are not marked passed and are never served")
    return code


def cli_verify(args: argparse.Namespace) -> int:
    check_sizes(args.queries, args.passages, args.threads)
    return report(verify_artifact(Path(args.artifact), n_queries=args.queries, n_passages=args.passages,
                                  variants=args.variants, stsb=not args.no_stsb, threads=args.threads), args.json)


def report(result: VerifyReport, as_json: bool) -> int:
    if as_json:
        print(json.dumps({
            "artifact": str(result.artifact), "passed": result.passed,
            "reference_stsb": result.reference_stsb,
            "variants": {r.variant: {"passed": r.passed, "failures": r.failures, "stsb_spearman": r.stsb_spearman,
                                     **(r.parity.to_dict() if r.parity else {})} for r in result.results},
        }, indent=2))
    else:
        print(result.table())
        print("all variants passed their gates" if result.passed else "SOME VARIANTS FAILED their gates")
    return 0 if result.passed else 1
