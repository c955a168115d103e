"""What every engine shares: the session protocol the `Embedder` and `DynamicBatcher` talk to, and
the graph's feed. The engines (`ort` for ONNX Runtime, `openvino`) import it; it imports
neither, so no engine module needs another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from corom_runtime.errors import ArtifactError

INPUT_IDS, ATTENTION_MASK, OUTPUT = "input_ids", "attention_mask", "sentence_embedding"
TOKEN_TYPE_IDS = "token_type_ids"
# what the runtime can feed: the two it tokenizes, and token types (all 0: one-segment inputs)
FEEDABLE = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)


def check_inputs(names: list[str], model_path: Path) -> list[str]:
    """The graph's input names, checked to be ones the runtime can feed; returned in graph order."""
    unknown = [n for n in names if n not in FEEDABLE]
    if unknown or INPUT_IDS not in names:
        raise ArtifactError(f"{model_path} has inputs {names}; the runtime feeds {list(FEEDABLE)} "
                            "(input_ids required). Re-export it with `corom export`")
    return names


def build_feed(names: list[str], input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The feed for a graph with inputs `names`, built from what the graph asks for. Pure.

    >>> sorted(build_feed(["input_ids", "token_type_ids"], np.ones((1, 2), np.int64), np.ones((1, 2), np.int64)))
    ['input_ids', 'token_type_ids']
    """
    have = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}
    return {name: have[name] if name in have else np.zeros_like(input_ids) for name in names}


class EncoderSession(Protocol):
    """What every engine's session offers the `Embedder` and the `DynamicBatcher`."""

    device: str
    threads: int
    providers: list[str]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...
