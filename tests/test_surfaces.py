"""Every surface gives the same vectors for the same request: `encode`, `encode_iter`, `corom embed`, a
local corpus job, and the server's /embed and /v1/embeddings (through the OpenAI SDK), each run inline
and through the batcher's worker. One parametrized test over request shapes x surfaces.

The model is the conformance suite's tiny sentence-transformers BERT (prompts, normalized, a 48-token
window: every shape is exercised in milliseconds); `encode` is the answer the others must give.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from test_conformance import conformance_model
from test_server import Running

TEXTS = ["how long does it take to get a master degree", "a", "naïve café 🙂",
         " ".join(f"word{i} and more" for i in range(40))]  # past the 48-token window
REQUESTS = {
    "prompt_name": {"prompt_name": "query"},
    "truncate_dim+int8": {"truncate_dim": 16, "precision": "int8"},
    "truncate_dim+ubinary": {"truncate_dim": 24, "precision": "ubinary"},
    "left+prompt": {"truncation_direction": "left", "prompt_name": "passage"},
    "chunking_mean": {"chunking": "mean"},
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return conformance_model(None, tmp_path_factory, "bert")[1]


@pytest.fixture(scope="module")
def embedder(artifact):
    from corom_runtime import Embedder

    return Embedder.load(artifact, variant="fp32", device="cpu", verify_here=False)


@pytest.fixture(scope="module")
def servers(embedder):
    """Two servers on one model: one that runs every lone request inline, one that never does."""
    from corom_runtime.serving.app import ServerSettings, create_app
    from corom_runtime.serving.batcher import MAX_WAIT_MS, BatcherSettings

    inline = BatcherSettings(inline_max_tokens=1_000_000, inline_max_ms=MAX_WAIT_MS)
    running = {name: Running(create_app(embedder, ServerSettings(batcher=batcher)))
               for name, batcher in (("inline", inline), ("worker", BatcherSettings(inline_max_tokens=0)))}
    yield running
    for server in running.values():
        server.stop()


def _encode_iter(ctx, request):
    return np.concatenate([w.vectors for w in ctx.embedder.encode_iter(TEXTS, **request)])


def _cli(ctx, request):
    from corom_runtime.cli import main as corom

    flags = ["--model", str(ctx.artifact), "--variant", "fp32", "--device", "cpu"]
    for key, value in request.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    out = ctx.tmp_path / "cli.jsonl"
    assert corom(["embed", *flags, "--output", str(out), *TEXTS]) == 0
    return np.array([json.loads(line)["embedding"] for line in out.read_text().splitlines()])


def _corpus(ctx, request):
    from corom_runtime.bulk.corpus_io import read_output
    from corom_runtime.bulk.local import BulkOptions, embed_corpus

    src = ctx.tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    embed_corpus(BulkOptions(src, ctx.tmp_path / "out", id_field="id", **request), lambda _: ctx.embedder,
                 progress=False)
    ids, vectors, _, _ = read_output(ctx.tmp_path / "out")
    return np.asarray(vectors)[np.argsort([int(i[1:]) for i in ids])]


def _body(request: dict) -> dict:
    body = {k: v for k, v in request.items() if k != "truncate_dim"}
    if "truncate_dim" in request:
        body["dimensions"] = request["truncate_dim"]
    return body


def _embed_route(mode):
    def surface(ctx, request):
        response = httpx.post(ctx.servers[mode].url("/embed"), json={"inputs": TEXTS, **_body(request)}, timeout=60)
        assert response.status_code == 200, response.text
        return np.array(response.json())
    return surface


def _openai(mode):
    def surface(ctx, request):
        from openai import OpenAI

        client = OpenAI(base_url=ctx.servers[mode].url("/v1"), api_key="unused")
        body = _body(request)
        dimensions = body.pop("dimensions", None)
        kwargs = {"dimensions": dimensions} if dimensions else {}
        response = client.embeddings.create(model=ctx.embedder.info.model, input=TEXTS, extra_body=body, **kwargs)
        return np.array([d.embedding for d in response.data])
    return surface


SURFACES = {"encode_iter": _encode_iter, "cli": _cli, "corpus_local": _corpus,
            "embed_inline": _embed_route("inline"), "embed_worker": _embed_route("worker"),
            "openai_inline": _openai("inline"), "openai_worker": _openai("worker")}


class Context:
    def __init__(self, artifact, embedder, servers, tmp_path):
        self.artifact, self.embedder, self.servers, self.tmp_path = artifact, embedder, servers, tmp_path


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("shape", REQUESTS)
def test_every_surface_gives_the_vectors_of_encode(artifact, embedder, servers, tmp_path, shape, surface):
    request = REQUESTS[shape]
    expected = embedder.encode(TEXTS, **request)
    got = SURFACES[surface](Context(artifact, embedder, servers, tmp_path), request)
    assert got.shape == expected.shape, (shape, surface)
    if request.get("precision", "float32") == "float32":
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)  # the CLI prints 7 decimals
    else:  # levels and bits: the same numbers, whatever type carried them
        assert np.array_equal(got.astype(np.int64), expected.astype(np.int64)), (shape, surface)
