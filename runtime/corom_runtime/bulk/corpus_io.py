"""Corpora in and embeddings out: rows from text/JSONL/Parquet files, shards written atomically.

Reading is lazy (one row at a time, Parquet in record batches), so a corpus never has to fit in
memory. A shard appears under its final name only once it is complete (written to a temporary name,
flushed to disk, then renamed), so a job killed at any moment leaves whole shards or none.
Parquet needs `pyarrow` (the `[bulk]` extra); text, JSONL and `.npy` need nothing beyond numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from corom_runtime.errors import CoromError

INPUT_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
OUTPUT_FORMATS = ("parquet", "npy")
PYARROW_HINT = "Parquet needs pyarrow: pip install 'corom-onnx[bulk]'"


@dataclass(frozen=True)
class Row:
    """One input row. `line` is the 1-based line (text, JSONL) or row number (Parquet) for messages;
    `problem` is set when the row cannot even be read (invalid JSON, no id)."""

    id: Any
    text: Any
    line: int
    problem: str | None = None
    keys: tuple[str, ...] | None = None   # a JSON object without the text field: the keys it has


# a blank text (empty or whitespace only) is skipped and counted, never embedded and never a job-stopping
# error: one rule for every corpus engine (README, "Embed a corpus")
BLANK = "text is empty"
INT64_MAX = (1 << 63) - 1


def text_problem(text: Any) -> str | None:
    """Why `text` cannot be embedded, or None. Pure: the same rule on every engine."""
    if text is None:
        return "text is missing"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string"
    if not text.strip():
        return BLANK
    return None


def id_problem(row_id: Any) -> str | None:
    """Why `row_id` cannot be an output id, or None: ids are strings or 64-bit signed integers (the
    Parquet id column is int64 or string), checked before anything is embedded."""
    if row_id is None:
        return "id is missing"
    if isinstance(row_id, bool) or not isinstance(row_id, (int, str)):
        return f"id is {type(row_id).__name__}: ids must be strings or integers"
    if isinstance(row_id, int) and not -INT64_MAX - 1 <= row_id <= INT64_MAX:
        return f"id {row_id} does not fit a 64-bit signed integer: write it as a string"
    return None


def row_problem(row: Row) -> str | None:
    """Why `row` is left out (`BLANK` for a blank text: skipped and counted; anything else: a bad row)."""
    return row.problem or id_problem(row.id) or text_problem(row.text)


def describe(row: Row, problem: str) -> str:
    """`line N (id X): problem`, the id only when the row has one (an unreadable JSONL line has none)."""
    named = "" if row.id is None else f" (id {row.id!r})"
    return f"line {row.line}{named}: {problem}"


def input_format(path: Path, given: str | None = None) -> str:
    """The input's format: `given`, else read from the file suffix (.txt, .jsonl, .parquet)."""
    if given:
        return given
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CoromError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                         f"give --input-format {'|'.join(sorted(set(INPUT_FORMATS.values())))}")
    return fmt


def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise CoromError(f"{PYARROW_HINT} ({exc})") from exc
    return pyarrow


def read_rows(path: Path, fmt: str, text_field: str = "text", id_field: str | None = None) -> Iterator[Row]:
    """Every row of the file, in order, bad ones included (see `row_problem`).

    Ids: the `id_field` value, else the row's 0-based position in the file.
    """
    if fmt == "text":
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            for index, line in enumerate(handle):
                yield Row(id=index, text=line.rstrip("\r\n"), line=index + 1)
    elif fmt == "jsonl":
        with open(path, encoding="utf-8", errors="replace") as handle:
            for index, line in enumerate(handle):
                yield _json_row(line, index, text_field, id_field)
    elif fmt == "parquet":
        pq = import_pyarrow().parquet
        source = pq.ParquetFile(path)
        names = source.schema_arrow.names
        for field in (text_field, id_field):
            if field is not None and field not in names:
                raise CoromError(f"{path}: no column {field!r} (columns: {', '.join(names)}); "
                                 "give --text-field / --id-field")
        columns = [text_field] + ([id_field] if id_field else [])
        index = 0
        for batch in source.iter_batches(columns=columns, batch_size=8192):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if id_field else range(index, index + len(texts))
            for offset, (text, row_id) in enumerate(zip(texts, ids)):
                yield Row(id=row_id, text=text, line=index + offset + 1)
            index += len(texts)
    else:
        raise CoromError(f"unknown input format {fmt!r}: one of text, jsonl, parquet")


def _json_row(line: str, index: int, text_field: str, id_field: str | None) -> Row:
    # an unreadable line has no id of its own when ids come from `id_field` (its position is not its id)
    position = index if id_field is None else None
    if not line.strip():  # a blank line is blank text: skipped and counted, as in a .txt file
        return Row(id=position, text="", line=index + 1, problem=BLANK)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return Row(id=position, text=None, line=index + 1, problem=f"not valid JSON ({exc.msg})")
    if not isinstance(record, dict):
        return Row(id=position, text=None, line=index + 1,
                   problem=f"not a JSON object but {type(record).__name__}")
    keys = None if text_field in record else tuple(record)
    if id_field is None:
        return Row(id=index, text=record.get(text_field), line=index + 1, keys=keys)
    row_id = record.get(id_field)
    problem = id_problem(row_id)
    if problem:
        problem = f"id field {id_field!r} is missing" if row_id is None else f"id field {id_field!r}: {problem}"
        return Row(id=None if row_id is None else repr(row_id), text=None, line=index + 1, problem=problem)
    return Row(id=row_id, text=record.get(text_field), line=index + 1, keys=keys)


def file_fingerprint(path: Path) -> str:
    """blake2b of the file's bytes: `--resume` refuses an input that changed since the job began."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def id_hash(row_id: Any) -> int:
    """64-bit hash of an id (typed: 7 and "7" differ), so duplicates are found in 8 bytes per row."""
    raw = f"{type(row_id).__name__}:{row_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


# -- output shards ---------------------------------------------------------------------------

@dataclass
class ShardData:
    """One shard's rows, in input order."""

    ids: list
    vectors: np.ndarray     # [n, width] of the precision's dtype (float32 [n, dim] by default)
    tokens: np.ndarray      # int32 [n]
    truncated: np.ndarray   # bool [n]
    precision: str = "float32"


# where a Parquet shard names its vectors' precision (int8 and binary share a dtype, not a meaning)
PRECISION_KEY = b"corom.precision"


def shard_path(folder: Path, index: int, fmt: str) -> Path:
    return folder / f"part-{index:05d}.{fmt}"


def shard_files(folder: Path, index: int, fmt: str) -> list[Path]:
    """Every file writing shard `index` creates, temporary names included (for the ledger)."""
    path = shard_path(folder, index, fmt)
    paths = [path] + ([path.with_suffix(".jsonl")] if fmt == "npy" else [])
    return [q for p in paths for q in (p, tmp_path(p))]


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


# -- the ledger: every name a job creates in its output folder, recorded before it is created ---------

LEDGER_FILE = "_files.txt"


def record_written(folder: Path, paths: list[Path]) -> None:
    """Append the names of `paths` (files or folders directly in `folder`) to the folder's ledger, on disk
    before they are created: `--force` then removes exactly what a job wrote, whenever it was killed."""
    names = [p.name for p in paths]
    with open(folder / LEDGER_FILE, "a", encoding="utf-8") as handle:
        handle.write("".join(name + "\n" for name in names))
        handle.flush()
        os.fsync(handle.fileno())


def recorded_written(folder: Path) -> list[str] | None:
    """The names in `folder`'s ledger (plain names only: a hand-edited line cannot reach outside the
    folder), or None when it has none."""
    try:
        lines = (folder / LEDGER_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    return list(dict.fromkeys(n for n in lines if n and n not in (".", "..") and Path(n).name == n))


def arrow_table(data: ShardData, id_type: str):
    """The output schema shared by every engine: id, embedding, tokens, truncated. The embedding is a
    fixed-size list of float32 (int8 / uint8 for those precisions), or fixed-size binary for the packed
    bits of binary / ubinary; the schema's metadata names the precision."""
    pa = import_pyarrow()
    ids = pa.array(data.ids, type=pa.int64() if id_type == "int" else pa.string())
    vectors = np.ascontiguousarray(data.vectors)
    width = vectors.shape[1] if vectors.ndim == 2 else 0
    if data.precision in ("binary", "ubinary"):
        embedding = pa.array([row.tobytes() for row in vectors.view(np.uint8)], type=pa.binary(width))
    else:
        kind = {"int8": pa.int8(), "uint8": pa.uint8()}.get(data.precision, pa.float32())
        flat = pa.array(vectors.reshape(-1).astype(kind.to_pandas_dtype(), copy=False), type=kind)
        embedding = pa.FixedSizeListArray.from_arrays(flat, width)
    table = pa.table({"id": ids, "embedding": embedding, "tokens": pa.array(data.tokens, type=pa.int32()),
                      "truncated": pa.array(data.truncated, type=pa.bool_())})
    return table.replace_schema_metadata({PRECISION_KEY: data.precision.encode()})


def atomic_write(path: Path, write) -> None:
    """`write(tmp)`, fsync, then rename over `path`: a crash leaves the old file or the new, never half."""
    tmp = tmp_path(path)
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2), encoding="utf-8"))


def write_shard(folder: Path, index: int, fmt: str, data: ShardData, id_type: str) -> Path:
    """Write one shard under its final name only once complete. Parquet: one file; npy: the vectors
    plus `part-N.jsonl` (id, tokens, truncated per row), the .npy written last so it marks completion."""
    path = shard_path(folder, index, fmt)
    if fmt == "parquet":
        pq = import_pyarrow().parquet
        atomic_write(path, lambda tmp: pq.write_table(arrow_table(data, id_type), tmp))
    elif fmt == "npy":
        def write_meta(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                for row_id, tokens, cut in zip(data.ids, data.tokens.tolist(), data.truncated.tolist()):
                    handle.write(json.dumps({"id": row_id, "tokens": tokens, "truncated": cut}, ensure_ascii=False) + "\n")

        def write_vectors(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(data.vectors))  # its dtype is the precision's

        atomic_write(path.with_suffix(".jsonl"), write_meta)
        atomic_write(path, write_vectors)
    else:
        raise CoromError(f"unknown output format {fmt!r}: one of {', '.join(OUTPUT_FORMATS)}")
    return path


def shard_rows(folder: Path, index: int, fmt: str) -> int | None:
    """Rows of a finished shard, or None when it is absent or unreadable (then it is recomputed)."""
    path = shard_path(folder, index, fmt)
    if not path.exists():
        return None
    try:
        if fmt == "parquet":
            return import_pyarrow().parquet.ParquetFile(path).metadata.num_rows
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError):
        return None


def shard_totals(path: Path, fmt: str) -> tuple[int, int, int]:
    """(rows, tokens, truncated) of one finished shard, read from its small columns only."""
    if fmt == "parquet":
        table = import_pyarrow().parquet.read_table(path, columns=["tokens", "truncated"])
        truncated = table.column("truncated").to_numpy(zero_copy_only=False)
        return table.num_rows, int(table.column("tokens").to_numpy().sum()), int(truncated.sum())
    metas = [json.loads(line) for line in path.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()]
    return len(metas), sum(m["tokens"] for m in metas), sum(bool(m["truncated"]) for m in metas)


def read_output(folder: Path) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """Every row of a finished output folder (either format): ids, vectors, tokens, truncated, in shard order."""
    ids: list = []
    vectors, tokens, truncated = [], [], []
    parquet = sorted(folder.glob("*.parquet"))
    if parquet:
        pq = import_pyarrow().parquet
        for path in parquet:
            table = pq.read_table(path)
            ids.extend(table.column("id").to_pylist())
            precision = (table.schema.metadata or {}).get(PRECISION_KEY, b"float32").decode()
            column = table.column("embedding").combine_chunks()
            if precision in ("binary", "ubinary"):
                width = column.type.byte_width
                packed = np.frombuffer(b"".join(column.to_pylist()), dtype=np.uint8).reshape(-1, width)
                vectors.append(packed.view(np.int8) if precision == "binary" else packed)
            else:
                vectors.append(column.flatten().to_numpy().reshape(-1, column.type.list_size))
            tokens.append(table.column("tokens").to_numpy())
            truncated.append(table.column("truncated").to_numpy(zero_copy_only=False))
    else:
        for path in sorted(folder.glob("part-*.npy")):
            vectors.append(np.load(path))
            metas = [json.loads(line) for line in path.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()]
            ids.extend(m["id"] for m in metas)
            tokens.append(np.array([m["tokens"] for m in metas], dtype=np.int32))
            truncated.append(np.array([m["truncated"] for m in metas], dtype=bool))
    if not vectors:
        return [], np.zeros((0, 0), np.float32), np.zeros(0, np.int32), np.zeros(0, bool)
    return ids, np.concatenate(vectors), np.concatenate(tokens), np.concatenate(truncated)
