"""The PyTorch reference encoder: the family's base model (no pooler) + the preset's pooling + optional L2 norm.

For the CoROM preset (CLS pooling, no normalisation) this computes exactly what ModelScope's
`BertForSentenceEmbedding` returns: the last hidden state of token 0, unnormalised.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from corom_runtime.catalog import POOLINGS

from .sources import Checkpoint, DenseLayer, SourceError

log = logging.getLogger(__name__)


ACTIVATIONS = {"identity": nn.Identity, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Token states -> one vector per row, as sentence-transformers' `Pooling` computes each mode
    (right padding, which is what the runtime feeds)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    if pooling == "lasttoken":
        last = (attention_mask.sum(1) - 1).clamp(min=0)
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return torch.gather(hidden * mask, 1, index).squeeze(1)
    if pooling == "weightedmean":
        positions = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
        weights = mask * positions
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    # clamp: an all-padding row (never produced by the tokenizer) must not divide by zero
    total, count = (hidden * mask).sum(1), mask.sum(1).clamp(min=1e-9)
    if pooling == "mean":
        return total / count
    if pooling == "mean_sqrt_len_tokens":
        return total / torch.sqrt(count)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class SentenceEncoder(nn.Module):
    """Encoder + pooling (+ Dense layers) (+ L2 normalisation): `(input_ids, attention_mask) -> [batch, dim]`.

    `self.bert` is the family's base model (BertModel, XLMRobertaModel, ...), named for history; `dense`
    are a sentence-transformers folder's Dense modules (its `modules.json`), applied after pooling."""

    def __init__(self, bert: nn.Module, pooling: str, normalize: bool, dense: nn.Module | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.bert = bert
        self.pooling = pooling
        self.normalize = normalize
        self.dense = dense if dense is not None else nn.Identity()
        self.dim = int(dense[-1][0].out_features) if dense is not None and len(dense) else int(bert.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = self.dense(pool(hidden, attention_mask, self.pooling))
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


def load_dense(layers: tuple[DenseLayer, ...]) -> nn.Sequential | None:
    """sentence-transformers' Dense modules as torch layers (`linear.weight`/`linear.bias` in each folder)."""
    if not layers:
        return None
    built = []
    for layer in layers:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        state = _read_weights(layer.weights())
        state = {k.removeprefix("linear."): v for k, v in state.items()}
        try:
            linear.load_state_dict(state)
        except RuntimeError as exc:
            raise SourceError(f"{layer.weights()}: the Dense weights do not match its config.json "
                              f"({layer.in_features} -> {layer.out_features}): {exc}") from exc
        built.append(nn.Sequential(linear, ACTIVATIONS[layer.activation]()))
    return nn.Sequential(*built).eval()


def load_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Read the weights without unpickling arbitrary objects."""
    return _read_weights(checkpoint.weights)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
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
    """The encoder with `pooling` and `normalize` (the preset's or the folder's), and the folder's own
    Dense layers whatever the preset says: a sentence-transformers model without them is another model."""
    head = checkpoint.head()
    dense = load_dense(head.dense) if head else None
    return SentenceEncoder(load_encoder(checkpoint), pooling, normalize, dense).eval()
