"""The fixed text every figure rests on: files with checked hashes, calibration disjoint from evaluation."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from corom_export import corpus
from corom_runtime.errors import CoromError


def token_counts(texts: list[str]) -> np.ndarray:
    """Tokens of the bundled model's tokenizer (untruncated), [CLS] and [SEP] included."""
    from checkpoints import bundled_folder
    from corom_runtime.tokenization import TextTokenizer

    return np.array([len(i.ids) for i in TextTokenizer.from_file(bundled_folder() / "tokenizer.json", 4096).encode(texts)])


def evaluation_texts() -> set[str]:
    texts = set()
    for name in ("parity.json", "bench-mixed.json", "bench-long.json"):
        data = corpus.read_corpus(name)
        texts |= set(data["queries"]) | set(data["passages"])
    return texts


def test_every_corpus_file_matches_its_recorded_hash():
    for name in corpus.CORPUS_SHA256:
        assert corpus.read_corpus(name)


def test_a_changed_corpus_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "corpora"
    shutil.copytree(corpus.CORPORA, copy)
    text = (copy / "parity.json").read_text(encoding="utf-8")
    (copy / "parity.json").write_text(text.replace("the", "teh", 1), encoding="utf-8")
    monkeypatch.setattr(corpus, "CORPORA", copy)
    corpus.read_corpus.cache_clear()
    try:
        with pytest.raises(CoromError, match=r"parity.json has sha256 .* it changed.*corpus_build"):
            corpus.parity_corpus()
        assert corpus.calibration_texts(3)  # the untouched files still read
    finally:
        corpus.read_corpus.cache_clear()


def test_calibration_text_never_overlaps_evaluation_text():
    calibration = corpus.calibration_texts()
    assert len(calibration) >= 900
    assert not set(calibration) & evaluation_texts()


def test_parity_set_is_wide():
    data = corpus.read_corpus("parity.json")
    assert len(data["queries"]) == 200 and len(data["passages"]) == 2000
    kinds = {k: [p for p, kk in zip(data["passages"], data["kinds"]) if kk == k] for k in set(data["kinds"])}
    for kind in ("prose", "over-length", "code", "numbers", "punctuation", "handwritten", "short"):
        assert len(kinds[kind]) >= 50, kind
    assert sum(n > 128 for n in token_counts(data["passages"])) >= 100   # past the 128-token window
    non_ascii = [p for p in data["passages"] if any(ord(c) > 0x2FF for c in p)]
    assert len(non_ascii) >= 25                                           # Cyrillic, CJK, Arabic, Devanagari...
    assert any("\n" in p for p in kinds["code"])


def test_workloads_have_their_lengths():
    mixed, long = corpus.workload_corpus("mixed", 200, 6000), corpus.workload_corpus("long", 200, 6000)
    seen = {name: np.minimum(token_counts(c.passages), 128) for name, c in (("mixed", mixed), ("long", long))}
    assert 30 <= seen["mixed"].mean() <= 45 and seen["mixed"].min() <= 4    # the short mix: mean ~37 tokens
    assert 85 <= seen["long"].mean() <= 100 and seen["long"].min() >= 24    # MS MARCO-like: 24-128, mean ~91
    with pytest.raises(ValueError, match="holds 200 queries and 6000 passages"):
        corpus.workload_corpus("long", 200, 6001)
    with pytest.raises(ValueError, match="workload must be one of"):
        corpus.workload_corpus("huge")


def test_the_text_does_not_move_with_import_order():
    # what the old docstring harvest did: 3,957 paragraphs bare, 3,956 after `import torch`
    code = ("import sys; {pre}; from corom_export.corpus import parity_corpus; import hashlib; "
            "c = parity_corpus(); print(hashlib.sha256(repr((c.queries, c.passages)).encode()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code.format(pre=pre)], capture_output=True, text=True,
                           check=True).stdout for pre in ("pass", "import torch", "import json, csv, sqlite3")}
    assert len(runs) == 1
