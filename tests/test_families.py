"""Model families beyond BERT: XLM-RoBERTa (Unigram tokenizer) and RoBERTa (byte-level BPE), pad id 1.

Checkpoints are generated here with each family's real config shape (small width), in the layout users
have; each is exported, verified, and compared with an independent `transformers` reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from checkpoints import write_roberta_checkpoint, write_xlmr_checkpoint
from conftest import SUITE_VARIANTS
from corom_export.build import ExportOptions, export_artifact
from corom_export.families import FAMILIES, family_for
from corom_export.int8 import ffn_matmuls_by_weight
from corom_export.verify import verify_artifact
from corom_runtime import Embedder
from corom_runtime.catalog import VARIANTS
from corom_runtime.errors import CoromError

TEXTS = ["a", "how long does it take to get a master degree",
         "students usually take eighteen to twenty four months to finish, some take several years " * 2,
         "Über die Brücke — naïve café, 東京 and emoji 🙂"]

WRITERS = {"xlm-roberta": write_xlmr_checkpoint, "roberta": write_roberta_checkpoint}


@pytest.fixture(scope="module", params=sorted(WRITERS))
def family_artifact(request, tmp_path_factory):
    family = request.param
    folder = WRITERS[family](tmp_path_factory.mktemp(family) / "checkpoint")
    out = tmp_path_factory.mktemp(family) / "artifact"
    # a local folder with a preset's settings: multilingual-e5-small's mean pooling, normalisation, prompts
    export_artifact(str(folder), out, ExportOptions(preset="multilingual-e5-small", max_length=64,
                                                    variants=SUITE_VARIANTS))
    # the speed pass only has to exist (no test here reads its figures): 64 texts once, not 512 three times
    report = verify_artifact(out, n_queries=50, n_passages=300, stsb=False, speed_texts=64, speed_rounds=1)
    return family, folder, out, report


def reference(folder, texts):
    """Independent of the exporter: transformers' AutoModel, each text alone (no padding), mean + L2."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(64)
    rows = []
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tok.encode(text).ids])
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            rows.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy())
    return np.stack(rows)


def cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_family_exports_and_fp32_matches_transformers(family_artifact):
    family, folder, out, report = family_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["family"], manifest["pad_id"]) == (family, 1)
    assert manifest["tokenizer"]["kind"] == ("Unigram" if family == "xlm-roberta" else "BPE")
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    fp32 = Embedder.load(out, variant="fp32", device="cpu")
    assert cos(fp32.encode(TEXTS), reference(folder, TEXTS)).min() >= 0.99999
    # every variant was measured and its verdict recorded; the float ones must hold on any family
    results = {r.variant: r for r in report.results if r.skipped is None}
    assert set(results) >= {"fp32", "opt", "fp16", "int8"}
    for name, result in results.items():
        assert manifest["variants"][name]["passed"] is result.passed, name
        assert "min_cosine" in manifest["variants"][name]["parity"], name
    assert results["fp32"].passed and results["opt"].passed
    assert manifest["export"]["fusions"]["Attention"] == 2  # both layers fused: opt is really optimised


def test_padding_with_the_families_pad_id_changes_nothing(family_artifact):
    _, _, out, _ = family_artifact
    fp32 = Embedder.load(out, variant="fp32", device="cpu")
    together = fp32.encode(TEXTS)  # one batch, padded with id 1 to its longest text
    alone = np.stack([fp32.encode([t])[0] for t in TEXTS])
    assert cos(together, alone).min() >= 0.99999


def test_prompts_come_from_the_preset(family_artifact):
    _, _, out, _ = family_artifact
    emb = Embedder.load(out, variant="fp32", device="cpu")
    assert emb.prompts == {"query": "query: ", "passage": "passage: "}
    np.testing.assert_allclose(emb.encode(["x"], prompt_name="query"), emb.encode(["query: x"]), atol=1e-6)
    with pytest.raises(ValueError, match="unknown prompt_name 'question'.*'query', 'passage'"):
        emb.encode(["x"], prompt_name="question")
    with pytest.raises(ValueError, match="not both"):
        emb.encode(["x"], prompt_name="query", prompt="query: ")


def test_ffn_matmuls_are_found_by_weight_shape_in_every_family(family_artifact):
    import onnx

    _, _, out, _ = family_artifact
    ffn_in, ffn_out = ffn_matmuls_by_weight(onnx.load(str(out / VARIANTS["fp32"].file)), 64, 128)
    assert len(ffn_in) == len(ffn_out) == 2


def test_unsupported_model_type_names_the_families():
    with pytest.raises(CoromError) as exc:
        family_for({"model_type": "gpt2"})
    for name in FAMILIES:
        assert name in str(exc.value)


def test_server_routes_take_prompt_name(family_artifact):
    from starlette.testclient import TestClient

    from corom_runtime.serving.app import ServerSettings, create_app

    _, _, out, _ = family_artifact
    emb = Embedder.load(out, variant="fp32", device="cpu")
    with TestClient(create_app(emb, ServerSettings(allowed_hosts=("testserver",)))) as client:
        tei = client.post("/embed", json={"inputs": ["x"], "prompt_name": "passage"})
        openai = client.post("/v1/embeddings", json={"input": ["x"], "prompt_name": "query"})
        wrong = client.post("/embed", json={"inputs": ["x"], "prompt_name": "title"})
    assert tei.status_code == 200 and openai.status_code == 200
    np.testing.assert_allclose(tei.json()[0], emb.encode(["passage: x"])[0], atol=1e-5)
    np.testing.assert_allclose(openai.json()["data"][0]["embedding"], emb.encode(["query: x"])[0], atol=1e-5)
    assert wrong.status_code == 400 and "known: 'query', 'passage'" in wrong.json()["error"]["message"]


def test_corpus_job_applies_the_prompt_and_refuses_an_unknown_one(family_artifact, tmp_path):
    from corom_runtime.bulk.local import BulkOptions, embed_corpus
    from corom_runtime.bulk.corpus_io import read_output

    _, _, out, _ = family_artifact
    emb = Embedder.load(out, variant="fp32", device="cpu")
    src = tmp_path / "c.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    embed_corpus(BulkOptions(src, tmp_path / "v", prompt_name="passage"), lambda _: emb, progress=False)
    _, vectors, _, _ = read_output(tmp_path / "v")
    assert cos(vectors, emb.encode(["passage: " + t for t in TEXTS])).min() >= 0.99999
    with pytest.raises(ValueError, match="unknown prompt_name 'doc'"):
        embed_corpus(BulkOptions(src, tmp_path / "w", prompt_name="doc"), lambda _: emb, progress=False)
    assert not (tmp_path / "w").exists()
