"""The `corom` command line's own behaviour: messages, --version, usage errors, `presets` and `info`
(in-process through `main([...])`: no subprocess start-up)."""

from __future__ import annotations

import json

import pytest

from corom_runtime.artifacts import artifact as artifact_module
from corom_runtime.artifacts.artifact import resolve_path
from corom_runtime.artifacts.manifest import VariantEntry
from corom_runtime.cli import auto_ranking, closest_option, main
from corom_runtime.selection import Machine


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`corom ARGV` in this process: (exit status, stdout, stderr); argparse's exits included."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_flag_names_the_subcommand_and_the_closest_flag(capsys):
    code, _, err = run(capsys, "embed", "--dims", "128", "hello")
    assert code == 2
    assert "corom embed: error: unrecognized arguments: --dims" in err and "did you mean --truncate-dim?" in err
    code, _, err = run(capsys, "embed", "--promt-name", "query", "hello")
    assert code == 2 and "did you mean --prompt-name?" in err


def test_a_mistyped_choice_or_subcommand_gets_a_suggestion(capsys):
    code, _, err = run(capsys, "info", "--variant", "ov-bf61")
    assert code == 2 and "corom info: error" in err and "did you mean ov-bf16?" in err
    code, _, err = run(capsys, "embedd", "x")
    assert code == 2 and "did you mean embed?" in err


@pytest.mark.parametrize("typed, meant", [("--dims", "--truncate-dim"), ("--dimensions", "--truncate-dim"),
                                          ("--batchsize", "--batch-size"), ("--prompt", "--prompt-name"),
                                          ("--model-path", "--model"), ("--zzz", None)])
def test_closest_option(typed, meant):
    options = ["--model", "-m", "--truncate-dim", "--batch-size", "--prompt-name", "--precision", "--max-batch-tokens"]
    assert closest_option(typed, options) == meant


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("corom 0.")


def test_score_without_candidates_is_a_usage_error(capsys, tmp_path):
    # checked before the model loads: no artifact needed, and no `[]` printed as if it were a result
    code, out, err = run(capsys, "score", "-m", str(tmp_path / "absent"), "-s", "a")
    assert code == 2 and out == ""
    assert "corom score: error" in err and "candidates" in err and "usage: corom score" in err


def test_presets_and_load_find_an_artifact_by_one_rule(capsys, tmp_path, monkeypatch, bundled_artifact):
    """A clone's models/build copy: `-m NAME` loads it, so `corom presets` must say it is exported, there."""
    monkeypatch.setenv("COROM_CACHE_DIR", str(tmp_path / "empty-cache"))
    build = tmp_path / "models" / "build"
    build.mkdir(parents=True)
    (build / "all-minilm-l6-v2").symlink_to(bundled_artifact)
    monkeypatch.setattr(artifact_module, "build_dir", lambda name: build / name)
    code, out, _ = run(capsys, "presets", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["all-minilm-l6-v2"]["exported"] is True
    assert rows["all-minilm-l6-v2"]["artifact"] == str(resolve_path("all-minilm-l6-v2")) == str(build / "all-minilm-l6-v2")
    assert rows["e5-small-v2"]["exported"] is False
    code, out, _ = run(capsys, "presets")
    assert f"exported: {build / 'all-minilm-l6-v2'}" in out
    # the hint names the preset to export, not a placeholder
    assert "not exported: corom export e5-small-v2" in out and "NAME" not in out


def entry(name: str, speed: float | None, passed: bool = True, engine: str = "openvino") -> VariantEntry:
    recorded = {"texts_per_s": speed, "cpu": "Test CPU", "threads": 2} if speed else {}
    return VariantEntry(name=name, file=f"{name}.onnx", sha256="0", engine=engine, precision="fp32",
                        devices=["cpu"], passed=passed, speed=recorded)


def test_auto_ranking_shows_speeds_ties_and_exclusions():
    variants = {"ov-int8": entry("ov-int8", 100.0), "ov-bf16": entry("ov-bf16", 103.0),
                "int8": entry("int8", 300.0, passed=False, engine="onnxruntime"),
                "opt": entry("opt", 50.0, engine="onnxruntime"), "fp32": entry("fp32", None, engine="onnxruntime")}
    here = Machine(devices=("cpu",), engines=frozenset({"openvino"}), cpu="Test CPU", threads=2)
    rows = {r["variant"]: r for r in auto_ranking(variants, "cpu", here)}
    # ov-int8 is 3% faster: a tie (5%), which the more faithful ov-bf16 (exact) wins, and says so
    variants["ov-int8"], variants["ov-bf16"] = entry("ov-int8", 103.0), entry("ov-bf16", 100.0)
    rows = {r["variant"]: r for r in auto_ranking(variants, "cpu", here)}
    assert rows["ov-bf16"]["rank"] == 1 and rows["ov-bf16"]["tie_with"] == "ov-int8"
    assert rows["ov-bf16"]["tie_rule"] == "the more faithful first"
    # two variants of the same tiers: the tie goes to the table's order, and the ranking says that
    ort = Machine(devices=("cpu",), engines=frozenset({"onnxruntime"}), cpu="Test CPU", threads=2)
    same = {r["variant"]: r for r in auto_ranking({"opt": entry("opt", 100.0, engine="onnxruntime"),
                                                   "fp32": entry("fp32", 103.0, engine="onnxruntime")}, "cpu", ort)}
    assert same["opt"]["rank"] == 1 and same["opt"]["tie_with"] == "fp32" and same["opt"]["tie_rule"] == "the table's order"
    assert rows["ov-int8"]["rank"] == 2 and rows["ov-int8"]["tie_with"] is None
    assert rows["int8"]["excluded"] == "failed its gate at export"
    assert rows["opt"]["excluded"] == "onnxruntime not installed" and rows["opt"]["rank"] is None
    elsewhere = Machine(devices=("cpu",), engines=frozenset({"openvino", "onnxruntime"}), cpu="Other", threads=2)
    rows = {r["variant"]: r for r in auto_ranking(variants, "cpu", elsewhere)}
    assert rows["ov-int8"]["texts_per_s"] is None and rows["ov-int8"]["measured_on"] == "Test CPU, 2 threads"
    assert [r["variant"] for r in auto_ranking(variants, "cpu", elsewhere) if r["rank"]] == ["ov-int8", "ov-bf16", "opt", "fp32"]


def test_info_says_why_auto_chose_its_variant(capsys, bundled_artifact):
    code, out, _ = run(capsys, "info", "-m", str(bundled_artifact), "--device", "cpu", "--json")
    info = json.loads(out)
    ranked = [r for r in info["auto"] if r["rank"]]
    assert code == 0 and ranked[0]["variant"] == info["variant"]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    code, out, _ = run(capsys, "info", "-m", str(bundled_artifact), "--device", "cpu")
    assert code == 0 and f"chose {info['variant']}:" in out
    assert all(f"{r['rank']}. {r['variant']}" in out for r in ranked)


def test_the_offline_export_hint_names_the_preset(monkeypatch):
    """A preset's hub download failing (offline) says the command to paste, with the preset's name."""
    import sys
    import types

    from corom_export.sources import SourceError, download_hf

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(SourceError, match=r"corom export DIR --preset e5-small-v2`"):
        download_hf("intfloat/e5-small-v2")


def test_auto_explanation_separates_long_names_and_names_the_speed_method():
    """`corom info`'s ranking: a 12-character variant name (ov-int8-fast) stays apart from what follows
    it, and the speeds say how `corom verify` measured them (which workload auto ranks by)."""
    from corom_runtime.cli import _explain_auto

    method = "best of 3 interleaved rounds, long passages"
    variants = {"ov-int8-fast": entry("ov-int8-fast", 300.0), "ov-int8": entry("ov-int8", 200.0),
                "ov-bf16": entry("ov-bf16", 150.0)}
    for v in variants.values():
        v.speed["method"] = method
    here = Machine(devices=("cpu",), engines=frozenset({"openvino"}), cpu="Test CPU", threads=2)
    rows = auto_ranking(variants, "cpu", here, tier="exact")
    assert {r["variant"]: r["method"] for r in rows}["ov-int8"] == method
    text = _explain_auto(rows, "ov-bf16")
    assert "ov-int8-fast excluded" in text and "ov-int8-fastexcluded" not in text
    assert method in text
    elsewhere = Machine(devices=("cpu",), engines=frozenset({"openvino"}), cpu="Other CPU", threads=2)
    text = _explain_auto(auto_ranking(variants, "cpu", elsewhere), "ov-int8-fast")
    assert "ov-int8-fast not measured here" in text
