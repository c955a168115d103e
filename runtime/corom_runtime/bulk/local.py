"""Embedding whole corpora on one machine: a checked pass over the input, then shards as it goes.

`corom embed FILE --output DIR` runs `embed_corpus`:
1. `survey` reads the input once without embedding: it counts the rows, finds every bad row (missing,
   empty or non-string text, invalid JSON, missing or duplicate id) and fingerprints the file. Bad rows
   stop the job here, before anything is written, unless `skip_bad` is set.
2. The job's settings go to `DIR/_job.json`; rows are embedded `shard_size` at a time and each shard is
   written atomically (`corpus_io.write_shard`), so an interrupted job leaves only whole shards.
3. `resume=True` checks `_job.json` against the new run (same input bytes, model, variant, fields,
   shard size), keeps every finished shard and embeds only the rest: no row twice, none lost.
4. `DIR/_summary.json` is written last: rows, tokens, truncated, seconds, texts/s.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from corom_runtime.bulk.corpus_io import (OUTPUT_FORMATS, Row, ShardData, describe, file_fingerprint, id_hash,
                                          input_format, read_rows, row_problem, shard_path, shard_rows, shard_totals, write_json, write_shard)
from corom_runtime.errors import CoromError, positive_int
from corom_runtime.progress import progress_bar
from corom_runtime.shaping import DTYPES, check_shape_options, shaped_width
from corom_runtime.tokenization import DIRECTIONS

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
SHOWN_BAD_ROWS = 20


@dataclass(frozen=True)
class BulkOptions:
    """What to embed and where. The fields in `JOB_KEYS` define the output; `--resume` requires them unchanged."""

    input: Path
    output: Path
    input_format: str | None = None      # None: from the suffix
    output_format: str = "parquet"
    text_field: str = "text"
    id_field: str | None = None
    shard_size: int = 50_000
    batch_size: int = 32
    skip_bad: bool = False
    prompt_name: str | None = None       # the model's prompt put before every text (e5: "passage")
    resume: bool = False
    force: bool = False
    # the vectors' shape and the truncation policy, as `Embedder.encode` takes them
    truncate_dim: int | None = None
    precision: str = "float32"
    truncate: bool = True
    truncation_direction: str = "right"
    chunking: str | None = None          # "mean": an over-length text as windows, averaged
    chunk_overlap: int = 32

    def encode_options(self) -> dict:
        """The keyword arguments of `Embedder.encode` / `encode_iter` this job embeds with."""
        return {"prompt_name": self.prompt_name, "truncate_dim": self.truncate_dim, "precision": self.precision,
                "truncate": self.truncate, "truncation_direction": self.truncation_direction,
                "chunking": {"overlap": self.chunk_overlap} if self.chunking == "mean" else None}

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise CoromError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
        for name in ("shard_size", "batch_size"):
            positive_int(getattr(self, name), name)
        if self.resume and self.force:
            raise CoromError("--resume keeps the finished shards and --force deletes them: give one of the two")
        if self.truncate_dim is not None:
            positive_int(self.truncate_dim, "truncate_dim")  # its upper bound is the model's: checked at load
        check_shape_options(1 << 20, None, self.precision)
        if self.chunking not in (None, "mean"):
            raise CoromError(f"chunking must be 'mean' or none, got {self.chunking!r}")
        if self.truncation_direction not in DIRECTIONS or not isinstance(self.truncate, bool):
            raise CoromError(f"truncation_direction must be one of {', '.join(DIRECTIONS)} and truncate true or false, "
                             f"got {self.truncation_direction!r} / {self.truncate!r}")


JOB_KEYS = ("input_format", "output_format", "text_field", "id_field", "shard_size", "skip_bad", "prompt_name",
            "truncate_dim", "precision", "truncate", "truncation_direction", "chunking", "chunk_overlap")
# what a job recorded before a key existed meant: its default (a resumed older job is not refused for it)
_RECORDED_DEFAULTS = {"truncate_dim": None, "precision": "float32", "truncate": True, "truncation_direction": "right",
                      "chunking": None, "chunk_overlap": 32}


@dataclass
class Survey:
    """The checked pass over the input: what will be embedded, and what cannot be."""

    rows: int = 0                      # rows that will be embedded
    bad: int = 0                       # rows that cannot be
    bad_examples: list[str] = field(default_factory=list)
    id_type: str = "int"               # "int" when every id is an integer, else "str"
    duplicate_ids: list[str] = field(default_factory=list)


def survey(rows: Iterator[Row]) -> Survey:
    """One pass over the rows: counts, bad rows (first `SHOWN_BAD_ROWS` described), id type, duplicate ids.

    Duplicates are found from 8-byte hashes (80 MB for 10M rows) and then named by a second look at
    the colliding hashes only, so no set of 10M strings is ever built.
    """
    result = Survey()
    hashes = array("Q")
    lines = array("q")
    for row in rows:
        problem = row_problem(row)
        if problem:
            result.bad += 1
            if len(result.bad_examples) < SHOWN_BAD_ROWS:
                result.bad_examples.append(describe(row, problem))
            continue
        result.rows += 1
        if not isinstance(row.id, int) or isinstance(row.id, bool):
            result.id_type = "str"
        hashes.append(id_hash(row.id))
        lines.append(row.line)
    if result.rows:
        keys = np.frombuffer(hashes, dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        repeated = np.nonzero(ordered[1:] == ordered[:-1])[0] + 1
        line_of = np.frombuffer(lines, dtype=np.int64)
        result.duplicate_ids = [f"line {line_of[order[i]]} repeats the id of line {line_of[order[i - 1]]}"
                                for i in repeated[:SHOWN_BAD_ROWS]]
    return result


def checked_input(options: BulkOptions) -> tuple[str, Survey, str]:
    """(format, survey, fingerprint) of the input, or a `CoromError` before anything is written."""
    fmt = input_format(options.input, options.input_format)
    if not options.input.is_file():
        raise CoromError(f"{options.input}: no such file")
    found = survey(read_rows(options.input, fmt, options.text_field, options.id_field))
    check_survey(found, options)
    return fmt, found, file_fingerprint(options.input)


def check_survey(found: Survey, options: BulkOptions) -> None:
    """Raise a `CoromError` that lists the bad rows unless the job may go on."""
    if found.duplicate_ids:
        raise CoromError(f"{options.input}: ids must be unique, found repeats: " + "; ".join(found.duplicate_ids)
                         + f"; fix the input, or give another --id-field than {options.id_field!r}")
    if found.bad and not options.skip_bad:
        more = f" (and {found.bad - len(found.bad_examples)} more)" if found.bad > len(found.bad_examples) else ""
        raise CoromError(f"{options.input}: {found.bad} row(s) cannot be embedded; nothing was written. "
                         + "; ".join(found.bad_examples) + more
                         + ". Fix them, or give --skip-bad to leave them out (they are counted in the summary)")
    if not found.rows:
        raise CoromError(f"{options.input}: no row to embed ({found.bad} bad)")


@dataclass(frozen=True)
class BulkSummary:
    """What a job did. `rows` counts every row in the output, `reused` those from an earlier run."""

    output: str
    rows: int
    reused: int
    skipped_bad: int
    tokens: int
    truncated: int
    shards: int
    seconds: float
    texts_per_s: float
    model: str
    variant: str
    engine: str = "local"

    def to_dict(self) -> dict:
        return asdict(self)


def job_record(options: BulkOptions, fmt: str, fingerprint: str, found: Survey, model: str, variant: str,
               model_sha256: str) -> dict:
    """What identifies a job for `--resume`: the input's bytes, the model by its path *and* the content
    hash of the variant's file (a re-export at the same path is another model), and every setting."""
    return {"input": str(options.input), "fingerprint": fingerprint, "rows": found.rows, "bad": found.bad,
            "id_type": found.id_type, "model": model, "variant": variant, "model_sha256": model_sha256,
            **{key: getattr(options, key) for key in JOB_KEYS}, "input_format": fmt}


def resume_mismatch(recorded: dict, current: dict) -> str | None:
    """Which recorded setting a resumed run would change, or None. Pure."""
    for key in ("fingerprint", "model", "variant", "model_sha256", *JOB_KEYS):
        default = _RECORDED_DEFAULTS.get(key)
        if recorded.get(key, default) != current.get(key, default):
            what = {"fingerprint": "the input file changed since the job began",
                    "model_sha256": "the model's file changed since the job began (re-exported?): its vectors "
                                    "would not match the finished shards'"}.get(
                key, f"{key} was {recorded.get(key)!r}, now {current.get(key)!r}")
            return what
    return None


# what `corom embed` writes into its output folder: all `--force` may remove
OWN_FILES = ("part-*", "*.parquet", "*.tmp", JOB_FILE, SUMMARY_FILE)


def own_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in OWN_FILES for p in folder.glob(pattern) if p.is_file()})


def clear_own_output(out: Path) -> None:
    """`--force`: remove what an earlier `corom embed` wrote in `out`, and nothing else. Refuses a
    folder without its `_job.json` marker: `--force` never deletes what corom did not write."""
    if not (out / JOB_FILE).is_file():
        raise CoromError(f"{out} is not empty and holds no {JOB_FILE}: it was not written by `corom embed`, so "
                         "--force will not delete anything in it; choose another --output (or empty it yourself)")
    for path in own_files(out):
        path.unlink()


def prepare_output(options: BulkOptions, record: dict) -> dict:
    """Create or reopen the output folder; returns the job record in force. Refuses to mix two jobs."""
    out = options.output
    job = out / JOB_FILE
    if out.exists() and not out.is_dir():
        raise CoromError(f"--output {out} is a file, not a folder; choose another --output")
    if out.exists() and any(out.iterdir()):
        if options.force:
            clear_own_output(out)
        elif not options.resume:
            raise CoromError(f"{out} exists and is not empty: give --resume to continue that job, "
                             "--force to replace it, or another --output")
        elif not job.exists():
            raise CoromError(f"{out} holds no {JOB_FILE}: it was not written by `corom embed`; "
                             "give another --output")
        else:
            recorded = json.loads(job.read_text(encoding="utf-8"))
            mismatch = resume_mismatch(recorded, record)
            if mismatch:
                raise CoromError(f"cannot --resume {out}: {mismatch}; give the same settings, "
                                 "or --force to start over")
            return recorded
    out.mkdir(parents=True, exist_ok=True)
    write_json(job, record)
    return record


def shard_count(rows: int, shard_size: int) -> int:
    return -(-rows // shard_size)


def embed_corpus(options: BulkOptions, load_embedder: Callable[[str | None], "object"],
                 progress: bool | None = None) -> BulkSummary:
    """Embed `options.input` into `options.output`; see the module docstring.

    `load_embedder(variant)` returns an `Embedder` (variant None: the caller's choice; on `--resume`
    the recorded variant, so a resumed job never mixes two variants' vectors).
    progress: a tqdm bar with texts/s and ETA; None = only when stderr is a terminal.

    >>> from corom_runtime import Embedder                                             # doctest: +SKIP
    >>> embed_corpus(BulkOptions(Path("corpus.jsonl"), Path("vectors"), id_field="doc_id"),
    ...              lambda v: Embedder.load("all-minilm-l6-v2", variant=v or "auto")).rows   # doctest: +SKIP
    """
    started = time.perf_counter()
    fmt, found, fingerprint = checked_input(options)
    recorded_variant = None
    if options.resume and (options.output / JOB_FILE).exists():
        recorded_variant = json.loads((options.output / JOB_FILE).read_text(encoding="utf-8")).get("variant")
    embedder = load_embedder(recorded_variant)
    embedder.prompt_text(options.prompt_name)  # an unknown prompt name fails here, before any output
    embedder.shaping(options.truncate_dim, options.precision)  # and so does a bad dimension or precision
    record = job_record(options, fmt, fingerprint, found, str(embedder.artifact.path), embedder.variant,
                        embedder.artifact.variants[embedder.variant].sha256)
    prepare_output(options, record)

    shards = shard_count(found.rows, options.shard_size)
    done = {i for i in range(shards)
            if shard_rows(options.output, i, options.output_format) == _rows_in_shard(i, found.rows, options.shard_size)}
    reused = sum(_rows_in_shard(i, found.rows, options.shard_size) for i in done)
    bar = progress_bar(found.rows, reused, progress)
    tokens = truncated = embedded = 0
    try:
        for index, rows in enumerate(_shards(read_rows(options.input, fmt, options.text_field, options.id_field),
                                             options.shard_size)):
            if index in done:
                continue
            data = _embed_shard(embedder, rows, options.batch_size, bar, options.encode_options())
            write_shard(options.output, index, options.output_format, data, found.id_type)
            tokens += int(data.tokens.sum())
            truncated += int(data.truncated.sum())
            embedded += len(rows)
    finally:
        bar.close()
    for index in done:  # the totals describe the whole output, so count the kept shards' tokens too
        _, tokens_kept, truncated_kept = shard_totals(shard_path(options.output, index, options.output_format),
                                                      options.output_format)
        tokens += tokens_kept
        truncated += truncated_kept
    seconds = time.perf_counter() - started
    summary = BulkSummary(output=str(options.output), rows=embedded + reused, reused=reused, skipped_bad=found.bad,
                          tokens=tokens, truncated=truncated, shards=shards, seconds=round(seconds, 3),
                          texts_per_s=round(embedded / seconds, 1) if seconds > 0 else 0.0,
                          model=embedder.artifact.name, variant=embedder.variant)
    write_json(options.output / SUMMARY_FILE, summary.to_dict())
    return summary


def _rows_in_shard(index: int, rows: int, shard_size: int) -> int:
    return min(shard_size, rows - index * shard_size)


def _shards(rows: Iterator[Row], shard_size: int) -> Iterator[list[Row]]:
    """Good rows in shards of `shard_size` (bad rows were counted by the survey and are left out here)."""
    shard: list[Row] = []
    for row in rows:
        if row_problem(row):
            continue
        shard.append(row)
        if len(shard) == shard_size:
            yield shard
            shard = []
    if shard:
        yield shard


def _embed_shard(embedder, rows: list[Row], batch_size: int, bar, encode_options: dict) -> ShardData:
    precision = encode_options.get("precision", "float32")
    width = shaped_width(embedder.dim, encode_options.get("truncate_dim"), precision)
    vectors = np.empty((len(rows), width), dtype=DTYPES[precision])
    tokens = np.empty(len(rows), dtype=np.int32)
    truncated = np.empty(len(rows), dtype=bool)
    for window in embedder.encode_iter((row.text for row in rows), batch_size=batch_size, **encode_options):
        end = window.start + len(window)
        vectors[window.start:end] = window.vectors
        tokens[window.start:end] = window.tokens
        truncated[window.start:end] = window.truncated
        bar.update(len(window))
    return ShardData(ids=[row.id for row in rows], vectors=vectors, tokens=tokens, truncated=truncated,
                     precision=precision)


def assemble_npy(parts: Path, target: Path) -> Path:
    """Join a finished npy job's shards into one array `target` (+ `target.jsonl`: id, tokens,
    truncated per row), through a memory map so memory stays one shard; then remove `parts`."""
    summary = json.loads((parts / SUMMARY_FILE).read_text(encoding="utf-8"))
    shards = sorted(parts.glob("part-*.npy"))
    first = np.load(shards[0], mmap_mode="r")  # every shard has the job's width and precision's dtype
    array_out = np.lib.format.open_memmap(target.with_name(target.name + ".tmp"), mode="w+", dtype=first.dtype,
                                          shape=(summary["rows"], int(first.shape[1])))
    row = 0
    with open(target.with_name(target.name + ".jsonl"), "w", encoding="utf-8") as meta:
        for shard in shards:
            block = np.load(shard, mmap_mode="r")
            array_out[row:row + len(block)] = block
            row += len(block)
            meta.write(shard.with_suffix(".jsonl").read_text(encoding="utf-8"))
    array_out.flush()
    del array_out
    target.with_name(target.name + ".tmp").replace(target)
    shutil.rmtree(parts)
    return target
