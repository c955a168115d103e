"""Corpus embedding on one machine: streaming `encode_iter`, sharded output, bad rows, `--resume`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from corom_runtime import Embedder
from corom_runtime.catalog import engine_installed
from corom_runtime.bulk.local import BulkOptions, embed_corpus, resume_mismatch, survey
from corom_runtime.cli import main as corom
from corom_runtime.bulk.corpus_io import Row, read_output, read_rows, text_problem
from corom_runtime.errors import CoromError

WORDS = ("river bank loan master degree semester students month pace study campus library research thesis "
         "course credit exam lecture city train weather market price coffee garden music").split()


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic passages of 3 to 60 words: lengths vary, so batches are padded differently."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 60)))) + f" #{i}" for i in range(n)]


def write_jsonl(path: Path, texts: list[str], id_prefix: str = "doc") -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"doc_id": f"{id_prefix}{i}", "body": text}) + "\n")
    return path


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def fp32(bundled_artifact) -> Embedder:
    # fp32 is batch-invariant up to float rounding: a row's vector does not depend on its batch mates
    return Embedder.load(bundled_artifact, variant="fp32", device="cpu")


# -- streaming ---------------------------------------------------------------------------------

def test_encode_iter_streams_windows_that_match_encode(fp32):
    texts = corpus_texts(50)
    windows = list(fp32.encode_iter((t for t in texts), window=16, batch_size=8))
    assert [w.start for w in windows] == [0, 16, 32, 48] and [len(w) for w in windows] == [16, 16, 16, 2]
    indices, vectors = windows[1]  # unpacks as (indices, vectors)
    assert indices.tolist() == list(range(16, 32))
    whole = fp32.encode(texts)
    streamed = np.concatenate([w.vectors for w in windows])
    assert cosines(streamed, whole).min() >= 0.99999
    assert sum(int(w.tokens.sum()) for w in windows) == sum(r.tokens for r in fp32.encode(texts, return_report=True)[1])


def test_encode_iter_rejects_bad_input_clearly(fp32):
    with pytest.raises(ValueError, match="window"):
        fp32.encode_iter(["a"], window=0)  # at the call, not at the first next()
    with pytest.raises(TypeError, match="single string"):
        fp32.encode_iter("not a list")
    with pytest.raises(TypeError, match=r"texts\[5\] is int"):
        list(fp32.encode_iter(iter(["a"] * 5 + [7]), window=4))
    assert list(fp32.encode_iter(iter([]))) == []


# -- pure pieces -------------------------------------------------------------------------------

def test_text_problem_and_survey_name_every_bad_row():
    assert text_problem("ok") is None and text_problem(None) == "text is missing"
    assert text_problem(" \t") == "text is empty" and "int" in text_problem(3)
    rows = [Row(id="a", text="fine", line=1), Row(id="b", text="", line=2), Row(id="c", text=5, line=3),
            Row(id=3, text=None, line=4, problem="not valid JSON"), Row(id="a", text="again", line=5)]
    found = survey(iter(rows))
    # a blank text is skipped and counted, not a bad row
    assert (found.rows, found.bad, found.blank, found.id_type) == (2, 2, 1, "str")
    assert found.bad_examples[0] == "line 3 (id 'c'): text is int, not a string"
    assert found.duplicate_ids == ["line 5 repeats the id of line 1"]


def test_resume_mismatch_names_what_changed():
    base = {"fingerprint": "x", "model": "m", "variant": "fp32", "shard_size": 10, "text_field": "text"}
    assert resume_mismatch(base, dict(base)) is None
    assert "input file changed" in resume_mismatch(base, {**base, "fingerprint": "y"})
    assert "shard_size was 10, now 20" in resume_mismatch(base, {**base, "shard_size": 20})


# -- corpus jobs -------------------------------------------------------------------------------

def test_jsonl_corpus_every_id_once_and_vectors_match_encode(fp32, tmp_path):
    texts = corpus_texts(700, seed=1)
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    summary = embed_corpus(BulkOptions(src, tmp_path / "out", text_field="body", id_field="doc_id", shard_size=256),
                           lambda _: fp32, progress=False)
    assert (summary.rows, summary.shards, summary.skipped_bad) == (700, 3, 0)
    ids, vectors, tokens, truncated = read_output(tmp_path / "out")
    assert sorted(ids) == sorted(f"doc{i}" for i in range(700)) and len(set(ids)) == 700
    order = [int(i[3:]) for i in ids]
    assert cosines(vectors, fp32.encode([texts[i] for i in order])).min() >= 0.99999
    assert summary.tokens == int(tokens.sum()) and not truncated.any()
    saved = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert saved["rows"] == 700 and saved["variant"] == "fp32"


def test_parquet_input_and_npy_shards(fp32, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus_texts(300, seed=2)
    pq.write_table(pa.table({"pid": list(range(1000, 1300)), "passage": texts}), tmp_path / "c.parquet")
    summary = embed_corpus(BulkOptions(tmp_path / "c.parquet", tmp_path / "out", output_format="npy",
                                       text_field="passage", id_field="pid", shard_size=128),
                           lambda _: fp32, progress=False)
    assert summary.rows == 300 and sorted((tmp_path / "out").glob("part-*.npy"))[-1].name == "part-00002.npy"
    ids, vectors, _, _ = read_output(tmp_path / "out")
    assert ids == list(range(1000, 1300))  # integer ids stay integers
    assert cosines(vectors, fp32.encode(texts)).min() >= 0.99999


def test_bad_rows_stop_the_job_before_anything_is_written(fp32, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"doc_id": "a", "body": "fine"}\n{"doc_id": "b", "body": ""}\nnot json\n'
                   '{"doc_id": "d", "body": 42}\n{"doc_id": "e"}\n{"body": "no id"}\n')
    options = BulkOptions(src, tmp_path / "out", text_field="body", id_field="doc_id")
    with pytest.raises(CoromError) as exc:
        embed_corpus(options, lambda _: fp32, progress=False)
    message = str(exc.value)
    for part in ("4 row(s) cannot be embedded", "line 3", "not valid JSON", "line 4 (id 'd'): text is int",
                 "1 row(s) have no field 'body' (line 5); their keys: doc_id", "id field 'doc_id' is missing",
                 "--skip-bad"):
        assert part in message
    assert "line 2" not in message  # the blank text is skipped and counted, not a bad row
    assert not (tmp_path / "out").exists()
    summary = embed_corpus(BulkOptions(src, tmp_path / "out", text_field="body", id_field="doc_id", skip_bad=True),
                           lambda _: fp32, progress=False)
    assert (summary.rows, summary.skipped_bad, summary.skipped_blank) == (1, 4, 1)
    assert read_output(tmp_path / "out")[0] == ["a"]


def test_duplicate_ids_and_reused_output_are_refused(fp32, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"doc_id": 1, "body": "a"}\n{"doc_id": 2, "body": "b"}\n{"doc_id": 1, "body": "c"}\n')
    with pytest.raises(CoromError, match="line 3 repeats the id of line 1"):
        embed_corpus(BulkOptions(src, tmp_path / "dup", text_field="body", id_field="doc_id"), lambda _: fp32, False)
    ok = tmp_path / "ok.txt"
    ok.write_text("one\ntwo\n")
    embed_corpus(BulkOptions(ok, tmp_path / "out"), lambda _: fp32, progress=False)
    with pytest.raises(CoromError, match="--resume to continue"):
        embed_corpus(BulkOptions(ok, tmp_path / "out"), lambda _: fp32, progress=False)
    ok.write_text("one\ntwo\nthree\n")
    with pytest.raises(CoromError, match="input file changed"):
        embed_corpus(BulkOptions(ok, tmp_path / "out", resume=True), lambda _: fp32, progress=False)
    assert embed_corpus(BulkOptions(ok, tmp_path / "out", force=True), lambda _: fp32, progress=False).rows == 3
    with pytest.raises(CoromError, match="give one of the two"):
        BulkOptions(ok, tmp_path / "out", force=True, resume=True)


def _corom_embed(*args: str) -> list[str]:
    return [sys.executable, "-m", "corom_runtime.cli", "embed", *args]


def test_resume_after_a_kill_equals_an_uninterrupted_run(bundled_artifact, tmp_path):
    texts = corpus_texts(1500, seed=3)
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    # the quickest CPU variant where installed: what is tested is the resume, not the engine
    variant = "ov-bf16" if engine_installed("openvino") else "fp32"
    common = ["--model", str(bundled_artifact), "--variant", variant, "--file", str(src), "--text-field", "body",
              "--id-field", "doc_id", "--shard-size", "100", "--quiet"]
    job = subprocess.Popen(_corom_embed(*common, "--output", str(tmp_path / "killed")))
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "part-00002.parquet").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = sorted(p.name for p in (tmp_path / "killed").glob("part-*.parquet"))
    assert 3 <= len(finished) < 15, f"the kill did not land midway: {finished}"
    out = subprocess.run(_corom_embed(*common, "--output", str(tmp_path / "killed"), "--resume", "--json"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["rows"] == 1500 and summary["reused"] == 100 * len(finished)
    assert subprocess.run(_corom_embed(*common, "--output", str(tmp_path / "whole"))).returncode == 0
    ids_a, vec_a, tok_a, _ = read_output(tmp_path / "killed")
    ids_b, vec_b, tok_b, _ = read_output(tmp_path / "whole")
    assert ids_a == ids_b == [f"doc{i}" for i in range(1500)]  # each once, in input order
    assert np.abs(vec_a - vec_b).max() < 1e-5 and (tok_a == tok_b).all()
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_cli_single_npy_and_errors(bundled_artifact, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("one\n\nthree\n")
    model = ["--model", str(bundled_artifact), "--variant", "fp32"]
    # a blank line is skipped and counted, without --skip-bad
    assert corom(["embed", *model, "--file", str(src), "--output", str(tmp_path / "e.npy"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["skipped_blank"], summary["skipped_bad"]) == (1, 0)
    # the summary names the files written, not the .parts folder assembled and removed
    assert summary["output"] == str(tmp_path / "e.npy")
    assert summary["files"] == [str(tmp_path / "e.npy"), str(tmp_path / "e.npy.jsonl")]
    assert np.load(tmp_path / "e.npy").shape == (2, 384)
    assert [json.loads(l)["id"] for l in (tmp_path / "e.npy.jsonl").read_text().splitlines()] == [0, 2]
    assert not (tmp_path / "e.npy.parts").exists()
    assert corom(["embed", *model, "--output", str(tmp_path / "d"), "some text"]) == 2
    assert "give --file" in capsys.readouterr().err
    assert corom(["embed", *model, "--file", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "d")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_read_rows_keeps_line_numbers_for_text_files(tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes(b"a\r\nb\n\xff\n")
    rows = list(read_rows(src, "text"))
    assert [(r.id, r.text, r.line) for r in rows] == [(0, "a", 1), (1, "b", 2), (2, "\ufffd", 3)]


def test_cli_json_lines_read_the_text_field_of_jsonl(bundled_artifact, tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", ["first text", "second text"])
    model = ["--model", str(bundled_artifact), "--variant", "fp32"]
    assert corom(["embed", *model, "--file", str(src), "--text-field", "body"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["text"] for l in lines] == ["first text", "second text"]
    (tmp_path / "bad.jsonl").write_text('{"body": "ok"}\n{"title": "no body"}\n')
    assert corom(["embed", *model, "--file", str(tmp_path / "bad.jsonl"), "--text-field", "body"]) == 2
    assert "line 2 (id 1): text is missing" in capsys.readouterr().err
