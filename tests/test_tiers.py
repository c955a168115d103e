"""Fidelity tiers: labels derived from recorded figures, auto's choice per tier, bad input. Pure
functions over made-up figures, plus one load on the session artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from corom_runtime.artifacts.manifest import Manifest, VariantEntry
from corom_runtime.catalog import DEFAULT_FIDELITY, TIERS
from corom_runtime.cli import build_parser, main
from corom_runtime.errors import ArtifactError
from corom_runtime.selection import Machine, choose_variant, rank_by_speed, variant_order
from corom_runtime.tiers import (RETRIEVAL_KEY, check_fidelity, retrieval_ndcg, served_tier, tiers_of,
                                 variant_tiers)

ART = Path("/artifacts/m")
CPU = Machine(devices=("cpu",), engines=frozenset({"onnxruntime", "openvino"}), cpu="EPYC", threads=2)
REF_STSB = 0.90

# figures as `corom verify` records them: one per tier, each just inside it
EXACT = {"min_cosine": 0.99995, "top10_agreement": 0.995, "batch_invariance": 1.0, "finite": True,
         "stsb_spearman": 0.8999, RETRIEVAL_KEY: 0.9999}
FAITHFUL = {"min_cosine": 0.995, "top10_agreement": 0.975, "batch_invariance": 0.9999, "finite": True,
            "stsb_spearman": 0.899, RETRIEVAL_KEY: 0.998}
FAST = {"min_cosine": 0.97, "top10_agreement": 0.93, "batch_invariance": 0.998, "finite": True,
        "stsb_spearman": 0.895, RETRIEVAL_KEY: 0.993}


def entry(name: str, figures: dict | None, speed: float | None = None, passed: bool = True) -> VariantEntry:
    e = VariantEntry.for_variant(name, sha256="0" * 64, weights_sha256="1" * 64)
    e.passed, e.parity = passed, dict(figures or {})
    if speed is not None:
        e.speed = {"texts_per_s": speed, "cpu": "EPYC", "threads": 2}
    return e


def test_tier_table_is_ordered_most_faithful_first_and_nested():
    names = list(TIERS)
    assert names == ["exact", "faithful", "fast"] and DEFAULT_FIDELITY == "faithful"
    floors = [TIERS[n].min_cosine for n in names]
    assert floors == sorted(floors, reverse=True) and TIERS["exact"].min_cosine == 0.9999
    assert TIERS["faithful"].top10_agreement == 0.97 and TIERS["fast"].min_cosine == 0.95


def test_labels_come_from_the_figures():
    assert tiers_of(EXACT, REF_STSB) == ("exact", "faithful", "fast")
    assert tiers_of(FAITHFUL, REF_STSB) == ("faithful", "fast")
    assert tiers_of(FAST, REF_STSB) == ("fast",)
    # each figure can cost a tier
    assert tiers_of({**FAITHFUL, "top10_agreement": 0.969}, REF_STSB) == ("fast",)
    assert tiers_of({**FAITHFUL, "batch_invariance": 0.998}, REF_STSB) == ("fast",)
    assert tiers_of({**EXACT, "min_cosine": 0.99989}, REF_STSB) == ("faithful", "fast")
    assert tiers_of({**FAST, "stsb_spearman": 0.89}, REF_STSB) == ()          # 98.9% of fp32's STSb
    assert tiers_of({**FAST, RETRIEVAL_KEY: 0.985}, REF_STSB) == ()
    assert tiers_of({**FAST, "min_cosine": 0.949}, REF_STSB) == ()
    assert tiers_of({**EXACT, "finite": False}, REF_STSB) == ()
    # a figure not recorded fails the tiers that need it, unless a stricter tier passed: the tiers nest
    assert tiers_of(FAST, None) == () and tiers_of({k: v for k, v in FAST.items() if k != RETRIEVAL_KEY}, REF_STSB) == ()
    assert tiers_of(FAITHFUL, None) == ("faithful", "fast")
    assert tiers_of({k: v for k, v in FAITHFUL.items() if k != RETRIEVAL_KEY}, REF_STSB) == ("faithful", "fast")
    assert tiers_of(EXACT, None) == ("exact", "faithful", "fast")


def test_a_variant_that_failed_its_gate_has_no_tier_and_unverified_ones_get_their_gates_floors():
    assert variant_tiers(entry("ov-int8", FAITHFUL, passed=False), REF_STSB) == ()
    # passed, no figures recorded: what its gate guaranteed (faithful, and so every looser tier)
    assert variant_tiers(entry("ov-int8", None)) == ("faithful", "fast")
    assert variant_tiers(entry("ov-bf16", None)) == ("exact", "faithful", "fast")
    assert variant_tiers(entry("opt", None)) == ("exact", "faithful", "fast")


def test_a_manifest_from_before_tiers_loads_with_tiers_from_its_figures(tmp_path):
    """The pre-built artifact's figures as recorded before tiers (no retrieval figure, no label)."""
    data = {"name": "m", "source": "s", "pooling": "mean", "normalize": True, "score": "cosine", "max_length": 128,
            "embedding_dim": 4, "format_version": 2, "tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64},
            "quality": {"stsb_dev_spearman_reference": 0.9334},
            "variants": {
                "ov-int8": {"file": "model.ov-int8.xml", "sha256": "0" * 64, "engine": "openvino", "precision": "int8",
                            "devices": ["cpu"], "weights_file": "model.ov-int8.bin", "weights_sha256": "1" * 64,
                            "passed": True, "parity": {"min_cosine": 0.99518, "top10_agreement": 0.9755,
                                                       "batch_invariance": 1.0, "finite": True,
                                                       "stsb_spearman": 0.9335}},
                "ov-bf16": {"file": "model.fp32.onnx", "sha256": "0" * 64, "engine": "openvino", "precision": "bf16",
                            "devices": ["cpu"], "passed": True,
                            "parity": {"min_cosine": 0.99995, "top10_agreement": 0.9945, "batch_invariance": 1.0,
                                       "finite": True, "stsb_spearman": 0.9333}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    manifest = Manifest.read(tmp_path / "manifest.json")
    ref = manifest.quality["stsb_dev_spearman_reference"]
    # no retrieval figure: fast only through the stricter tiers they passed
    assert variant_tiers(manifest.variants["ov-int8"], ref) == ("faithful", "fast")
    assert variant_tiers(manifest.variants["ov-bf16"], ref) == ("exact", "faithful", "fast")


def test_retrieval_ndcg_forgives_near_ties_not_lost_neighbours():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 300))
    assert retrieval_ndcg(ref, ref) == 1.0
    assert retrieval_ndcg(ref, ref + rng.normal(scale=1e-3, size=ref.shape)) > 0.999
    lost = ref.copy()
    lost[np.arange(20), ref.argmax(1)] = -10  # every query's best passage pushed out
    assert retrieval_ndcg(ref, lost) < 0.95


def test_unknown_tier_is_a_clear_error_listing_the_tiers():
    assert check_fidelity(None) is None and check_fidelity("auto") is None and check_fidelity("fast") == "fast"
    with pytest.raises(ValueError, match=r"fidelity must be one of \['exact', 'faithful', 'fast'\].*got 'fastest'"):
        check_fidelity("fastest")
    with pytest.raises(ValueError, match="fidelity must be one of"):
        choose_variant({"ov-int8": entry("ov-int8", FAITHFUL)}, "auto", "cpu", CPU, ART, "quick")


def test_auto_runs_the_fastest_of_the_tier_and_a_tie_goes_to_the_more_faithful():
    variants = {"ov-int8": entry("ov-int8", FAITHFUL, speed=530.0), "ov-bf16": entry("ov-bf16", EXACT, speed=520.0),
                "int8": entry("int8", FAST, speed=700.0), "opt": entry("opt", EXACT, speed=240.0)}
    pick = lambda fidelity=None: choose_variant(variants, "auto", "cpu", CPU, ART, fidelity, REF_STSB)  # noqa: E731
    # ov-int8 is 2% faster than ov-bf16: a tie, which the exact variant wins (the table puts ov-int8 first)
    assert pick() == "ov-bf16" and pick("faithful") == "ov-bf16"
    assert pick("exact") == "ov-bf16"
    assert pick("fast") == "int8"
    variants["ov-int8"].speed["texts_per_s"] = 560.0  # 7.7% faster: no longer a tie
    assert pick() == "ov-int8"
    assert variant_order(variants, "auto", "cpu", CPU, ART, "exact", REF_STSB) == ["ov-bf16", "opt"]
    assert rank_by_speed(["a", "b", "c"], {"a": 100.0, "b": 98.0, "c": 97.0}, fidelity={"a": 1, "b": 1, "c": 2}) \
        == ["c", "a", "b"]


def test_a_tier_nobody_passed_is_an_error_and_the_tiers_nest_never_down():
    # no variant recorded the fast tier's task-quality figures: those that passed a stricter tier serve it
    no_fast = {"ov-int8": entry("ov-int8", {**FAITHFUL, RETRIEVAL_KEY: None}, speed=500.0),
               "opt": entry("opt", {**EXACT, RETRIEVAL_KEY: None}, speed=200.0)}
    assert choose_variant(no_fast, "auto", "cpu", CPU, ART, "fast", REF_STSB) == "ov-int8"
    assert choose_variant(no_fast, "ov-int8", "cpu", CPU, ART, "fast", REF_STSB) == "ov-int8"  # named, too
    # none faithful runs here (the exact one's engine is missing): fast is never taken for it, by auto or
    # when named: a clear error naming the tiers each variant passed
    no_openvino = Machine(("cpu",), frozenset({"onnxruntime"}), "EPYC", 2)
    mixed = {"ov-bf16": entry("ov-bf16", EXACT, speed=500.0), "int8": entry("int8", FAST, speed=900.0)}
    for asked in (None, "faithful"):
        with pytest.raises(ArtifactError, match=r"passed the 'faithful' tier \(.*\) or a stricter one; tiers passed: "
                                                r"int8: fast\. Ask for a tier one of them passed"):
            choose_variant(mixed, "auto", "cpu", no_openvino, ART, asked, REF_STSB)
    with pytest.raises(ArtifactError, match=r"passed the 'exact' tier \(min cos >= 0.9999") as refused:
        choose_variant(mixed, "auto", "cpu", no_openvino, ART, "exact", REF_STSB)
    # nothing is stricter than exact, and no figure is missing: no advice to re-verify
    assert "stricter" not in str(refused.value) and "re-run" not in str(refused.value)
    # a fast-only variant whose record lacks the retrieval figure: the error says which, and what to run
    unmeasured = {"int8": entry("int8", {**FAST, RETRIEVAL_KEY: None}, speed=900.0)}
    with pytest.raises(ArtifactError, match=r"re-run `corom verify`: the records of int8 lack figures the 'fast' tier"):
        choose_variant(unmeasured, "auto", "cpu", no_openvino, ART, "fast", REF_STSB)
    with pytest.raises(ArtifactError, match=r"it passed none; its record lacks retrieval_ndcg10: re-run `corom verify`"):
        choose_variant(unmeasured, "int8", "cpu", no_openvino, ART, "fast", REF_STSB)
    assert choose_variant(mixed, "auto", "cpu", no_openvino, ART, "fast", REF_STSB) == "int8"
    # with OpenVINO the exact variant serves a faithful request (it is faithful too), never int8
    assert choose_variant(mixed, "auto", "cpu", CPU, ART, None, REF_STSB) == "ov-bf16"


def test_a_named_variant_is_checked_against_a_named_tier():
    variants = {"int8": entry("int8", FAST), "ov-bf16": entry("ov-bf16", EXACT)}
    assert choose_variant(variants, "int8", "cpu", CPU, ART, None, REF_STSB) == "int8"   # no tier named: served
    assert choose_variant(variants, "ov-bf16", "cpu", CPU, ART, "faithful", REF_STSB) == "ov-bf16"
    with pytest.raises(ArtifactError, match=r"variant 'int8' of /artifacts/m did not pass the 'faithful' tier.*\['fast'\]"):
        choose_variant(variants, "int8", "cpu", CPU, ART, "faithful", REF_STSB)
    assert served_tier(("fast",), None) == "fast" and served_tier(("exact", "faithful"), None) == "faithful"
    assert served_tier(("exact", "faithful"), "exact") == "exact" and served_tier((), None) == "none"
    # fast asked, an exact variant served (the tiers nest): info, /health and the ranking say fast
    assert served_tier(("exact", "faithful", "fast"), "fast") == "fast"


def test_cli_offers_the_tiers_on_serve_embed_and_info():
    sub = build_parser()._subparsers._group_actions[0].choices
    for command in ("serve", "embed", "info"):
        actions = {a.dest: a for a in sub[command]._actions}
        assert list(actions["fidelity"].choices) == ["auto", *TIERS], command


def test_load_serves_the_asked_tier_on_the_session_artifact(bundled_artifact, capsys):
    from corom_runtime import Embedder

    emb = Embedder.load(bundled_artifact, fidelity="exact")
    assert emb.info.fidelity == "exact" and "exact" in emb.info.tiers
    default = Embedder.load(bundled_artifact)
    assert default.info.fidelity == DEFAULT_FIDELITY and DEFAULT_FIDELITY in default.info.tiers
    with pytest.raises(ValueError, match="fidelity must be one of"):
        Embedder.load(bundled_artifact, fidelity="lossless")
    assert main(["info", "-m", str(bundled_artifact), "--device", "cpu", "--fidelity", "exact", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fidelity"] == "exact" and info["variant"] == emb.variant
    assert all(r["excluded"] or "exact" in r["tiers"] for r in info["auto"])


def test_manifest_without_labels_still_loads(tmp_path, bundled_artifact):
    """A copy of the session artifact with the tier labels and retrieval figures removed (a manifest
    from before tiers) loads, and auto serves the same variant."""
    copy = tmp_path / "old"
    shutil.copytree(bundled_artifact, copy)
    data = json.loads((copy / "manifest.json").read_text())
    for v in data["variants"].values():
        v["parity"].pop("tiers", None)
        v["parity"].pop(RETRIEVAL_KEY, None)
    (copy / "manifest.json").write_text(json.dumps(data))
    from corom_runtime import Embedder

    emb = Embedder.load(copy, verify_here=False, warmup=False)
    assert emb.info.fidelity == "faithful" and emb.info.tiers[-2:] == ["faithful", "fast"]
    # fast asked: a variant that passed a stricter tier serves it, not refused for the missing figure
    fast = Embedder.load(copy, verify_here=False, warmup=False, fidelity="fast")
    assert fast.info.fidelity == "fast" and "fast" in fast.info.tiers


def test_health_shows_the_tier(bundled_artifact):
    import httpx

    from corom_runtime import Embedder
    from corom_runtime.serving.app import ServerSettings, create_app
    from test_server import Running

    emb = Embedder.load(bundled_artifact, variant="opt", device="cpu", fidelity="exact", verify_here=False)
    running = Running(create_app(emb, ServerSettings()))
    try:
        health = httpx.get(running.url("/health")).json()
    finally:
        running.stop()
    assert health["fidelity"] == "exact" and "exact" in health["tiers"] and health["variant"] == "opt"


def test_the_fast_recipe_quantizes_every_weight_matmul_and_keeps_the_activation_products():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from corom_export.openvino_int8 import RECIPES, kept_in_float

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
         helper.make_node("MatMul", ["h", "x"], ["y"], name="scores")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [weight])
    model = helper.make_model(graph)
    assert kept_in_float(model, "full", 4, 16) == ["scores"]
    with pytest.raises(ValueError, match="recognise"):  # the Q/K/V recipe refuses a graph without an FFN
        kept_in_float(model, "qkv", 4, 16)
    with pytest.raises(ValueError, match=r"unknown OpenVINO int8 recipe 'all'; known: \['full', 'qkv'\]"):
        kept_in_float(model, "all", 4, 16)
    assert RECIPES["full"] is None   # NNCF's transformer preset as the peers run it


def test_export_takes_a_variant_list(tmp_path):
    from corom_export.build import ExportOptions, export_artifact
    from corom_runtime.catalog import VARIANTS
    from corom_runtime.errors import CoromError

    assert ExportOptions().wants("ov-int8-fast") and not ExportOptions(variants=("opt",)).wants("ov-int8-fast")
    with pytest.raises(CoromError, match=r"unknown variant\(s\) \['ov-int4'\]: the variants are"):
        export_artifact("all-minilm-l6-v2", tmp_path / "x", ExportOptions(variants=("opt", "ov-int4")))
    assert "ov-int8-fast" in VARIANTS and VARIANTS["ov-int8-fast"].gate.min_cosine == TIERS["fast"].min_cosine



def test_verify_records_the_figures_the_tiers_come_from():
    from corom_export.verify import VariantResult
    from corom_runtime.catalog import VARIANTS
    from corom_runtime.parity import Parity

    parity = Parity(min_cosine=0.995, mean_cosine=0.999, max_abs_diff=0.01, top10_agreement=0.975, finite=True,
                    texts=2200, queries=200, batch_invariance=0.9999)
    result = VariantResult("ov-int8", parity, VARIANTS["ov-int8"].gate, "OpenVINO", [], stsb_spearman=0.899,
                           retrieval_ndcg=0.998)
    figures = result.figures()
    assert figures[RETRIEVAL_KEY] == 0.998 and figures["stsb_spearman"] == 0.899
    assert result.tiers(REF_STSB) == tiers_of(figures, REF_STSB) == ("faithful", "fast")
    failed = VariantResult("ov-int8", parity, VARIANTS["ov-int8"].gate, "OpenVINO", ["top-10 too low"],
                           stsb_spearman=0.899, retrieval_ndcg=0.998)
    assert failed.tiers(REF_STSB) == ()   # a variant that failed its own gate is served at no tier


def test_the_verify_table_keeps_its_columns_for_a_variant_of_every_tier():
    # "exact/faithful/fast" once ran into the next column: "pass  exact/faithful/fast CPUExecutionProvider"
    from corom_export.verify import VariantResult, VerifyReport
    from corom_runtime.catalog import VARIANTS
    from corom_runtime.parity import Parity

    def result(name: str, min_cos: float, top10: float) -> VariantResult:
        parity = Parity(min_cosine=min_cos, mean_cosine=0.9999, max_abs_diff=1e-4, top10_agreement=top10,
                        finite=True, texts=2200, queries=200, batch_invariance=0.99999)
        return VariantResult(name, parity, VARIANTS[name].gate, f"engine-of-{name}", [], stsb_spearman=REF_STSB,
                             retrieval_ndcg=1.0, speed={"texts_per_s": 100.0})

    report = VerifyReport(Path("a"), [result("fp32", 1.0, 1.0), result("ov-int8", 0.995, 0.975)],
                          reference_stsb=REF_STSB)
    head, _, reference, every, some = report.table().splitlines()
    column = head.index("measured with")
    assert "exact/faithful/fast" in every and "faithful/fast" in some and "torch" in reference
    assert every.index("engine-of-fp32") == some.index("engine-of-ov-int8") == reference.rindex("torch") == column


def test_a_corpus_job_serves_the_asked_tier(bundled_artifact, tmp_path, capsys):
    from corom_runtime.artifacts.artifact import load_artifact

    texts = tmp_path / "in.txt"
    texts.write_text("one short text\nanother, a little longer text\n")
    out = tmp_path / "out"
    assert main(["embed", "-m", str(bundled_artifact), "--device", "cpu", "--fidelity", "exact", "--file", str(texts),
                 "--output", str(out), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    artifact = load_artifact(bundled_artifact)
    chosen = artifact.variants[summary["variant"]]
    assert "exact" in variant_tiers(chosen, artifact.manifest.quality.get("stsb_dev_spearman_reference"))
    with pytest.raises(SystemExit) as exit_:   # argparse: not a tier, and the message lists the tiers
        main(["embed", "-m", str(bundled_artifact), "--fidelity", "fastest", "x"])
    assert exit_.value.code == 2 and "'exact', 'faithful', 'fast'" in capsys.readouterr().err
