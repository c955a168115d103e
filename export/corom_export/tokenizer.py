"""Build the artifact's `tokenizer.json` from a checkpoint (HF `tokenizers` format).

Padding is switched off: the runtime pads each length-sorted batch to its own longest input, which
is what makes mixed-length batches cheap. Truncation is set to the artifact's max length.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from .sources import Checkpoint


def build_tokenizer(checkpoint: Checkpoint, max_length: int) -> Tokenizer:
    path = checkpoint.folder / "tokenizer.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        wordpiece = BertWordPieceTokenizer(
            str(checkpoint.folder / "vocab.txt"), lowercase=checkpoint.do_lower_case
        )
        tokenizer = wordpiece._tokenizer  # the plain Tokenizer inside the convenience wrapper
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer
