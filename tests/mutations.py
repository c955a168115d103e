"""Mutation check: does the suite catch the realistic mistakes of docs/mutations.md?

Not collected by pytest (no `test_` prefix). Each mutation is a text substitution in one source file,
applied to a temporary copy of the working tree (tracked and untracked, not ignored, files); the named
tests then run on that copy (its `runtime/`, `export/` and `tests/` first on PYTHONPATH). A mutation is
CAUGHT when a named test fails, MISSED when they all pass.

    .venv/bin/python tests/mutations.py                 # every mutation
    .venv/bin/python tests/mutations.py verify-self int8-ranges-truncate-dim
    COROM_TEST_ARTIFACT=/work/prebuilt/all-minilm-l6-v2 .venv/bin/python tests/mutations.py ...

Exit status 0 when every mutation run was caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str          # relative to the repository root
    old: str           # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids that must catch it
    what: str = ""


MUTATIONS = [
    Mutation("verify-self", "export/corom_export/verify.py",
             "compare(reference, candidate, n_queries, artifact.score)",
             "compare(candidate, candidate, n_queries, artifact.score)",
             ("tests/test_parity.py::test_verify_compares_each_variant_with_the_reference",),
             "verify compares a variant with itself"),
    Mutation("gate-ignores-top10", "runtime/corom_runtime/parity.py",
             "if not self.top10_agreement >= gate.top10_agreement:", "if False:",
             ("tests/test_parity.py::test_every_gate_figure_can_fail_the_verdict",), "the gate ignores top-10"),
    Mutation("gate-ignores-batch-invariance", "runtime/corom_runtime/parity.py",
             "if not self.batch_invariance >= gate.batch_invariance:", "if False:",
             ("tests/test_parity.py::test_every_gate_figure_can_fail_the_verdict",),
             "the gate ignores batch invariance"),
    Mutation("check-thresholds-zero", "runtime/corom_runtime/cpu_check.py",
             "return Gate(min_cosine=gate.min_cosine, top10_agreement=max(0.0, top10),",
             "return Gate(min_cosine=0.0, top10_agreement=0.0,",
             ("tests/test_cpu_check.py::test_check_gate_keeps_min_cosine_and_relaxes_top10_to_what_was_seen_on_the_check_set",
              "tests/test_cpu_check.py::test_a_variant_that_passed_elsewhere_and_fails_here_is_never_served"),
             "load-time check thresholds loosened to 0.0"),
    Mutation("cache-key-no-variant", "runtime/corom_runtime/cpu_check.py",
             "text = json.dumps([identity, check_sha256, variant, platform.key()])",
             "text = json.dumps([check_sha256, variant, platform.key()])",
             ("tests/test_artifact_lifecycle.py::test_the_verdict_cache_key_holds_the_variant_identity_and_the_engine_version",),
             "verdict cache key drops the variant hash"),
    Mutation("cache-key-no-engine-version", "runtime/corom_runtime/cpu_check.py",
             "text = json.dumps([self.cpu, list(self.isa), self.engine, self.engine_version, self.device])",
             "text = json.dumps([self.cpu, list(self.isa), self.engine, self.device])",
             ("tests/test_artifact_lifecycle.py::test_the_verdict_cache_key_holds_the_variant_identity_and_the_engine_version",),
             "verdict cache key drops the engine version"),
    Mutation("int8-ranges-truncate-dim", "runtime/corom_runtime/embedder.py",
             "ranges = self._ranges[key] = calibration_ranges(calibration, truncate_dim, renormalize)",
             "ranges = self._ranges[key] = calibration_ranges(calibration, truncate_dim, False)",
             ("tests/test_conformance.py::test_fp32_variant_equals_sentence_transformers[bert]",),
             "int8 ranges not re-normalized at truncate_dim"),
    Mutation("chunk-sums", "runtime/corom_runtime/embedder.py",
             "        out /= np.bincount(self.owner, minlength=len(self.reports)).astype(np.float32)[:, None]\n",
             "", ("tests/test_shaping.py::test_chunked_pooling_is_the_mean_of_the_windows_on_a_model_that_does_not_normalize",),
             "chunked texts pooled as sums instead of means"),
    Mutation("max-windows-off-by-one", "runtime/corom_runtime/tokenization.py",
             "count = min(need if need is not None else limit + 1, max_windows)",
             "count = min(need if need is not None else limit + 1, max_windows - 1)",
             ("tests/test_shaping.py::test_a_text_needing_exactly_max_windows_windows_is_not_cut",),
             "max_windows off by one"),
    Mutation("corpus-ignores-direction", "runtime/corom_runtime/bulk/local.py",
             '"truncate": self.truncate, "truncation_direction": self.truncation_direction,',
             '"truncate": self.truncate, "truncation_direction": "right",',
             ("tests/test_surfaces.py::test_every_surface_gives_the_vectors_of_encode[left+prompt-corpus_local]",
              "tests/test_corpus_jobs.py::test_a_job_cuts_over_length_texts_where_truncation_direction_says"),
             "corpus jobs ignore truncation_direction"),
    Mutation("resume-same-size-edit", "runtime/corom_runtime/bulk/corpus_io.py",
             "digest.update(block)", "digest.update(str(len(block)).encode())",
             ("tests/test_corpus_jobs.py::test_resume_refuses_a_same_size_edit_of_the_input",),
             "resume accepts a same-size edit of the input"),
    Mutation("ray-bad-row", "runtime/corom_runtime/bulk/ray_job.py",
             "elif problem != BLANK and not self.skip_bad:", "elif False:",
             ("tests/test_corpus_jobs.py::test_the_ray_actor_names_a_bad_row_and_skips_a_blank_one",),
             "the Ray actor passes a bad row on"),
    Mutation("inline-beside-busy-worker", "runtime/corom_runtime/serving/batcher.py",
             "if warming or not idle or settings.max_wait_ms", "if warming or settings.max_wait_ms",
             ("tests/test_dynamic_batcher.py::test_runs_inline_is_a_pure_function_of_size_settings_and_idleness",),
             "a request runs inline beside a busy worker"),
    Mutation("full-queue-not-503", "runtime/corom_runtime/serving/http_errors.py",
             'return HTTPError(503, str(exc), "overloaded")', 'return HTTPError(400, str(exc), "overloaded")',
             ("tests/test_server.py::test_a_full_queue_is_a_503_with_retry_after_and_the_server_recovers",),
             "a full queue is not a 503"),
    Mutation("export-random-calibration", "export/corom_export/verify.py",
             "vectors = reference_embed(encoder, tokenizer.encode(calibration_texts(n)), dim, pad_id)",
             "vectors = reference_embed(encoder, tokenizer.encode(random.sample(calibration_texts(), n)), dim, pad_id)",
             ("tests/test_parity.py::test_export_is_deterministic",),
             "export draws a random calibration subset"),
]


def working_copy(into: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def run(mutation: Mutation) -> str:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        root = Path(tmp)
        working_copy(root)
        path = root / mutation.file
        text = path.read_text(encoding="utf-8")
        if text.count(mutation.old) != 1:
            return f"STALE (the text to mutate occurs {text.count(mutation.old)} times in {mutation.file})"
        path.write_text(text.replace(mutation.old, mutation.new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(root / d) for d in ("runtime", "export", "tests"))}
        where = subprocess.run([sys.executable, "-c", "import corom_runtime; print(corom_runtime.__file__)"], cwd=root,
                               env=env, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(root)):
            return f"ERROR (the copy's corom_runtime is not the one imported: {where})"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider",
                                 *mutation.tests], cwd=root, env=env, capture_output=True, text=True)
        if result.returncode == 1:
            return "caught"
        if result.returncode == 0:
            return "MISSED"
        return f"ERROR (pytest exit {result.returncode}: {result.stdout.strip().splitlines()[-1:]})"


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s) {sorted(unknown)}; known: {', '.join(m.name for m in MUTATIONS)}")
        return 2
    outcomes = {}
    for mutation in chosen:
        outcomes[mutation.name] = run(mutation)
        print(f"{mutation.name:32} {outcomes[mutation.name]}", flush=True)
    return 0 if all(o == "caught" for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
