"""Embedding whole corpora on one machine: a checked pass over the input, then shards as it goes.

`corom embed FILE --output DIR` runs `embed_corpus`:
1. `survey` reads the input once without embedding: it counts the rows, finds every bad row (missing or
   non-string text, invalid JSON, missing, ill-typed or duplicate id, ids of two types) and fingerprints
   the file; under `truncate=False` every text is also tokenized, so an over-length one is named here.
   Bad rows stop the job here, before anything is written, unless `skip_bad` is set. Blank texts are
   skipped and counted, always (`corpus_io.BLANK`).
2. The job's identity goes to `DIR/_job.json`; rows are embedded `shard_size` at a time and each shard is
   written atomically (`corpus_io.write_shard`), so an interrupted job leaves only whole shards. Every
   name a job creates in DIR is first recorded in its ledger (`corpus_io.LEDGER_FILE`): `--force`
   removes those and nothing else.
3. `resume=True` checks `_job.json` against the new run (same input bytes, the model's content identity,
   engine, variant and every setting that changes vectors), keeps every finished shard and embeds only
   the rest: no row twice, none lost.
4. `DIR/_summary.json` is written last: rows, tokens, truncated, skipped, files, seconds, texts/s.
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

from corom_runtime.bulk.corpus_io import (BLANK, LEDGER_FILE, OUTPUT_FORMATS, Row, ShardData, describe,
                                          file_fingerprint, id_hash, input_format, read_rows, record_written,
                                          recorded_written, row_problem, shard_files, shard_path, shard_rows,
                                          shard_totals, tmp_path, write_json, write_shard)
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
    blank: int = 0                     # blank texts: skipped and counted, never an error
    bad_examples: list[str] = field(default_factory=list)
    id_type: str = "int"               # "int" when every id is an integer, "str" when every id is a string
    duplicate_ids: list[str] = field(default_factory=list)
    mixed_ids: str | None = None       # where integer and string ids first meet: one id type per job
    no_text_field: list[int] = field(default_factory=list)   # lines of JSON objects without the text field
    keys_seen: dict[str, None] = field(default_factory=dict)  # the keys those objects have (ordered, capped)


def survey(rows: Iterator[Row]) -> Survey:
    """One pass over the rows: counts, bad and blank rows (first `SHOWN_BAD_ROWS` bad ones described), the
    id type, duplicate ids.

    Duplicates are found from 8-byte hashes (80 MB for 10M rows) and then named by a second look at
    the colliding hashes only, so no set of 10M strings is ever built.
    """
    result = Survey()
    hashes = array("Q")
    lines = array("q")
    first_of_type: dict[type, Row] = {}
    for row in rows:
        problem = row_problem(row)
        if problem == BLANK:
            result.blank += 1
            continue
        if problem:
            result.bad += 1
            if row.keys is not None and problem == "text is missing":  # listed once, with the keys, not per row
                result.no_text_field.append(row.line)
                if len(result.keys_seen) < 50:
                    result.keys_seen.update(dict.fromkeys(row.keys))
            elif len(result.bad_examples) < SHOWN_BAD_ROWS:
                result.bad_examples.append(describe(row, problem))
            continue
        result.rows += 1
        first_of_type.setdefault(type(row.id), row)
        hashes.append(id_hash(row.id))
        lines.append(row.line)
    if len(first_of_type) > 1:
        a, b = sorted(first_of_type.values(), key=lambda r: r.line)
        result.mixed_ids = (f"line {a.line} has the {type(a.id).__name__} id {a.id!r} and line {b.line} the "
                            f"{type(b.id).__name__} id {b.id!r}")
    result.id_type = "str" if str in first_of_type else "int"
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
    """Raise a `CoromError` that lists the bad rows unless the job may go on. An input with no row to
    embed is not an error: its job writes an empty output and a summary of 0 rows."""
    if found.mixed_ids:
        raise CoromError(f"{options.input}: ids must be all integers or all strings (7 and '7' would be one "
                         f"id in the output): {found.mixed_ids}; write every id as a string, or as an integer")
    if found.duplicate_ids:
        raise CoromError(f"{options.input}: ids must be unique, found repeats: " + "; ".join(found.duplicate_ids)
                         + f"; fix the input, or give another --id-field than {options.id_field!r}")
    if found.bad and not options.skip_bad:
        listed = list(found.bad_examples)
        if found.no_text_field:
            lines = ", ".join(map(str, found.no_text_field[:5])) + (" ..." if len(found.no_text_field) > 5 else "")
            listed.insert(0, f"{len(found.no_text_field)} row(s) have no field {options.text_field!r} (line {lines}); "
                             f"their keys: {', '.join(found.keys_seen) or 'none'}: give --text-field KEY")
        shown = len(found.bad_examples) + len(found.no_text_field)
        more = f" (and {found.bad - shown} more)" if found.bad > shown else ""
        raise CoromError(f"{options.input}: {found.bad} row(s) cannot be embedded; nothing was written. "
                         + "; ".join(listed) + more
                         + ". Fix them, or give --skip-bad to leave them out (they are counted in the summary)")


def check_lengths(options: BulkOptions, fmt: str, tokenizer, prompt: str) -> None:
    """Under `truncate=False` (and no chunking), every text fits the model's window: checked here, before
    anything is written, so the error never leaves a half-begun job behind. Names the first over-length
    rows by line and id."""
    if options.truncate or options.chunking:
        return
    over: list[str] = []
    count = 0
    batch: list[Row] = []

    def check(rows: list[Row]) -> None:
        nonlocal count
        items = tokenizer.encode([r.text for r in rows], prompt=prompt, truncate=True,
                                 direction=options.truncation_direction)
        cut = [r for r, item in zip(rows, items) if item.truncated]
        count += len(cut)
        for row, tokens in zip(cut, tokenizer.token_counts([r.text for r in cut[:SHOWN_BAD_ROWS]], prompt)):
            if len(over) < SHOWN_BAD_ROWS:
                over.append(describe(row, f"{tokens} tokens"))

    for row in read_rows(options.input, fmt, options.text_field, options.id_field):
        if row_problem(row) is None:
            batch.append(row)
            if len(batch) == 1024:
                check(batch)
                batch = []
    if batch:
        check(batch)
    if count:
        raise CoromError(f"{options.input}: {count} text(s) longer than the model's {tokenizer.max_length} tokens "
                         f"under --no-truncate; nothing was written: " + "; ".join(over)
                         + (" ..." if count > len(over) else "")
                         + ". Drop --no-truncate to cut them, or give --chunking mean to embed them whole")


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
    skipped_blank: int = 0
    files: list[str] = field(default_factory=list)   # the data files written, as paths under `output`

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelIdentity:
    """The model as a job records it: `path` and `sha256` (of the variant's graph) for people, `identity`
    (`artifacts.identity.variant_identity`: every file the variant reads, by content, and the manifest
    settings that change vectors) for `--resume`, whatever path or preset name the model was given by."""

    path: str
    variant: str
    sha256: str
    identity: str
    width: int          # the job's vectors: numbers (bytes for binary) per row, and their dtype
    dtype: str
    prompt: str         # the prompt text put before every row ("" for none)


def model_identity(artifact, variant: str, options: BulkOptions, prompt: str) -> ModelIdentity:
    from corom_runtime.artifacts.identity import variant_identity

    precision = options.precision
    width = shaped_width(artifact.manifest.embedding_dim, options.truncate_dim, precision)
    return ModelIdentity(path=str(artifact.path), variant=variant, sha256=artifact.variants[variant].sha256,
                         identity=variant_identity(artifact, variant), width=width,
                         dtype=np.dtype(DTYPES[precision]).name, prompt=prompt)


def job_record(options: BulkOptions, fmt: str, fingerprint: str, found: Survey, model: ModelIdentity,
               engine: str) -> dict:
    """What identifies a job for `--resume`: the input's bytes, the engine, the model by content (not by
    path: a re-export at the same path is another model, the same artifact by preset or by path the
    same), the prompt text and every setting."""
    return {"input": str(options.input), "fingerprint": fingerprint, "rows": found.rows, "bad": found.bad,
            "blank": found.blank, "id_type": found.id_type, "engine": engine, "model": model.path,
            "variant": model.variant, "model_sha256": model.sha256, "model_identity": model.identity,
            "prompt_text": model.prompt, "width": model.width, "dtype": model.dtype,
            **{key: getattr(options, key) for key in JOB_KEYS}, "input_format": fmt}


# compared on --resume, in this order (the first difference is named); "model" (a path) is not: identity is content
RESUME_KEYS = ("engine", "fingerprint", "variant", "model_sha256", "model_identity", "prompt_text", *JOB_KEYS)


def resume_mismatch(recorded: dict, current: dict) -> str | None:
    """Which recorded setting a resumed run would change, or None. Pure."""
    defaults = {**_RECORDED_DEFAULTS, "engine": "local"}
    for key in RESUME_KEYS:
        default = defaults.get(key)
        if recorded.get(key, default) != current.get(key, default):
            what = {"fingerprint": "the input file changed since the job began",
                    "model_sha256": "the model's file changed since the job began (re-exported?): its vectors "
                                    "would not match the finished shards'",
                    "model_identity": "the model changed since the job began (one of the files its variant reads, "
                                      "or a setting in its manifest): its vectors would not match the finished "
                                      "shards'",
                    "engine": f"the job was begun by --engine {recorded.get(key, default)} and its shards are not "
                              f"--engine {current.get(key, default)}'s"}.get(
                key, f"{key} was {recorded.get(key)!r}, now {current.get(key)!r}")
            return what
    return None


def check_resumed_variant(out: Path, recorded: str | None, asked: str | None) -> None:
    """`--resume` embeds with the job's recorded variant (a job never mixes two variants' vectors): a
    different variant asked for by name is refused, not silently replaced; `auto` keeps the job's."""
    if recorded is None or asked in (None, recorded):
        return
    if asked == "auto":
        log.info("--resume: --variant auto keeps the job's variant %s (%s)", recorded, out)
        return
    raise CoromError(f"cannot --resume {out}: variant was {recorded!r}, now {asked!r}: a job never mixes two "
                     f"variants' vectors; give --variant {recorded} (or auto, which keeps the job's), "
                     "or --force to start over")


def clear_own_output(out: Path) -> None:
    """`--force`: remove what an earlier `corom embed` wrote in `out` (the names in its ledger), and nothing
    else. Refuses a folder without its `_job.json` marker: `--force` never deletes what corom did not write."""
    if not (out / JOB_FILE).is_file():
        raise CoromError(f"{out} is not empty and holds no {JOB_FILE}: it was not written by `corom embed`, so "
                         "--force will not delete anything in it; choose another --output (or empty it yourself)")
    names = recorded_written(out)
    if names is None:
        raise CoromError(f"{out} holds a {JOB_FILE} but no {LEDGER_FILE} (written by an older corom, which did not "
                         "record its files): --force cannot tell its files from yours; delete them yourself, or "
                         "choose another --output")
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    (out / LEDGER_FILE).unlink(missing_ok=True)  # it names itself: usually gone already


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
            record_written(out, _job_files(out))
            return recorded
    out.mkdir(parents=True, exist_ok=True)
    # the ledger first, naming itself: from here on nothing is created in `out` before its name is on disk
    record_written(out, _job_files(out))
    write_json(job, record)
    return record


def _job_files(out: Path) -> list[Path]:
    return [out / LEDGER_FILE, out / JOB_FILE, tmp_path(out / JOB_FILE), out / SUMMARY_FILE,
            tmp_path(out / SUMMARY_FILE)]


def shard_count(rows: int, shard_size: int) -> int:
    return -(-rows // shard_size)


def embed_corpus(options: BulkOptions, load_embedder: Callable[[str | None], "object"],
                 progress: bool | None = None, variant: str = "auto") -> BulkSummary:
    """Embed `options.input` into `options.output`; see the module docstring.

    `load_embedder(variant)` returns an `Embedder` (variant None: the caller's choice; on `--resume`
    the recorded variant, so a resumed job never mixes two variants' vectors).
    `variant`: the one the caller asked for; on `--resume` a named one other than the job's is refused
    (`auto` keeps the job's).
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
        check_resumed_variant(options.output, recorded_variant, variant)
    embedder = load_embedder(recorded_variant)
    prompt = embedder.prompt_text(options.prompt_name)  # an unknown prompt name fails here, before any output
    embedder.shaping(options.truncate_dim, options.precision)  # and so does a bad dimension or precision
    check_lengths(options, fmt, embedder.tokenizer, prompt)
    model = model_identity(embedder.artifact, embedder.variant, options, prompt)
    prepare_output(options, job_record(options, fmt, fingerprint, found, model, "local"))

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
            record_written(options.output, shard_files(options.output, index, options.output_format))
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
    files = [p.name for i in range(shards) for p in shard_files(options.output, i, options.output_format)
             if not p.name.endswith(".tmp")]
    summary = BulkSummary(output=str(options.output), rows=embedded + reused, reused=reused, skipped_bad=found.bad,
                          tokens=tokens, truncated=truncated, shards=shards, seconds=round(seconds, 3),
                          texts_per_s=round(embedded / seconds, 1) if seconds > 0 else 0.0,
                          model=embedder.artifact.name, variant=embedder.variant, skipped_blank=found.blank,
                          files=files)
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
    truncated per row), through a memory map so memory stays one shard; then remove `parts`.
    A job of 0 rows gives an array of shape (0, width) and an empty `.jsonl`."""
    summary = json.loads((parts / SUMMARY_FILE).read_text(encoding="utf-8"))
    job = json.loads((parts / JOB_FILE).read_text(encoding="utf-8"))
    shards = [shard_path(parts, i, "npy") for i in range(summary["shards"])]
    array_out = np.lib.format.open_memmap(tmp_path(target), mode="w+", dtype=np.dtype(job["dtype"]),
                                          shape=(summary["rows"], int(job["width"])))
    row = 0
    with open(target.with_name(target.name + ".jsonl"), "w", encoding="utf-8") as meta:
        for shard in shards:
            block = np.load(shard, mmap_mode="r")
            array_out[row:row + len(block)] = block
            row += len(block)
            meta.write(shard.with_suffix(".jsonl").read_text(encoding="utf-8"))
    array_out.flush()
    del array_out
    tmp_path(target).replace(target)
    shutil.rmtree(parts)
    return target
