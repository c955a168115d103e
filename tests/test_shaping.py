"""Vectors shaped for the index (output-shaping issue): truncate_dim / dimensions, int8 and binary
precision, the truncation policy and input_type, in Python, the CLI, the server and corpus jobs."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time

import httpx
import warnings

import numpy as np
import pytest

from corom_export.stsb import find_stsb, stsb_missing, load_pairs, stsb_spearman
from corom_runtime import Embedder
from corom_runtime.embedder import Truncation
from corom_runtime.bulk.corpus_io import read_output
from corom_runtime.catalog import PRECISIONS
from corom_runtime.cli import main as corom
from corom_runtime.errors import InvalidInputError, InvalidInputTypeError, TextTooLongError
from corom_runtime.serving.app import ServerSettings, create_app
from corom_runtime.shaping import calibration_ranges, check_shape_options, quantize, shape_vectors
from test_server import Running

LONG = " ".join(f"word{i} and more" for i in range(200))  # 931 tokens: past any window (512 positions)


@pytest.fixture(scope="module")
def opt(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, variant="opt", device="cpu", verify_here=False)


@pytest.fixture(scope="module")
def calibration(opt) -> np.ndarray:
    vectors = opt.artifact.quantization_vectors()
    assert vectors is not None and vectors.shape[1] == 384 and len(vectors) >= 256
    return vectors


# -- the functions ------------------------------------------------------------------------------

def test_binary_precisions_are_bit_exact_with_sentence_transformers():
    from sentence_transformers.quantization import quantize_embeddings

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 384)).astype(np.float32)
    vectors[:, :7] = 0.0  # zero is not positive: bit 0, as in sentence-transformers
    for precision in ("binary", "ubinary"):
        ours, theirs = quantize(vectors, precision), quantize_embeddings(vectors, precision=precision)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), precision
        assert ours.shape == (50, 48)


def test_int8_levels_equal_sentence_transformers_within_the_calibrated_range(calibration):
    from sentence_transformers.quantization import quantize_embeddings

    ranges = calibration_ranges(calibration, None, False)
    for precision in ("int8", "uint8"):
        ours = quantize(calibration, precision, ranges)
        theirs = quantize_embeddings(calibration, precision=precision, calibration_embeddings=calibration)
        # exactly: one level off (a cast truncating negatives toward zero) was tolerated here once
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), precision
    # outside the calibrated range a value saturates
    far = np.full((1, 384), 10.0, np.float32)
    assert (quantize(far, "int8", ranges) == 127).all() and (quantize(-far, "uint8", ranges) == 0).all()


def test_truncation_renormalizes_only_what_was_normalized():
    v = np.array([[3.0, 4.0, 12.0]], np.float32)
    assert np.allclose(shape_vectors(v, 2, renormalize=True), [[0.6, 0.8]])
    assert np.allclose(shape_vectors(v, 2, renormalize=False), [[3.0, 4.0]])


@pytest.mark.parametrize("dim, precision, error", [
    (0, "float32", InvalidInputError), (385, "float32", InvalidInputError), (1.5, "float32", InvalidInputTypeError),
    (True, "float32", InvalidInputTypeError), ("8", "float32", InvalidInputTypeError),
    (None, "float16", InvalidInputError), (None, None, InvalidInputError), (None, "INT8", InvalidInputError),
])
def test_bad_shape_options_are_named(dim, precision, error):
    with pytest.raises(error, match="truncate_dim|precision"):
        check_shape_options(384, dim, precision)


# -- Python ------------------------------------------------------------------------------------

def test_encode_shapes_in_order_and_never_by_the_batch(opt):
    texts = ["how long is a master degree", "a cat sat on the mat", "quantum physics explained", "x"]
    full = opt.encode(texts)
    cut = opt.encode(texts, truncate_dim=128)
    np.testing.assert_allclose(cut, full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True), atol=1e-5)
    for precision, (dtype, width) in {"int8": (np.int8, 128), "uint8": (np.uint8, 128), "binary": (np.int8, 16),
                                      "ubinary": (np.uint8, 16)}.items():
        together = opt.encode(texts, truncate_dim=128, precision=precision)
        assert together.dtype == dtype and together.shape == (4, width)
        alone = np.stack([opt.encode([t], truncate_dim=128, precision=precision)[0] for t in texts])
        assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1  # batch mates do not move a level
    assert opt.encode("one text", precision="ubinary").shape == (48,)
    assert opt.encode([], truncate_dim=8, precision="binary").shape == (0, 1)
    windows = list(opt.encode_iter(texts, window=3, precision="ubinary"))
    assert np.array_equal(np.concatenate([w.vectors for w in windows]), opt.encode(texts, precision="ubinary"))


if stsb_missing():  # loud: a skipped quality test must not pass unnoticed
    warnings.warn(stsb_missing(), stacklevel=1)


@pytest.mark.skipif(stsb_missing() is not None, reason=str(stsb_missing()))
def test_quantized_and_shorter_vectors_keep_stsb_quality(opt):
    pairs = load_pairs(find_stsb()).head(600)  # README has the 1,500-pair figures; 600 hold the margins here
    base = stsb_spearman(lambda t: opt.encode(t), pairs)

    def as_float(precision, dim=None):
        return lambda t: opt.encode(t, precision=precision, truncate_dim=dim).astype(np.float32)
    assert stsb_spearman(as_float("int8"), pairs) >= 0.99 * base
    assert stsb_spearman(as_float("float32", 128), pairs) >= 0.97 * base
    assert stsb_spearman(as_float("ubinary"), pairs) > 0.5  # packed bytes are not comparable as numbers: a smoke


def test_truncation_policy(opt):
    right = opt.tokenize([LONG])[0]
    left = opt.tokenize([LONG], cut=Truncation(direction="left"))[0]
    assert right.truncated and left.truncated and len(left.ids) == len(right.ids) == opt.max_seq_length
    words = opt.tokenizer._tokenizer.decode
    assert "word0 " in words(right.ids) and "word199" in words(left.ids)
    assert "word0 " not in words(left.ids) and "word199" not in words(right.ids)
    prompted = opt.tokenize([LONG], "query: ", Truncation(direction="left"))[0]
    assert words(prompted.ids).startswith("query :") and "word199" in words(prompted.ids)  # the prompt is never cut
    a, b = opt.encode([LONG], truncation_direction="left"), opt.encode([LONG])
    assert float(a[0] @ b[0]) < 0.99  # another part of the text
    with pytest.raises(TextTooLongError, match=r"texts\[1\] has \d+ tokens"):
        opt.encode(["short", LONG], truncate=False)
    with pytest.raises(InvalidInputError, match="truncation_direction"):
        opt.encode(["x"], truncation_direction="middle")
    assert opt.encode(["short"], truncate=False).shape == (1, 384)


# -- the server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompted(bundled_artifact, tmp_path_factory) -> Embedder:
    """The bundled model with e5-style prompts in its manifest (the preset's data), for input_type."""
    art = tmp_path_factory.mktemp("prompted") / "art"
    shutil.copytree(bundled_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["prompts"] = {"query": "query: ", "passage": "passage: "}
    (art / "manifest.json").write_text(json.dumps(manifest))
    return Embedder.load(art, variant="opt", device="cpu", verify_here=False)


@pytest.fixture(scope="module")
def servers(opt, prompted):
    running = [Running(create_app(e, ServerSettings())) for e in (opt, prompted)]
    yield running
    for r in running:
        r.stop()


def test_server_fields_mean_what_encode_means(servers, opt, prompted):
    plain, with_prompts = servers
    texts = ["how long is a master degree", "a cat"]
    r = httpx.post(plain.url("/embed"), json={"inputs": texts, "dimensions": 64, "precision": "int8"})
    assert r.status_code == 200 and np.array_equal(np.asarray(r.json()), opt.encode(texts, truncate_dim=64, precision="int8"))
    r = httpx.post(plain.url("/v1/embeddings"), json={"input": texts, "precision": "ubinary", "encoding_format": "base64"})
    body = r.json()
    # base64 is float32 for every OpenAI client: the uint8 values travel as exact float32 numbers
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]])
    assert body["data"][0]["dtype"] == "uint8" and np.array_equal(got, opt.encode(texts, precision="ubinary"))
    r = httpx.post(plain.url("/v1/embeddings"), json={"input": texts, "precision": "int8", "encoding_format": "float"})
    assert all(isinstance(x, int) for x in r.json()["data"][0]["embedding"])
    # TEI's fields
    r = httpx.post(plain.url("/embed"), json={"inputs": [LONG], "truncation_direction": "left"})
    assert np.allclose(r.json()[0], opt.encode([LONG], truncation_direction="left")[0], atol=1e-5)
    # input_type = the preset's prompt
    r = httpx.post(with_prompts.url("/embed"), json={"inputs": texts, "input_type": "search_query"})
    assert np.allclose(r.json(), prompted.encode(texts, prompt_name="query"), atol=1e-5)
    r = httpx.post(with_prompts.url("/embed"), json={"inputs": texts, "input_type": "search_document"})
    assert np.allclose(r.json(), prompted.encode(texts, prompt_name="passage"), atol=1e-5)


@pytest.mark.parametrize("path, body, status, message", [
    ("/embed", {"inputs": ["x"], "dimensions": 0}, 400, "'dimensions' must be from 1 to 384"),
    ("/embed", {"inputs": ["x"], "dimensions": "64"}, 400, "'dimensions' must be an integer"),
    ("/embed", {"inputs": ["x"], "precision": "int4"}, 400, "'precision' must be one of"),
    ("/v1/embeddings", {"input": ["x"], "dimension": 64}, 400, "Unrecognized request argument supplied: dimension"),
    ("/embed", {"inputs": ["x"], "truncation_direction": "up"}, 400, "'truncation_direction' must be one of"),
    ("/embed", {"inputs": ["x"], "truncate": "no"}, 400, "'truncate' must be true or false"),
    ("/embed", {"inputs": ["ok", LONG], "truncate": False}, 413, "inputs\\[1\\]|texts\\[1\\] has"),
    ("/embed", {"inputs": ["x"], "normalize": False}, 400, "normalized inside its exported graph"),
    ("/embed", {"inputs": ["x"], "input_type": "poetry"}, 400, "'input_type' must be one of"),
    ("/embed", {"inputs": ["x"], "input_type": "search_query", "prompt_name": "query"}, 400, "not both"),
])
def test_bad_shaping_fields_are_clear_4xx(servers, path, body, status, message):
    r = httpx.post(servers[0].url(path), json=body)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]["message"]), r.text


def test_openai_client_with_dimensions(servers, opt):
    from openai import OpenAI

    client = OpenAI(base_url=servers[0].url("/v1"), api_key="unused", max_retries=0)
    resp = client.embeddings.create(model="all-minilm-l6-v2", input=["how long is a master degree"], dimensions=128)
    got = np.asarray(resp.data[0].embedding)  # the SDK asked for base64 and decoded float32 itself
    assert got.shape == (128,) and np.allclose(got, opt.encode(["how long is a master degree"], truncate_dim=128)[0],
                                               atol=1e-5)


# -- the CLI and corpus jobs -------------------------------------------------------------------

def test_cli_and_corpus_jobs_shape_vectors(bundled_artifact, tmp_path, capsys, opt):
    model = ["--model", str(bundled_artifact), "--variant", "opt"]
    assert corom(["embed", *model, "--truncate-dim", "128", "--precision", "ubinary", "a cat", "a dog"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["embedding"]) for r in rows] == [16, 16]
    assert np.array_equal(np.asarray([r["embedding"] for r in rows], np.uint8),
                          opt.encode(["a cat", "a dog"], truncate_dim=128, precision="ubinary"))
    src = tmp_path / "in.txt"
    texts = [f"passage {i} about topic {i % 7}" for i in range(40)]
    src.write_text("\n".join(texts) + "\n")
    for precision in ("binary", "int8"):
        out = tmp_path / precision
        job = ["embed", *model, "--file", str(src), "--output", str(out), "--shard-size", "16", "--quiet",
               "--precision", precision, "--truncate-dim", "64"]
        assert corom(job) == 0
        _, vectors, _, _ = read_output(out)
        assert np.array_equal(vectors, opt.encode(texts, truncate_dim=64, precision=precision))
        resumed = [a for a in job if a not in ("--precision", precision)] + ["--resume"]
        assert corom(resumed) == 2  # another precision is another job: refused, not mixed
        assert "precision" in capsys.readouterr().err
    assert corom(["embed", *model, "--file", str(src), "--output", str(tmp_path / "v.npy"), "--quiet",
                  "--precision", "uint8"]) == 0
    assert np.load(tmp_path / "v.npy").dtype == np.uint8
    assert corom(["embed", *model, "--truncate-dim", "999", "x"]) == 2
    assert "from 1 to 384" in capsys.readouterr().err
    assert corom(["embed", *model, "--no-truncate", LONG]) == 2
    assert "truncate" in capsys.readouterr().err


def test_every_precision_has_a_dtype():
    from corom_runtime.shaping import DTYPES

    assert set(DTYPES) == set(PRECISIONS)


# -- chunking ----------------------------------------------------------------------------------

def test_chunking_embeds_a_long_text_whole(opt):
    long = " ".join(f"sentence {i} is about topic {i % 9}." for i in range(80))
    short = "a short text"
    chunked, report = opt.encode([short, long], chunking={"overlap": 16}, return_report=True)
    plain = opt.encode([short, long])
    np.testing.assert_allclose(chunked[0], plain[0], atol=1e-6)  # a text that fits is unchanged
    assert not report[1].truncated and report[1].tokens > 2 * 128
    (windows,) = opt.encode_chunks([long], overlap=16)
    assert len(windows.spans) >= 3 and windows.spans[0][0] == 0 and windows.spans[-1][1] == len(long)
    assert all(b[0] < a[1] for a, b in zip(windows.spans, windows.spans[1:]))  # neighbours overlap
    mean = windows.vectors.mean(0)
    np.testing.assert_allclose(chunked[1], mean / np.linalg.norm(mean), atol=1e-5)  # the windows, averaged
    assert float(chunked[1] @ plain[1]) < 0.999  # more than the first window
    cut = opt.encode_chunks([long], overlap=16, max_windows=2)[0]
    assert cut.truncated and len(cut.spans) == 2
    assert opt.encode([short, long], chunking="mean", precision="ubinary").shape == (2, 48)


@pytest.mark.parametrize("chunking, message", [
    ("max", "chunking must be"), ({"overlap": -1}, "overlap must be"), ({"overlap": 500}, "overlap must be from 0"),
    ({"pool": "none"}, "encode_chunks"), ({"max_windows": 0}, "max_windows"), ({"stride": 3}, "chunking must be"),
])
def test_bad_chunking_is_named(opt, chunking, message):
    with pytest.raises(InvalidInputError, match=message):
        opt.encode(["a text " * 100], chunking=chunking)


def test_chunking_through_the_batcher_the_server_and_a_corpus_job(servers, opt, bundled_artifact, tmp_path):
    from corom_runtime import DynamicBatcher
    from corom_runtime.embedder import Chunking
    from corom_runtime.errors import RequestTooLargeError
    from corom_runtime.serving.batcher import BatcherSettings

    # ~9 tokens a sentence: about 6 windows of the artifact's length, whatever that length is
    long = " ".join(f"sentence {i} is about topic {i % 9}." for i in range(opt.max_seq_length * 5 // 8))
    texts = ["a short text", long]
    windows = len(opt.chunk_plan([long], "", Chunking()).items)
    assert windows >= 3
    expected = opt.encode(texts, chunking="mean")
    # a queue of 2 * windows - 1: the short text and the long one fit, the long one twice does not
    with DynamicBatcher(opt, BatcherSettings(max_queue=2 * windows - 1)) as batcher:
        np.testing.assert_allclose(batcher.submit(texts, chunking=Chunking()).result(30), expected, atol=1e-5)
        with pytest.raises(RequestTooLargeError, match="windows"):  # the queue counts windows, not texts
            batcher.submit([long, long], chunking=Chunking())
    r = httpx.post(servers[0].url("/embed"), json={"inputs": texts, "chunking": "mean"})
    np.testing.assert_allclose(np.asarray(r.json()), expected, atol=1e-5)
    r = httpx.post(servers[0].url("/embed"), json={"inputs": texts, "chunking": {"pool": "none", "overlap": 16}})
    body = r.json()
    windows = opt.encode_chunks(texts, overlap=16)
    assert [len(t["embeddings"]) for t in body] == [1, len(windows[1].spans)]
    assert [tuple(s) for s in body[1]["spans"]] == windows[1].spans
    np.testing.assert_allclose(np.asarray(body[1]["embeddings"]), windows[1].vectors, atol=1e-5)
    r = httpx.post(servers[0].url("/v1/embeddings"), json={"input": texts, "chunking": {"pool": "none"}})
    assert r.status_code == 400 and "pool must be 'mean'" in r.json()["error"]["message"]
    r = httpx.post(servers[0].url("/embed"), json={"inputs": texts, "chunking": {"overlap": "x"}})
    assert r.status_code == 400 and "'chunking'" in r.json()["error"]["message"]
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(texts) + "\n")
    assert corom(["embed", "--model", str(bundled_artifact), "--variant", "opt", "--file", str(src), "--output",
                  str(tmp_path / "out"), "--quiet", "--chunking", "mean"]) == 0
    np.testing.assert_allclose(read_output(tmp_path / "out")[1], expected, atol=1e-5)


def test_chunked_pooling_is_the_mean_of_the_windows_on_a_model_that_does_not_normalize(corom_artifact):
    """CLS pooling, no normalisation: the pooled vector is the plain mean of the windows' vectors (a sum
    or a re-normalized mean would pass on a normalized model)."""
    emb = Embedder.load(corom_artifact, variant="opt", device="cpu", verify_here=False, warmup=False)
    assert not emb.artifact.normalize and emb.artifact.pooling == "cls"
    long = " ".join(f"sentence {i} is about topic {i % 9}." for i in range(60))
    (chunks,) = emb.encode_chunks([long], overlap=8)
    assert len(chunks.spans) >= 3
    pooled = emb.encode(["a short text", long], chunking={"overlap": 8})
    np.testing.assert_allclose(pooled[1], chunks.vectors.mean(0), rtol=1e-4, atol=1e-4)
    assert abs(float(np.linalg.norm(pooled[1])) - 1.0) > 0.01  # not re-normalized
    np.testing.assert_allclose(pooled[0], emb.encode(["a short text"])[0], atol=1e-5)


def test_a_text_needing_exactly_max_windows_windows_is_not_cut(opt):
    from corom_runtime.embedder import Chunking

    size, overlap, max_windows = opt.tokenizer.max_length - 2, 16, 3  # [CLS] and [SEP] in every window
    exact = (max_windows - 1) * (size - overlap) + size
    for n, cut in ((exact, False), (exact + 1, True)):
        plan = opt.chunk_plan([" ".join(["cat"] * n)], "", Chunking(overlap=overlap, max_windows=max_windows))
        assert len(plan.items) == max_windows and plan.reports[0].truncated is cut, n
        assert plan.over == [0] and len(plan.spans[0]) == max_windows


def test_chunking_without_truncation_refuses_a_text_past_max_windows(opt, servers):
    """It cut silently past max_windows; without chunking truncate=False refuses: so does chunking."""
    long = LONG * 3
    with pytest.raises(TextTooLongError, match=r"texts\[1\] has \d+ tokens and would need \d+ windows"):
        opt.encode(["short", long], chunking={"max_windows": 2}, truncate=False)
    fits, report = opt.encode(["short", LONG], chunking={"max_windows": 16}, truncate=False, return_report=True)
    assert fits.shape == (2, 384) and not report[1].truncated
    r = httpx.post(servers[0].url("/embed"), json={"inputs": ["short", long], "chunking": {"max_windows": 2},
                                                   "truncate": False})
    assert r.status_code == 413 and "would need" in r.json()["error"]["message"]


def test_the_window_bomb_is_refused_before_any_window_is_built(opt, servers):
    """{'inputs': 'a ' * 520000, 'chunking': {'overlap': 125, 'max_windows': 10**9}} answered 413 after
    8.5 s with RSS 437 -> 1,643 MB: max_windows is bounded, and the queue's window budget is checked from
    token counts before any window is built."""
    import tracemalloc

    from corom_runtime import DynamicBatcher
    from corom_runtime.embedder import Chunking
    from corom_runtime.errors import RequestTooLargeError
    from corom_runtime.serving.batcher import BatcherSettings
    from corom_runtime.tokenization import MAX_WINDOWS

    bomb = "a " * 520_000
    begin = time.perf_counter()
    r = httpx.post(servers[0].url("/embed"), json={"inputs": [bomb], "chunking": {"overlap": 125,
                                                                               "max_windows": 1_000_000_000}},
                   timeout=60)
    assert r.status_code == 400 and f"at most {MAX_WINDOWS}" in r.json()["error"]["message"]
    assert time.perf_counter() - begin < 5.0
    with DynamicBatcher(opt, BatcherSettings(max_queue=64)) as batcher:
        tracemalloc.start()
        try:
            with pytest.raises(RequestTooLargeError, match="windows"):
                batcher.submit([bomb], chunking=Chunking(overlap=125, max_windows=MAX_WINDOWS))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB of Python memory to refuse it"
