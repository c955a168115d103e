from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_modelscope_checkpoint  # noqa: E402

EXAMPLE_SOURCE = "how long it take to get a master degree"
EXAMPLE_CANDIDATES = [
    "On average, students take about 18 to 24 months to complete a master degree.",
    "On the other hand, some students prefer to go at a slower pace and choose to take",
    "several years to complete their studies.",
    "It can take anywhere from two semesters",
]


# the variants the suite's session artifacts hold: all but ov-int8-fast (one more NNCF pass and one more
# verified variant, tested through its pure parts in test_tiers.py)
SUITE_VARIANTS = ("fp32", "opt", "fp16", "int8", "ov-int8", "ov-bf16")


def shared(tmp_path_factory, key: str, build: Callable[[Path], object], leaf: str) -> Path:
    """`KEY/LEAF`, a session fixture's folder built once per test run however many pytest-xdist workers
    ask for it: the first builds it (`build(KEY/LEAF)`) under a file lock, the others wait and reuse it
    (read-only: a test that edits one copies it first)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    out, done = root / key / leaf, root / f"{key}.done"
    with FileLock(str(root / f"{key}.lock")):
        if not done.exists():
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def bundled_artifact(tmp_path_factory) -> Path:
    """The bundled all-MiniLM-L6-v2 exported to every variant and verified on the parity corpus (its 200 queries, the first 1,000 of its 2,000 passages)
    (the gates `corom export` applies), with a smaller STSb sample and speed pass than the CLI's (those
    figures' precision is not what the suite tests; they cost a minute).

    COROM_TEST_ARTIFACT=models/build/all-minilm-l6-v2 reuses an artifact `make demo` built (a faster
    edit-test loop); CI always exports afresh."""
    if os.environ.get("COROM_TEST_ARTIFACT"):
        return Path(os.environ["COROM_TEST_ARTIFACT"]).resolve()
    from corom_export.build import ExportOptions, export_artifact
    from corom_export.verify import verify_artifact

    def build(out: Path) -> None:
        export_artifact("all-minilm-l6-v2", out, ExportOptions(variants=SUITE_VARIANTS))
        # the parity corpus's 200 queries against its first 1,000 passages (every kind of text is among
        # them: the kinds are interleaved), not `corom export`'s 2,000: the gates are the same, half the
        # passages cost half the suite's longest fixture
        verify_artifact(out, n_passages=1000, stsb_pairs=150, speed_texts=48, speed_rounds=1)
    return shared(tmp_path_factory, "bundled", build, "all-minilm-l6-v2")


@pytest.fixture(scope="session")
def corom_checkpoint(tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "ckpt", write_modelscope_checkpoint, "corom-like")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The CoROM layout at a tiny size (2 layers, width 64): for tests of plumbing, not of fidelity."""
    return shared(tmp_path_factory, "tiny", lambda out: write_modelscope_checkpoint(
        out, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2), "tiny-corom")


@pytest.fixture(scope="session")
def corom_artifact(tmp_path_factory, corom_checkpoint) -> Path:
    from corom_export.build import ExportOptions, export_artifact
    from corom_export.verify import verify_artifact

    def build(out: Path) -> None:
        # random weights: NNCF calibrated on 100 texts, not 925 (12 s less; its verdict is judged either way)
        export_artifact(str(corom_checkpoint), out, ExportOptions(variants=SUITE_VARIANTS, calibration_texts=100))
        # random weights: STSb means nothing here, and the speed pass only has to exist
        verify_artifact(out, n_queries=60, n_passages=500, stsb=False, speed_texts=64, speed_rounds=1)
    return shared(tmp_path_factory, "corom", build, "corom-like")


def pytest_collection_modifyitems(config, items) -> None:
    """One test file that needs the session artifact first, then every file that does not, then the
    rest: under pytest-xdist (`make test`, `--no-loadscope-reorder`) the worker that builds the artifact
    (two minutes) is not joined by the other waiting for it; that one runs the files that need none."""
    by_file: dict[Path, list] = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)
    # a file that asks for it at run time (`request.getfixturevalue`) says so with NEEDS_BUNDLED_ARTIFACT:
    # counted as needing none, it ran beside the build and both workers waited on it (98 s)
    needs = {f: any("bundled_artifact" in i.fixturenames or getattr(i.module, "NEEDS_BUNDLED_ARTIFACT", False)
                    for i in its) for f, its in by_file.items()}
    heavy = [f for f in by_file if needs[f]]
    order = heavy[:1] + [f for f in by_file if not needs[f]] + heavy[1:]
    items[:] = [item for f in order for item in by_file[f]]
