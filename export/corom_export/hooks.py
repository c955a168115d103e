"""What the exporter offers the runtime, registered as the `corom_onnx.exporter` entry point
(`corom_runtime.exporter` finds it): export on first use, and the `corom export` / `corom verify`
commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from corom_runtime.artifacts.cache import artifact_dir
from corom_runtime.artifacts.presets import find_preset

from .build import ExportOptions, export_artifact
from .verify import VerifyReport, verify_artifact


def export_preset(name: str, out: Path) -> None:
    """Export and verify a preset into `out` (the runtime holds the cache lock around this)."""
    export_artifact(name, out, ExportOptions())
    verify_artifact(out)


def cli_export(args: argparse.Namespace) -> int:
    name = find_preset(args.model_source) or args.preset or Path(args.model_source).name
    out = Path(args.out) if args.out else artifact_dir(find_preset(name) or name)
    options = ExportOptions(pooling=args.pooling, normalize=args.normalize, score=args.score,
                            max_length=args.max_length, int8_recipe=args.int8_recipe,
                            int8_static=args.int8_static, openvino=not args.no_openvino, force=args.force,
                            preset=args.preset)
    export_artifact(args.model_source, out, options)
    if args.no_verify:
        print(f"exported to {out} (not verified: no variant is marked passed; run `corom verify {out}`)")
        return 0
    return report(verify_artifact(out, n_queries=args.queries, n_passages=args.passages, threads=args.threads),
                  args.json)


def cli_verify(args: argparse.Namespace) -> int:
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
