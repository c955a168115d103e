from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_modelscope_checkpoint  # noqa: E402

EXAMPLE_SOURCE = "how long it take to get a master degree"
EXAMPLE_CANDIDATES = [
    "On average, students take about 18 to 24 months to complete a master degree.",
    "On the other hand, some students prefer to go at a slower pace and choose to take",
    "several years to complete their studies.",
    "It can take anywhere from two semesters",
]


@pytest.fixture(scope="session")
def bundled_artifact(tmp_path_factory) -> Path:
    """The bundled all-MiniLM-L6-v2 exported to every variant and verified on the full parity corpus
    (the gates `corom export` applies), with a smaller STSb sample and speed pass than the CLI's (those
    figures' precision is not what the suite tests; they cost a minute).

    COROM_TEST_ARTIFACT=models/build/all-minilm-l6-v2 reuses an artifact `make demo` built (a faster
    edit-test loop); CI always exports afresh."""
    import os

    if os.environ.get("COROM_TEST_ARTIFACT"):
        return Path(os.environ["COROM_TEST_ARTIFACT"]).resolve()
    from corom_export.build import ExportOptions, export_artifact
    from corom_export.verify import verify_artifact

    out = tmp_path_factory.mktemp("bundled") / "all-minilm-l6-v2"
    export_artifact("all-minilm-l6-v2", out, ExportOptions())
    verify_artifact(out, stsb_pairs=300, speed_texts=96, speed_rounds=2)
    return out


@pytest.fixture(scope="session")
def corom_checkpoint(tmp_path_factory) -> Path:
    return write_modelscope_checkpoint(tmp_path_factory.mktemp("ckpt") / "corom-like")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The CoROM layout at a tiny size (2 layers, width 64): for tests of plumbing, not of fidelity."""
    return write_modelscope_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-corom", num_hidden_layers=2,
                                       hidden_size=64, intermediate_size=128, num_attention_heads=2)


@pytest.fixture(scope="session")
def corom_artifact(tmp_path_factory, corom_checkpoint) -> Path:
    from corom_export.build import ExportOptions, export_artifact
    from corom_export.verify import verify_artifact

    out = tmp_path_factory.mktemp("corom") / "corom-like"
    export_artifact(str(corom_checkpoint), out, ExportOptions())
    # random weights: STSb means nothing here, and the speed pass only has to exist
    verify_artifact(out, n_queries=60, n_passages=500, stsb=False, speed_texts=64, speed_rounds=1)
    return out
