"""Corpus jobs (`corom embed FILE -o OUT`): what `--force` may delete, what `--resume` knows a job by,
one id type, every row checked before anything is written, one rule for blank text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from corom_runtime import Embedder
from corom_runtime.artifacts.artifact import load_artifact
from corom_runtime.bulk.corpus_io import LEDGER_FILE, read_output
from corom_runtime.bulk.local import (BulkOptions, Survey, embed_corpus, job_record, model_identity,
                                      resume_mismatch)
from corom_runtime.bulk.ray_job import EmbedActor
from corom_runtime.cli import main as corom
from corom_runtime.errors import CoromError
from test_bulk import cosines, corpus_texts


@pytest.fixture(scope="module")
def fp32(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, variant="fp32", device="cpu")


def run(options: BulkOptions, embedder: Embedder):
    return embed_corpus(options, lambda _: embedder, progress=False)


# -- 1. --force removes what the job recorded, nothing else ------------------------------------------

def test_force_keeps_the_users_files_that_look_like_shards(fp32, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    run(BulkOptions(src, out, shard_size=2), fp32)
    assert "part-00001.parquet" in (out / LEDGER_FILE).read_text().split()
    users = {"notes.parquet": "mine", "backup.tmp": "mine", "part-of-my-notes.txt": "mine"}
    for name, text in users.items():
        (out / name).write_text(text)
    src.write_text("four\n")
    assert run(BulkOptions(src, out, force=True, shard_size=2), fp32).rows == 1
    assert {n: (out / n).read_text() for n in users} == users  # the globs of old deleted all three
    assert sorted(p.name for p in out.glob("part-0*")) == ["part-00000.parquet"]


def test_force_refuses_a_job_folder_without_a_ledger(fp32, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one\n")
    out = tmp_path / "out"
    run(BulkOptions(src, out), fp32)
    (out / LEDGER_FILE).unlink()  # what an older corom left
    with pytest.raises(CoromError, match="cannot tell its files from yours"):
        run(BulkOptions(src, out, force=True), fp32)
    assert (out / "part-00000.parquet").exists()


# -- 2. the job's identity: content, not names ---------------------------------------------------------

def _linked_artifact(source: Path, folder: Path) -> Path:
    """The artifact's manifest at another path, its files as empty stand-ins (no copy of 300 MB): a
    variant's identity rests on the checksums the manifest records (verified at load), not on a path."""
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(b"")
    (folder / "manifest.json").write_text((source / "manifest.json").read_text())
    return folder


def test_resume_knows_an_openvino_variant_by_its_bin_too(bundled_artifact, tmp_path):
    options = BulkOptions(tmp_path / "in.txt", tmp_path / "out")
    art = _linked_artifact(Path(bundled_artifact), tmp_path / "art")
    if "ov-int8" not in load_artifact(art).variants:
        pytest.skip("the shared artifact has no OpenVINO variant with a .bin")
    before = load_artifact(art)
    record = job_record(options, "text", "f", Survey(), model_identity(before, "ov-int8", options, ""), "local")
    # a re-export changed the weights (.bin) and not the graph (.xml): the manifest says so
    manifest = json.loads((art / "manifest.json").read_text())
    text = json.dumps(manifest).replace(before.variants["ov-int8"].files()[1][1], "0" * 64)
    (art / "manifest.json").write_text(text)
    after = load_artifact(art)
    assert after.variants["ov-int8"].sha256 == before.variants["ov-int8"].sha256  # what the job knew it by
    now = job_record(options, "text", "f", Survey(), model_identity(after, "ov-int8", options, ""), "local")
    assert "the model changed since the job began" in resume_mismatch(record, now)


def test_resume_accepts_the_same_model_by_another_path_and_refuses_other_settings(bundled_artifact, tmp_path):
    options = BulkOptions(tmp_path / "in.txt", tmp_path / "out")
    art = _linked_artifact(Path(bundled_artifact), tmp_path / "art")
    identity = lambda a, o=options, p="": model_identity(load_artifact(a), "fp32", o, p)  # noqa: E731
    record = job_record(options, "text", "f", Survey(), identity(bundled_artifact), "local")
    assert resume_mismatch(record, job_record(options, "text", "f", Survey(), identity(art), "local")) is None
    left = BulkOptions(tmp_path / "in.txt", tmp_path / "out", truncation_direction="left")
    assert "truncation_direction" in resume_mismatch(
        record, job_record(left, "text", "f", Survey(), identity(bundled_artifact, left), "local"))
    assert "prompt_text" in resume_mismatch(
        record, job_record(options, "text", "f", Survey(), identity(bundled_artifact, options, "query: "), "local"))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["max_length"] = 64
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert "model changed" in resume_mismatch(
        record, job_record(options, "text", "f", Survey(), identity(art), "local"))


def test_resume_refuses_a_same_size_edit_of_the_input(fp32, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\nsix\n")
    out = tmp_path / "out"
    run(BulkOptions(src, out, shard_size=2), fp32)
    stat = src.stat()
    src.write_text("one\ntwo\nten\n")
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only the bytes differ
    with pytest.raises(CoromError, match="input file changed"):
        run(BulkOptions(src, out, shard_size=2, resume=True), fp32)


def test_resume_refuses_a_folder_another_engine_wrote():
    base = {"fingerprint": "x", "variant": "fp32", "shard_size": 10}
    assert "--engine ray" in resume_mismatch({**base, "engine": "ray"}, {**base, "engine": "local"})
    assert resume_mismatch(base, {**base, "engine": "local"}) is None  # a record without the key: local


def test_a_job_cuts_over_length_texts_where_truncation_direction_says(fp32, tmp_path):
    texts = [" ".join(corpus_texts(12, seed=i)) for i in range(3)]  # past the model's 256 tokens
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n")
    summary = run(BulkOptions(src, tmp_path / "out", truncation_direction="left"), fp32)
    assert summary.truncated == 3
    _, vectors, _, _ = read_output(tmp_path / "out")
    assert cosines(vectors, fp32.encode(texts, truncation_direction="left")).min() >= 0.99999
    assert cosines(vectors, fp32.encode(texts)).max() < 0.999  # the right cut would be another vector


def test_the_ray_actor_names_a_bad_row_and_skips_a_blank_one(bundled_artifact):
    import pyarrow as pa

    block = pa.table({"id": ["a", "b", "c"], "text": ["fine", "  ", None]})
    actor = EmbedActor(str(bundled_artifact), "fp32", 1, 8, "text", "id", "str", skip_bad=False)
    with pytest.raises(CoromError, match=r"row with id 'c': text is missing"):
        actor(block)
    skipping = EmbedActor(str(bundled_artifact), "fp32", 1, 8, "text", "id", "str", skip_bad=True)
    assert skipping(block).column("id").to_pylist() == ["a"]


# -- 4. one id type per job ---------------------------------------------------------------------------

def test_ids_of_two_types_or_past_int64_are_refused_before_embedding(fp32, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 7, "text": "a"}\n{"id": "7", "text": "b"}\n')
    with pytest.raises(CoromError, match=r"all integers or all strings.*line 1 has the int id 7 and line 2 the str"):
        run(BulkOptions(src, tmp_path / "out", id_field="id"), fp32)
    assert not (tmp_path / "out").exists()
    src.write_text('{"id": 18446744073709551615, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(CoromError, match="line 1 .*does not fit a 64-bit signed integer"):
        run(BulkOptions(src, tmp_path / "out", id_field="id"), fp32)
    assert not (tmp_path / "out").exists()


# -- 5-8. the command line --------------------------------------------------------------------------

def test_an_existing_npy_is_replaced_only_with_force(bundled_artifact, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    target = tmp_path / "e.npy"
    np.save(target, np.arange(3))
    (tmp_path / "e.npy.jsonl").write_text("mine\n")
    args = ["embed", "--model", str(bundled_artifact), "--variant", "fp32", "--file", str(src), "-o", str(target), "-q"]
    assert corom(args) == 2
    assert "--force" in capsys.readouterr().err
    assert np.load(target).tolist() == [0, 1, 2] and (tmp_path / "e.npy.jsonl").read_text() == "mine\n"
    assert corom([*args, "--force"]) == 0
    assert np.load(target).shape == (2, 384)


def test_no_truncate_names_the_long_row_before_writing(bundled_artifact, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"doc": "d1", "text": "short"}) + "\n"
                   + json.dumps({"doc": "d2", "text": " ".join(corpus_texts(12))}) + "\n")
    out = tmp_path / "out"
    args = ["embed", "--model", str(bundled_artifact), "--variant", "fp32", "--file", str(src), "--id-field", "doc",
            "-o", str(out), "-q", "--no-truncate"]
    assert corom(args) == 2
    err = capsys.readouterr().err
    assert "line 2 (id 'd2')" in err and "Drop --no-truncate" in err
    assert not out.exists()  # the retry needs no --force
    assert corom(args[:-1]) == 0


def test_a_missing_text_field_lists_the_keys_once(fp32, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"doc": i, "body": "x"}) + "\n" for i in range(30)))
    with pytest.raises(CoromError) as exc:
        run(BulkOptions(src, tmp_path / "out"), fp32)
    message = str(exc.value)
    assert "30 row(s) have no field 'text'" in message and "their keys: doc, body" in message
    assert message.count("doc, body") == 1 and "more)" not in message


def test_resuming_a_finished_job_says_nothing_to_do(bundled_artifact, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    args = ["embed", "--model", str(bundled_artifact), "--variant", "fp32", "--file", str(src), "-o",
            str(tmp_path / "out"), "--progress"]
    assert corom(args) == 0
    capsys.readouterr()
    assert corom([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "nothing to do: all 2 rows" in err and "texts/s" not in err


def test_blank_lines_and_empty_files_are_one_rule(bundled_artifact, tmp_path, capsys):
    model = ["--model", str(bundled_artifact), "--variant", "fp32"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert corom(["embed", *model, "--file", str(empty)]) == 0 and capsys.readouterr().out == ""
    assert corom(["embed", *model, "--file", str(empty), "-o", str(tmp_path / "e.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 0
    assert np.load(tmp_path / "e.npy").shape == (0, 384) and (tmp_path / "e.npy.jsonl").read_text() == ""
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert corom(["embed", *model, "--file", str(blank), "-o", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["skipped_blank"], summary["files"]) == (0, 2, [])
    assert read_output(tmp_path / "out")[0] == []


def test_embed_with_nothing_on_a_terminal_is_a_usage_error(monkeypatch, capsys):
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    assert corom(["embed"]) == 2
    assert "no text to embed" in capsys.readouterr().err


# -- 9. blank JSONL lines are blank text; a message names a row's real id or none ---------------------

def test_blank_jsonl_lines_are_skipped_as_blank_and_messages_name_real_ids(fp32, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "text": "a"}\n   \n{"id": 2, "text": "b"}\n\n')  # a blank line inside, one at the end
    summary = run(BulkOptions(src, tmp_path / "out", id_field="id"), fp32)
    assert (summary.rows, summary.skipped_blank, summary.skipped_bad) == (2, 2, 0)
    assert read_output(tmp_path / "out")[0] == [1, 2]
    src.write_text('{"id": 1, "text": "a"}\n\n{"id": 2, "text": "b"}\n{oops\n{"id": 4, "text": "d"}\n\n')
    with pytest.raises(CoromError) as exc:
        run(BulkOptions(src, tmp_path / "bad", id_field="id"), fp32)
    message = str(exc.value)
    assert "1 row(s) cannot be embedded" in message and "line 4: not valid JSON" in message  # its id is unknown
    assert "(id 3)" not in message
    skipped = run(BulkOptions(src, tmp_path / "skipped", id_field="id", skip_bad=True), fp32)
    assert (skipped.rows, skipped.skipped_bad, skipped.skipped_blank) == (3, 1, 2)


# -- 10. --resume and --variant: a job never mixes two variants, and never silently --------------------

def test_resume_refuses_another_explicit_variant_and_auto_keeps_the_jobs(fp32, tmp_path, caplog):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    run(BulkOptions(src, out, shard_size=2), fp32)
    (out / "part-00001.parquet").unlink()
    asked: list = []

    def resume(variant: str):
        return embed_corpus(BulkOptions(src, out, shard_size=2, resume=True),
                            lambda recorded: asked.append(recorded) or fp32, progress=False, variant=variant)

    with pytest.raises(CoromError, match=r"variant was 'fp32', now 'opt'.*--variant fp32"):
        resume("opt")
    assert asked == [] and not (out / "part-00001.parquet").exists()  # refused before loading or writing
    with caplog.at_level("INFO", logger="corom_runtime.bulk.local"):
        assert resume("auto").rows == 3
    assert asked == ["fp32"] and "keeps the job's variant fp32" in caplog.text
    assert resume("fp32").reused == 3


def test_resuming_a_finished_job_with_another_variant_is_refused(bundled_artifact, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    args = ["embed", "--model", str(bundled_artifact), "--file", str(src), "-o", str(tmp_path / "out")]
    assert corom([*args, "--variant", "fp32"]) == 0
    capsys.readouterr()
    assert corom([*args, "--variant", "opt", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "variant was 'fp32', now 'opt'" in err and "nothing to do" not in err
