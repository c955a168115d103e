"""sentence-transformers is the oracle: the conformance matrix, generated, not hand-picked.

Families (BERT WordPiece, XLM-R Unigram/Metaspace, RoBERTa byte-level BPE: tiny checkpoints saved by
sentence-transformers itself, each with another pooling and head; and the bundled all-MiniLM-L6-v2)
x prompt (none, prompt=, prompt_name=) x length (short, past the window) x truncate_dim x
normalize_embeddings x precision. Our fp32 variant's floats equal `SentenceTransformer.encode` within
1e-5; every precision equals sentence-transformers' `quantize_embeddings` of those floats exactly, given
the artifact's calibration vectors shaped as the request's (the ranges are never the batch's own).

Meanings where the two differ on purpose (DESIGN "Output shaping"): `truncate_dim` re-normalizes the
vectors of a normalized model, which is sentence-transformers' `truncate_dim` + `normalize_embeddings=True`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from checkpoints import bundled_folder, write_st_folder

# its bundled case asks for the session artifact at run time: conftest orders the file after the build
NEEDS_BUNDLED_ARTIFACT = True
from conftest import shared

PROMPTS = {"query": "query: ", "passage": "passage: "}
# one generated folder per family, each with another pooling and head (all modes: test_sources)
FAMILIES = {
    "bert": dict(family="bert", pooling="mean", normalize=True, prompts=PROMPTS),
    "xlm-roberta": dict(family="xlm-roberta", pooling="weightedmean", dense=48, activation="relu", normalize=True,
                        prompts=PROMPTS),
    "roberta": dict(family="roberta", pooling="max", dense=32, prompts=PROMPTS),  # the misread folder
}
SHORT = ["a", "how long does it take to get a master degree", "Über die Brücke — naïve café, 東京 🙂", ""]
PRECISIONS = ("int8", "uint8", "binary", "ubinary")


def _long(window: int) -> str:
    """A text past the window (what follows the window costs time, not coverage)."""
    words = "students usually take eighteen to twenty four months to finish a degree".split()
    return " ".join(itertools.islice(itertools.cycle(words), window + 20))


def _export_tiny(folder: Path, out: Path) -> None:
    """Export (no OpenVINO: its calibration is the slow part), then only the calibration vectors
    int8/uint8 precision needs (what `corom verify` writes; the gates are not this file's subject)."""
    from corom_export.build import ExportOptions, export_artifact
    from corom_export.reference import build_reference
    from corom_export.sources import resolve
    from corom_export.verify import write_quantization_set
    from corom_runtime.artifacts.artifact import load_artifact
    from corom_runtime.tokenization import TextTokenizer

    export_artifact(str(folder), out, ExportOptions(openvino=False))
    artifact = load_artifact(out)
    encoder = build_reference(resolve(str(folder)), artifact.pooling, artifact.normalize)
    tokenizer = TextTokenizer.from_file(artifact.tokenizer_path, artifact.max_length)
    manifest = artifact.manifest
    manifest.quantization = write_quantization_set(out, encoder, tokenizer, artifact.dim, artifact.pad_id, n=128)
    manifest.write(out)


def conformance_model(request, tmp_path_factory, family: str) -> tuple[Path, Path]:
    """(sentence-transformers folder, our artifact) of `family`, each built once per test run; the
    bundled model's artifact is the session's (asked for only where needed: it costs minutes)."""
    if family == "bundled":
        return bundled_folder(), request.getfixturevalue("bundled_artifact")
    settings = FAMILIES[family]
    folder = shared(tmp_path_factory, f"st-{family}", lambda out: write_st_folder(out, **settings), "model")
    return folder, shared(tmp_path_factory, f"st-{family}-artifact", lambda out: _export_tiny(folder, out), "artifact")


def _l2(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("family", ["bundled", *FAMILIES])
def test_fp32_variant_equals_sentence_transformers(request, tmp_path_factory, family):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.quantization import quantize_embeddings

    from corom_runtime import Embedder

    folder, artifact = conformance_model(request, tmp_path_factory, family)
    st = SentenceTransformer(str(folder), device="cpu")
    ours = Embedder.load(artifact, variant="fp32", device="cpu", warmup=False, verify_here=False)
    assert ours.artifact.max_length == st.max_seq_length, "the window is the source's own"
    assert ours.dim == st.get_embedding_dimension()
    texts = [*SHORT, _long(st.max_seq_length)]
    assert ours.encode(texts, return_report=True)[1][-1].truncated  # past the window, really
    calibration = ours.artifact.quantization_vectors()
    prompt_options = [{}, {"prompt": "passage: "}]
    if family != "bundled":  # the bundled model names no prompts
        assert ours.prompts == st.prompts and ours.prompts["query"] == PROMPTS["query"]
        prompt_options.append({"prompt_name": "query"})
    checked = 0
    # normalize_embeddings=True on a model that normalizes already changes nothing: asked only of the others
    normalizations = (None,) if ours.artifact.normalize else (None, True)
    for prompt, truncate_dim, normalize in itertools.product(prompt_options, (None, ours.dim // 4), normalizations):
        # ours: truncate_dim re-normalizes a normalized model's vectors: sentence-transformers' normalize_embeddings
        st_normalize = bool(normalize) or (truncate_dim is not None and ours.artifact.normalize)
        theirs = st.encode(texts, truncate_dim=truncate_dim, normalize_embeddings=st_normalize, **prompt)
        options = dict(truncate_dim=truncate_dim, normalize_embeddings=normalize, **prompt)
        floats = ours.encode(texts, **options)
        where = f"{family} {prompt} truncate_dim={truncate_dim} normalize_embeddings={normalize}"
        np.testing.assert_allclose(floats, theirs, atol=1e-5, rtol=0, err_msg=where)
        # the calibration vectors, shaped as this request's vectors are
        shaped = _l2(calibration) if normalize and not ours.artifact.normalize else calibration
        shaped = shaped[:, :truncate_dim] if truncate_dim else shaped
        shaped = _l2(shaped) if st_normalize and truncate_dim else shaped
        for precision in PRECISIONS:
            got = ours.encode(texts, precision=precision, **options)
            want = quantize_embeddings(floats, precision=precision, calibration_embeddings=shaped)
            assert got.dtype == want.dtype and np.array_equal(got, want), f"{where} precision={precision}"
            checked += 1
        # and the bits of sentence-transformers' own floats (a sign flip would need a |value| < 1e-5)
        assert np.array_equal(ours.encode(texts, precision="ubinary", **options),
                              quantize_embeddings(theirs, precision="ubinary")), where
    assert checked == len(prompt_options) * 2 * len(normalizations) * len(PRECISIONS)
