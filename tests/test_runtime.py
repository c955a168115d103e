"""The lean runtime: parity through the public API, ModelScope output, batching, bad input, providers."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import EXAMPLE_CANDIDATES, EXAMPLE_SOURCE, SUITE_VARIANTS
from corom_export.reference import build_reference
from corom_export.sources import resolve
from corom_runtime import Embedder, ProviderUnavailableError
from corom_runtime import embedder as embedder_module
from corom_runtime.batching import pad_batch, plan_batches
from corom_runtime.cli import main as corom
from corom_runtime.errors import ArtifactError
from corom_runtime.machine import available_cpus

from corom_runtime.catalog import VARIANTS, engine_installed

GATE_COS = {name: spec.gate.min_cosine for name, spec in VARIANTS.items()}
CPU_VARIANTS = [n for n, v in VARIANTS.items() if "cpu" in v.devices and engine_installed(v.engine)
                and n in SUITE_VARIANTS]


@pytest.fixture(scope="module")
def int8(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, variant="int8", device="cpu")


@pytest.fixture(scope="module")
def opt(bundled_artifact) -> Embedder:
    """fp32: batch composition does not change its numbers (dynamic int8 scales per batch do)."""
    return Embedder.load(bundled_artifact, variant="opt", device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _reference(folder, pooling, normalize, texts, artifact):
    """The PyTorch reference, cut where `artifact` cuts (its manifest's window, not a constant)."""
    from corom_export.tokenizer import build_tokenizer
    from corom_runtime.artifacts.artifact import load_artifact

    max_length = load_artifact(artifact).max_length

    ck = resolve(str(folder))
    enc = build_reference(ck, pooling, normalize)
    tok = build_tokenizer(ck, max_length)
    out = []
    with torch.inference_mode():
        for text in texts:  # one at a time: no padding at all in the reference
            ids = torch.tensor([tok.encode(text).ids])
            out.append(enc(ids, torch.ones_like(ids)).numpy()[0])
    return np.stack(out)


TEXTS = [EXAMPLE_SOURCE, *EXAMPLE_CANDIDATES, "", "a", "word " * 600,  # 600 tokens: past any window (512 positions)
         "The quick brown fox jumps over the lazy dog near the riverbank at dawn."]


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_runtime_matches_reference_on_bundled_model(bundled_artifact, variant):
    from checkpoints import bundled_folder

    ref = _reference(bundled_folder(), "mean", True, TEXTS, bundled_artifact)
    got = Embedder.load(bundled_artifact, variant=variant, device="cpu").encode(TEXTS, batch_size=3)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= GATE_COS[variant], cos


@pytest.mark.parametrize("variant", ["opt", "int8", *[v for v in CPU_VARIANTS if v.startswith("ov-")]])
def test_runtime_matches_reference_on_corom_checkpoint(corom_artifact, corom_checkpoint, variant):
    import json

    from corom_runtime.errors import VariantRejectedError

    ref = _reference(corom_checkpoint, "cls", False, TEXTS, corom_artifact)
    entry = json.loads((corom_artifact / "manifest.json").read_text())["variants"][variant]
    if not entry["passed"]:  # a recipe that failed its gate on this model is never served by name either
        with pytest.raises(VariantRejectedError, match=f"'{variant}'.*fails its gate on this CPU"):
            Embedder.load(corom_artifact, variant=variant, device="cpu")
        assert variant.endswith("int8"), entry["parity"]  # only an int8 recipe may fail on this model
        return
    got = Embedder.load(corom_artifact, variant=variant, device="cpu").encode(TEXTS)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= GATE_COS[variant]
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)  # CoROM: unnormalised


def test_modelscope_example_ranks_first_sentence_highest_api_and_cli(int8, bundled_artifact, capsys):
    result = int8.pipeline({"source_sentence": [EXAMPLE_SOURCE], "sentences_to_compare": EXAMPLE_CANDIDATES})
    assert result["text_embedding"].shape == (5, 384) and result["text_embedding"].dtype == np.float32
    scores = result["scores"]
    assert len(scores) == 4 and int(np.argmax(scores)) == 0
    expected = [float(result["text_embedding"][0] @ e) for e in result["text_embedding"][1:]]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)  # normalised model: dot == cosine
    assert corom(["score", "--model", str(bundled_artifact), "--device", "cpu", "--variant", "int8",
                  "--source", EXAMPLE_SOURCE, *EXAMPLE_CANDIDATES]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["text_embedding_shape"] == [5, 384]
    assert list(np.argsort(cli["scores"])) == list(np.argsort(scores))


def test_dot_score_for_corom(corom_artifact):
    emb = Embedder.load(corom_artifact, variant="opt", device="cpu")
    s = emb.score("query", ["passage one", "passage two"])
    e = emb.encode(["query", "passage one", "passage two"])
    np.testing.assert_allclose(s, e[0] @ e[1:].T, rtol=1e-4)


def test_order_is_preserved_whatever_the_batching(opt, int8):
    texts = [f"sentence number {i} " + "word " * (i % 37) for i in range(100)]
    alone = np.stack([opt.encode([t])[0] for t in texts[:10]])
    batched = opt.encode(texts, batch_size=7)
    np.testing.assert_allclose(batched[:10], alone, atol=1e-5)
    reversed_ = opt.encode(texts[::-1], batch_size=16)[::-1]
    np.testing.assert_allclose(reversed_, batched, atol=1e-5)
    # int8 scales activations per batch: same rows within the int8 tolerance, and in the same order
    q = int8.encode(texts, batch_size=7)
    assert cosines(q, batched).min() >= VARIANTS["int8"].gate.min_cosine  # the int8 gate, not a looser figure
    assert (np.argmax(q @ q.T - 2 * np.eye(100), axis=1) == np.argmax(batched @ batched.T - 2 * np.eye(100), axis=1)).mean() > 0.9


def test_single_string_gives_a_vector(int8):
    assert int8.encode("hello").shape == (384,)


def test_empty_list_gives_empty_array(int8):
    out = int8.encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_empty_and_whitespace_are_cls_sep(int8):
    emb, report = int8.encode(["", "   ", "\t\n"], return_report=True)
    assert [r.tokens for r in report] == [2, 2, 2]
    np.testing.assert_allclose(emb[1], emb[0], atol=1e-6)
    np.testing.assert_allclose(emb[2], emb[0], atol=1e-6)
    assert np.isfinite(emb).all()


def test_non_string_item_names_its_index(int8):
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        int8.encode(["a", "b", 3])
    with pytest.raises(TypeError, match=r"texts\[0\] is NoneType"):
        int8.encode([None])


def test_huge_text_is_truncated_and_reported(opt):
    huge = "lorem ipsum dolor sit amet " * 40000  # ~1 MB
    emb, report = opt.encode([huge, "short"], return_report=True)
    assert report[0].truncated and report[0].tokens == opt.artifact.max_length  # the preset's window (256)
    assert not report[1].truncated
    # what the model sees is the first max_length tokens, whatever follows them
    np.testing.assert_allclose(emb[0], opt.encode([huge[: len(huge) // 100]])[0], atol=1e-5)
    assert np.isfinite(emb).all()


def test_odd_unicode_gives_defined_results(opt):
    texts = ["日本語のテキスト", "Привет мир", "مرحبا بالعالم", "emoji 😀🎉👍🏽", "ctrl\x00\x01\x07\x1b chars",
             "lone \ud800 surrogate", "\ufeffbom", "e\u0301 combining", "\u200b\u200b"]
    emb, report = opt.encode(texts, return_report=True)
    assert emb.shape == (len(texts), 384) and np.isfinite(emb).all()
    assert all(r.tokens >= 2 for r in report)
    # the lone surrogate is read as U+FFFD, as a UTF-8 decoder would
    np.testing.assert_allclose(emb[5], opt.encode(["lone \ufffd surrogate"])[0], atol=1e-5)


def test_many_texts_are_windowed(int8, monkeypatch):
    from fakes import echo_embedder

    fake = echo_embedder(int8)  # the windowing is the subject: a session that costs nothing
    seen = []
    original = fake.tokenizer.encode

    def spy(texts, **options):
        seen.append(len(texts))
        return original(texts, **options)

    monkeypatch.setattr(fake.tokenizer, "encode", spy)
    n = 3 * embedder_module.WINDOW + 123  # three full windows and a partial one prove the windowing
    texts = [f"t{i % 10} " + "word " * (i % 13) for i in range(n)]
    out = fake.encode(texts, batch_size=256)
    assert out.shape == (n, 384)
    assert max(seen) == embedder_module.WINDOW and sum(seen) == n
    np.testing.assert_array_equal(out, fake.embed_tokenized(original(texts)))  # every row in its place
    assert (out[12345] == out[12345 % 130]).all() and not (out[1] == out[2]).all()


def test_thread_safe_concurrent_encode(opt):
    texts = [f"concurrent request {i} about topic {i % 7}" for i in range(64)]
    expected = opt.encode(texts)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: opt.encode([texts[i]])[0], range(64)))
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-5)


def test_absent_provider_is_a_clear_error_or_logged_fallback(bundled_artifact, caplog):
    with pytest.raises(ProviderUnavailableError, match="device 'cuda'.*is not available.*onnxruntime-gpu"):
        Embedder.load(bundled_artifact, device="cuda")
    with caplog.at_level(logging.WARNING):
        emb = Embedder.load(bundled_artifact, device="tensorrt", allow_fallback=True)
    assert emb.info.device == "cpu" and "falling back to the CPU" in caplog.text
    with pytest.raises(ValueError, match="device must be one of"):
        Embedder.load(bundled_artifact, device="tpu")


def fastest_passed_cpu_variant(folder) -> str:
    """The fastest passed CPU variant as verify measured it, where a speed within 5% of a faster one
    is a tie that the more faithful, then the engine table's order, wins (`selection.rank_by_speed`,
    tested on its own), among those of the default fidelity tier (`tiers`, tested on their own)."""
    from corom_runtime.artifacts.manifest import Manifest
    from corom_runtime.catalog import DEFAULT_FIDELITY, auto_order
    from corom_runtime.selection import SPEED_TIE
    from corom_runtime.tiers import faithfulness, variant_tiers

    manifest = Manifest.read(folder / "manifest.json")
    labels = {n: variant_tiers(v, manifest.quality.get("stsb_dev_spearman_reference"))
              for n, v in manifest.variants.items()}
    timed = {n: v.speed["texts_per_s"] for n, v in manifest.variants.items()
             if v.passed and n in CPU_VARIANTS and DEFAULT_FIDELITY in labels[n]}
    best = max(timed.values())
    tied = [v.name for v in auto_order("cpu") if v.name in timed and timed[v.name] >= best * (1 - SPEED_TIE)]
    return max(tied, key=lambda n: (faithfulness(labels[n]), -tied.index(n)))


def test_auto_on_cpu_picks_the_fastest_passed_variant_and_info_says_so(bundled_artifact):
    emb = Embedder.load(bundled_artifact)
    spec = VARIANTS[emb.info.variant]
    assert emb.info.variant == fastest_passed_cpu_variant(bundled_artifact)
    assert (emb.info.device, emb.info.engine, emb.info.recipe) == ("cpu", spec.engine, spec.recipe)
    assert emb.info.threads == available_cpus()
    assert emb.info.parity["min_cosine"] >= spec.gate.min_cosine


def test_corrupted_model_file_is_named(tmp_path, bundled_artifact):
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(bundled_artifact, copy)
    with open(copy / "model.int8.onnx", "r+b") as handle:
        handle.seek(5000)
        handle.write(b"\x00" * 16)
    with pytest.raises(ArtifactError, match=r"model\.int8\.onnx does not match its checksum.*corom export"):
        Embedder.load(copy, variant="int8")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is missing"):
        Embedder.load(copy, variant="opt")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON"):
        Embedder.load(copy)
    with pytest.raises(ArtifactError, match="no artifact at"):
        Embedder.load(tmp_path / "missing")


def test_plan_batches_respects_token_budget():
    lengths = [128, 5, 64, 7, 128, 3]
    batches = plan_batches(lengths, batch_size=4, max_tokens=256)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 256 or len(b) == 1


def test_pad_batch_masks_padding():
    from corom_runtime.tokenization import TokenizedText

    ids, mask = pad_batch([TokenizedText([101, 7, 102], False), TokenizedText([101, 102], False)])
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_available_cpus_reads_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path) == min(2, available_cpus(tmp_path / "none"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == available_cpus(tmp_path / "none")


def test_cli_embed_jsonl_and_npy(bundled_artifact, tmp_path, capsys):
    assert corom(["embed", "--model", str(bundled_artifact), "--report", "hello world", "x " * 500]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and len(lines[0]["embedding"]) == 384 and lines[1]["truncated"] is True
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\nthree\n")
    out = tmp_path / "e.npy"
    assert corom(["embed", "--model", str(bundled_artifact), "--file", str(src), "--output", str(out)]) == 0
    assert np.load(out).shape == (3, 384)


def test_cli_info_json_and_help(bundled_artifact, capsys):
    assert corom(["info", "--model", str(bundled_artifact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == fastest_passed_cpu_variant(bundled_artifact) and info["dim"] == 384
    with pytest.raises(SystemExit) as exc:
        corom(["embed", "--help"])
    assert exc.value.code == 0
    assert "--batch-size" in capsys.readouterr().out


OV_VARIANTS = [v for v in CPU_VARIANTS if VARIANTS[v].engine == "openvino"]


@pytest.mark.skipif(not OV_VARIANTS, reason="openvino is not installed: no OpenVINO variant to test")
@pytest.mark.parametrize("variant", OV_VARIANTS)
def test_bad_input_on_the_openvino_path(bundled_artifact, variant, tmp_path):
    from corom_runtime.engines.settings import SessionSettings

    emb = Embedder.load(bundled_artifact, variant=variant, device="cpu",
                        settings=SessionSettings(cache_dir=tmp_path / "cache"))
    assert emb.info.engine == "openvino" and emb.info.providers[0].startswith("OpenVINO:CPU")
    assert emb.encode([]).shape == (0, 384)
    out, report = emb.encode(["", "   ", "x " * 5000, "日本語 😀", "lone \ud800"], return_report=True)
    assert np.isfinite(out).all() and [r.tokens for r in report][:2] == [2, 2] and report[2].truncated
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        emb.encode(["ok", 1])
    # thread-safe: each call takes its own infer request
    texts = [f"parallel {i} " + "word " * (i % 40) for i in range(48)]
    with ThreadPoolExecutor(6) as pool:
        rows = np.stack(list(pool.map(lambda t: emb.encode([t])[0], texts)))
    alone = np.stack([emb.encode([t])[0] for t in texts])
    assert cosines(rows, alone).min() > 0.99999
    # OpenVINO's model cache: the compiled blob is kept, so the next start skips compilation
    assert any((tmp_path / "cache" / "openvino").iterdir())
