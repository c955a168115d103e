"""Bulk embedding on Ray Data: `read -> map_batches(EmbedActor) -> write_parquet`, across a cluster.

Ray does the scheduling, the worker pool and the retries (a killed actor is restarted and its batch
retried: Ray Data's actor pools default to `max_restarts=-1`, `max_task_retries=-1`); this module only
says what one replica does. Each `EmbedActor` loads the artifact once and keeps its session; each
call embeds one block, length-sorted inside (`Embedder.encode`). The output has the schema of the
single-machine path (`corpus_io.arrow_table`). `ray` is imported only here (the `[ray]` extra).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corom_runtime.bulk.local import (SUMMARY_FILE, BulkOptions, BulkSummary, check_lengths, checked_input,
                                      job_record, model_identity, prepare_output)
from corom_runtime.bulk.corpus_io import (BLANK, ShardData, arrow_table, id_problem, import_pyarrow, read_rows,
                                          record_written, row_problem, shard_path, shard_totals, text_problem,
                                          write_json)
from corom_runtime.embedder import named_prompt
from corom_runtime.errors import CoromError, positive_int

log = logging.getLogger(__name__)

RAY_HINT = "the Ray engine needs its extra: pip install 'corom-onnx[ray]'"
# rows handed to Ray per block from the driver: big enough to amortize scheduling, small enough to spread
BLOCK_ROWS = 2048
# where Ray's writers put their uuid-named files; recorded in the ledger before Ray starts, and each file is
# renamed (and recorded) as part-NNNNN.parquet once the job is done, the shard names of the local engine
STAGING = "_ray_staging"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise CoromError(f"{RAY_HINT} ({exc})") from exc
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `address` None starts Ray inside this process; "auto" or "ray://HOST:10001" joins
    a running cluster. Each of the `actors` replicas reserves `threads_per_actor` CPUs and runs that many
    intra-op threads."""

    address: str | None = None
    actors: int = 2
    threads_per_actor: int = 1
    batch_rows: int = 512        # rows per map_batches call; sorted by length inside

    def __post_init__(self) -> None:
        for name in ("actors", "threads_per_actor", "batch_rows"):
            positive_int(getattr(self, name), name)


class EmbedActor:
    """One model replica in a Ray actor: `__call__` turns a block (id, text) into output rows."""

    def __init__(self, artifact: str, variant: str, threads: int, batch_size: int, text_column: str,
                 id_column: str, id_type: str, skip_bad: bool, encode_options: dict | None = None) -> None:
        from corom_runtime.embedder import Embedder

        self.embedder = Embedder.load(artifact, variant=variant, device="cpu", threads=threads)
        self.batch_size = batch_size
        self.text_column, self.id_column, self.id_type, self.skip_bad = text_column, id_column, id_type, skip_bad
        self.encode_options = encode_options or {}

    def __call__(self, block):
        texts = block.column(self.text_column).to_pylist()
        ids = block.column(self.id_column).to_pylist()
        keep = []
        for position, (row_id, text) in enumerate(zip(ids, texts)):
            problem = text_problem(text) or id_problem(row_id)
            if problem is None:
                keep.append(position)
            elif problem != BLANK and not self.skip_bad:  # a blank text is skipped, as by the local engine
                # the row is named and the job fails: Ray does not retry a user error
                raise CoromError(f"row with id {row_id!r}: {problem}; give skip_bad=True to leave such rows out")
        vectors, report = self.embedder.encode([texts[i] for i in keep], batch_size=self.batch_size,
                                               return_report=True, **self.encode_options)
        import numpy as np

        data = ShardData(ids=[ids[i] for i in keep], vectors=vectors,
                         tokens=np.array([r.tokens for r in report], dtype=np.int32),
                         truncated=np.array([r.truncated for r in report], dtype=bool),
                         precision=self.encode_options.get("precision", "float32"))
        return arrow_table(data, self.id_type)


def resolve_artifact(artifact: str, variant: str, fidelity: str | None = None):
    """(artifact, concrete variant) as chosen on this machine: every replica then runs the same variant,
    even on a cluster whose nodes would each pick differently for "auto"."""
    from corom_runtime.embedder import artifact_or_export, this_machine
    from corom_runtime.selection import choose_variant

    # the choice and the file checks of `Embedder.load`, without compiling a session the driver never runs
    chosen = artifact_or_export(artifact, export_missing=True)
    name = choose_variant(chosen.variants, variant, "cpu", this_machine(1, "cpu"), chosen.path, fidelity,
                          chosen.manifest.quality.get("stsb_dev_spearman_reference"))
    chosen.check_variant(name)
    chosen.check_tokenizer()
    return chosen, name


def resolve_variant(artifact: str, variant: str) -> tuple[str, str, str]:
    """(artifact path, concrete variant, its file's sha256): `resolve_artifact` for callers that want names."""
    chosen, name = resolve_artifact(artifact, variant)
    return str(chosen.path), name, chosen.variants[name].sha256


def embed_dataset(ds, artifact: str, *, variant: str = "auto", text_column: str = "text", id_column: str = "id",
                  actors: int = 2, threads_per_actor: int = 1, batch_rows: int = 512, batch_size: int = 32,
                  skip_bad: bool = False, prompt_name: str | None = None, truncate_dim: int | None = None,
                  precision: str = "float32", truncate: bool = True, truncation_direction: str = "right",
                  chunking: object = None):
    """Embed a Ray Dataset's `text_column`; returns a lazy Dataset of (id, embedding, tokens, truncated).

    `prompt_name`, `truncate_dim`, `precision`, `truncate`, `truncation_direction`, `chunking`: as in
    `Embedder.encode`.

    The artifact folder must be readable at the same path on every node (a shared or synced disk).

    >>> import ray                                                                          # doctest: +SKIP
    >>> ds = ray.data.read_parquet("s3://bucket/passages/")                                 # doctest: +SKIP
    >>> embed_dataset(ds, "/models/all-minilm-l6-v2", actors=16).write_parquet("s3://bucket/vectors/")  # doctest: +SKIP
    """
    ray = import_ray()
    import pyarrow as pa

    names = ds.schema().names
    for column in (text_column, id_column):
        if column not in names:
            raise CoromError(f"the dataset has no column {column!r} (columns: {', '.join(names)})")
    id_field_type = ds.schema().base_schema.field(id_column).type
    id_type = "int" if pa.types.is_integer(id_field_type) else "str"
    path, concrete, _ = resolve_variant(artifact, variant)
    return ds.map_batches(
        EmbedActor, batch_size=batch_rows, batch_format="pyarrow",
        fn_constructor_kwargs=dict(artifact=path, variant=concrete, threads=threads_per_actor, batch_size=batch_size,
                                   text_column=text_column, id_column=id_column, id_type=id_type, skip_bad=skip_bad,
                                   encode_options=dict(prompt_name=prompt_name, truncate_dim=truncate_dim,
                                                       precision=precision, truncate=truncate,
                                                       truncation_direction=truncation_direction, chunking=chunking)),
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads_per_actor)


def block_rows(rows: int, actors: int) -> int:
    """Rows per input block: at most `BLOCK_ROWS`, and at least four blocks per actor so that every
    replica has work and a retried block is a small share of the job."""
    return max(1, min(BLOCK_ROWS, -(-rows // (4 * actors))))


def _blocks(rows, id_type: str, block_rows: int):
    """The good rows as Arrow tables of `block_rows`, put into Ray's object store one at a time
    (spilled to disk when full), so the driver holds references, not the corpus."""
    import ray
    pa = import_pyarrow()
    ids: list = []
    texts: list[str] = []
    for row in rows:
        if row_problem(row):
            continue
        ids.append(row.id if id_type == "int" else str(row.id))
        texts.append(row.text)
        if len(texts) == block_rows:
            yield ray.put(pa.table({"id": ids, "text": texts}))
            ids, texts = [], []
    if texts:
        yield ray.put(pa.table({"id": ids, "text": texts}))


def run_ray(options: BulkOptions, ray_options: RayOptions, artifact: str, variant: str = "auto",
            progress: bool | None = None, fidelity: str | None = None) -> BulkSummary:
    """`corom embed --engine ray`: the corpus job of `bulk.embed_corpus`, on Ray Data.

    The same checked pass over the input (bad rows stop it before anything is written, or are
    skipped with `skip_bad`), the same output columns; Parquet files named by Ray in `options.output`.
    """
    if options.resume:
        raise CoromError("--resume is for --engine local: Ray retries failed work itself; "
                         "rerun with --force to start the Ray job over")
    if options.output_format != "parquet":
        raise CoromError("--engine ray writes Parquet: drop --format npy")
    ray = import_ray()
    started = time.perf_counter()
    fmt, found, fingerprint = checked_input(options)
    chosen, concrete = resolve_artifact(artifact, variant, fidelity)
    path = str(chosen.path)
    prompt = named_prompt(chosen, options.prompt_name)
    from corom_runtime.tokenization import TextTokenizer

    check_lengths(options, fmt, TextTokenizer.from_file(chosen.tokenizer_path, chosen.max_length), prompt)
    model = model_identity(chosen, concrete, options, prompt)
    prepare_output(options, job_record(options, fmt, fingerprint, found, model, "ray"))
    if not found.rows:  # nothing to embed: no cluster to start, an empty output and its summary
        return _finish(options, found, started, [], chosen.name, concrete)
    staging = options.output / STAGING
    record_written(options.output, [staging])

    started_here = not ray.is_initialized()
    if started_here:
        init: dict[str, Any] = {"address": ray_options.address, "log_to_driver": False,
                                "logging_level": logging.WARNING}
        if ray_options.address is None:
            init.update(num_cpus=ray_options.actors * ray_options.threads_per_actor, include_dashboard=False)
        ray.init(**init)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = bool(progress)
        if not progress:  # Ray Data logs each execution at INFO on stderr: quiet means quiet
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        refs = list(_blocks(read_rows(options.input, fmt, options.text_field, options.id_field), found.id_type,
                            block_rows(found.rows, ray_options.actors)))
        ds = embed_dataset(ray.data.from_arrow_refs(refs), path, variant=concrete, actors=ray_options.actors,
                           threads_per_actor=ray_options.threads_per_actor, batch_rows=ray_options.batch_rows,
                           batch_size=options.batch_size, skip_bad=options.skip_bad, **options.encode_options())
        # writing is light: it must not take CPUs the replicas hold, or it waits for the last of them
        ds.write_parquet(str(staging), ray_remote_args={"num_cpus": 0})
    finally:
        if started_here:
            ray.shutdown()
    shards = []
    for index, written in enumerate(sorted(staging.glob("*.parquet"))):
        final = shard_path(options.output, index, "parquet")
        record_written(options.output, [final])
        written.replace(final)
        shards.append(final)
    if not any(staging.iterdir()):
        staging.rmdir()
    return _finish(options, found, started, shards, chosen.name, concrete)


def _finish(options: BulkOptions, found, started: float, shards: list[Path], model: str,
            variant: str) -> BulkSummary:
    totals = [shard_totals(file, "parquet") for file in shards]
    rows, tokens, truncated = (sum(t[i] for t in totals) for i in range(3))
    seconds = time.perf_counter() - started
    summary = BulkSummary(output=str(options.output), rows=rows, reused=0, skipped_bad=found.bad, tokens=tokens,
                          truncated=truncated, shards=len(shards), seconds=round(seconds, 3),
                          texts_per_s=round(rows / seconds, 1) if seconds > 0 else 0.0, model=model,
                          variant=variant, engine="ray", skipped_blank=found.blank,
                          files=[p.name for p in shards])
    if rows != found.rows:
        raise CoromError(f"the Ray job wrote {rows} rows for {found.rows} input rows; {options.output} is incomplete")
    write_json(options.output / SUMMARY_FILE, summary.to_dict())
    return summary
