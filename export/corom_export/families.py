"""Model families the exporter knows: one record each, read by the loader, the exporter and the checks.

A family says how to build the encoder from a checkpoint (transformers classes, the prefixes that
checkpoints put before its weight names), where its sizes live in the config, which ONNX Runtime
optimizer type fuses it, and its padding id. What differs inside the graph (RoBERTa's position ids
counted from the pad id, one token type) is the transformers model's own business: the export traces
it, and the runtime pads with the id the manifest records.

Not here: DistilBERT. Its eager attention (transformers 4.57) is not matched by ONNX Runtime 1.32's
attention fusion (0 of 2 layers fused on a test checkpoint), so the `opt`/`fp16`/`int8` variants
would be unfused and slow; adding it needs that fusion first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corom_runtime.errors import CoromError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]          # config.json "model_type" values
    config_class: str                     # transformers class names, imported when used
    model_class: str
    weight_prefixes: tuple[str, ...]      # stripped from checkpoint keys ("bert.encoder..." -> "encoder...")
    optimizer_type: str                   # onnxruntime.transformers optimize_model(model_type=...)
    default_pad_id: int
    # config key for (heads, hidden, layers, intermediate): families name their sizes differently
    size_keys: tuple[str, str, str, str] = ("num_attention_heads", "hidden_size", "num_hidden_layers",
                                            "intermediate_size")
    model_kwargs: dict = field(default_factory=dict)
    examples: str = ""
    # RoBERTa/XLM-R count positions from pad_id + 1: their table holds max_position_embeddings - pad_id - 1
    positions_after_pad: bool = False

    def sizes(self, config: dict) -> dict[str, int]:
        """heads, hidden, layers, intermediate from a config dict; a missing key names itself."""
        out = {}
        for what, key in zip(("heads", "hidden", "layers", "intermediate"), self.size_keys):
            if not isinstance(config.get(key), int):
                raise CoromError(f"config.json of this {self.name} checkpoint has no whole-number {key!r}")
            out[what] = config[key]
        return out

    def pad_id(self, config: dict) -> int:
        value = config.get("pad_token_id")
        return int(value) if isinstance(value, int) else self.default_pad_id


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("bert", ("bert",), "BertConfig", "BertModel", ("bert.",), "bert", 0,
           model_kwargs={"add_pooling_layer": False},
           examples="CoROM (ModelScope layout), all-MiniLM-L6-v2, bge-small-en-v1.5, e5-small-v2, gte-small"),
    Family("xlm-roberta", ("xlm-roberta",), "XLMRobertaConfig", "XLMRobertaModel", ("roberta.", "xlm_roberta."),
           "bert", 1, model_kwargs={"add_pooling_layer": False}, positions_after_pad=True,
           examples="multilingual-e5-small, paraphrase-multilingual-MiniLM-L12-v2"),
    Family("roberta", ("roberta",), "RobertaConfig", "RobertaModel", ("roberta.",), "bert", 1,
           model_kwargs={"add_pooling_layer": False}, positions_after_pad=True, examples="all-distilroberta-v1"),
)}


def family_for(config: dict, where: str = "config.json") -> Family:
    """The family of a checkpoint config, or an error naming the supported ones."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise CoromError(
        f"{where} describes a {model_type!r} model, which corom-onnx cannot export; supported families: "
        + "; ".join(f"{f.name} (model_type {'/'.join(f.model_types)}: e.g. {f.examples})" for f in FAMILIES.values()))
