"""The PyTorch reference encoder: the family's base model (no pooler) + the preset's pooling + optional L2 norm.

For the CoROM preset (CLS pooling, no normalisation) this computes exactly what ModelScope's
`BertForSentenceEmbedding` returns: the last hidden state of token 0, unnormalised.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .sources import Checkpoint, SourceError

log = logging.getLogger(__name__)


class SentenceEncoder(nn.Module):
    """Encoder + pooling (+ L2 normalisation): `(input_ids, attention_mask) -> [batch, dim]`.

    `self.bert` is the family's base model (BertModel, XLMRobertaModel, ...), named for history."""

    def __init__(self, bert: nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.bert = bert
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            # clamp: an all-padding row (never produced by the tokenizer) must not divide by zero
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


def load_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Read the weights without unpickling arbitrary objects."""
    path = checkpoint.weights
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(
            f"cannot read weights {path} ({type(exc).__name__}: {exc}). A .bin must be a plain "
            "state dict (loaded with weights_only=True); re-save it or convert it to safetensors."
        ) from exc


def load_encoder(checkpoint: Checkpoint) -> nn.Module:
    """Build the family's base encoder (no pooler) from the checkpoint; sizes come from its config.

    Weights are matched by name after the family's prefixes are stripped; a missing tensor or one whose
    shape disagrees with the config is named in the error."""
    import transformers

    family = checkpoint.family
    config_class = getattr(transformers, family.config_class)
    config = config_class(**{k: v for k, v in checkpoint.config.items() if k != "architectures"})
    # eager attention: its graph is the one ONNX Runtime's transformer fusions recognise
    config._attn_implementation = "eager"
    model = getattr(transformers, family.model_class)(config, **family.model_kwargs)
    expected = model.state_dict()
    state = {}
    for key, value in load_state_dict(checkpoint).items():
        name = next((key[len(p):] for p in family.weight_prefixes if key.startswith(p)), key)
        if name in expected:
            state[name] = value
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("position_ids"))
    if missing:
        raise SourceError(
            f"{checkpoint.weights} lacks {len(missing)} {family.name} weights that "
            f"{checkpoint.folder / 'config.json'} implies, e.g. {', '.join(missing[:3])}; "
            "is it the checkpoint of this config?")
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise SourceError(
                f"{checkpoint.weights}: tensor {name!r} has shape {list(value.shape)} but "
                f"{checkpoint.folder / 'config.json'} implies {list(expected[name].shape)}: config and weights disagree")
    model.load_state_dict(state, strict=False)
    return model.eval()


def build_reference(checkpoint: Checkpoint, pooling: str, normalize: bool) -> SentenceEncoder:
    return SentenceEncoder(load_encoder(checkpoint), pooling, normalize).eval()
