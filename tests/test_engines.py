"""The engine table and the pure decisions made from it: no engine, no artifact, no threads."""

from __future__ import annotations

from pathlib import Path

import pytest

from corom_runtime.cli import build_parser
from corom_runtime.shapes import bucket_shapes
from corom_runtime.catalog import DEVICES, ENGINES, VARIANTS, auto_order, device_names, engines_of, variant_names
from corom_runtime.errors import ArtifactError, ProviderUnavailableError
from corom_runtime.artifacts.manifest import VariantEntry
from corom_runtime.engines.openvino import compile_config
from corom_runtime.engines.settings import SessionSettings
from corom_runtime.selection import Machine, choose_device, choose_variant, rank_by_speed, variant_order

ART = Path("/artifacts/m")
CPU = Machine(devices=("cpu",), engines=frozenset({"onnxruntime", "openvino"}), cpu="EPYC", threads=2)


def entry(name: str, passed: bool = True, speed: float | None = None, cpu: str = "EPYC", threads: int = 2) -> VariantEntry:
    e = VariantEntry.for_variant(name, sha256="0" * 64, weights_sha256="1" * 64)
    e.passed = passed
    if speed is not None:
        e.speed = {"texts_per_s": speed, "cpu": cpu, "threads": threads}
    return e


def test_table_is_consistent():
    for spec in VARIANTS.values():
        assert spec.engine in ENGINES, spec
        for device in spec.devices:
            assert device in DEVICES and device in ENGINES[spec.engine].devices, (spec.name, device)
        assert spec.gate.min_cosine > 0.9
        assert spec.gate.batch_invariance > 0, spec.name  # every recipe served today is gated on it
    for device in DEVICES:
        assert engines_of(device), device  # some engine drives every device
    assert engines_of("cpu") == ["onnxruntime", "openvino"] and list(DEVICES)[-1] == "cpu"


def test_cli_choices_come_from_the_table():
    sub = build_parser()._subparsers._group_actions[0].choices
    actions = {a.dest: a for a in sub["info"]._actions}
    assert list(actions["variant"].choices) == ["auto", *variant_names()]
    assert list(actions["device"].choices) == device_names()
    verify = {a.dest: a for a in sub["verify"]._actions}
    assert list(verify["variants"].choices) == variant_names()


def test_auto_order_puts_the_accelerator_recipe_first():
    assert auto_order("tensorrt")[0].name == "fp32"
    assert auto_order("cuda")[0].name == "fp16"
    assert [v.name for v in auto_order("cpu")][:4] == ["ov-int8-fast", "ov-int8", "ov-bf16", "int8"]
    assert all("cpu" in v.devices for v in auto_order("cpu"))


def test_auto_picks_the_fastest_measured_on_this_cpu():
    variants = {"int8": entry("int8", speed=300.0), "ov-int8": entry("ov-int8", speed=250.0),
                "ov-bf16": entry("ov-bf16", speed=170.0), "opt": entry("opt", speed=120.0)}
    assert choose_variant(variants, "auto", "cpu", CPU, ART) == "int8"
    # a measurement from another CPU or thread count does not count: table order decides
    other = {n: entry(n, speed=s, cpu="Xeon") for n, s in (("int8", 300.0), ("ov-bf16", 170.0))}
    assert choose_variant(other, "auto", "cpu", CPU, ART) == "ov-bf16"
    more_threads = Machine(CPU.devices, CPU.engines, "EPYC", threads=16)
    assert choose_variant(variants, "auto", "cpu", more_threads, ART) == "ov-int8"


def test_auto_skips_failed_gates_absent_engines_and_other_devices():
    variants = {"ov-int8": entry("ov-int8", passed=False, speed=900.0), "ov-bf16": entry("ov-bf16", speed=500.0),
                "int8": entry("int8", speed=100.0), "fp16": entry("fp16")}
    assert choose_variant(variants, "auto", "cpu", CPU, ART) == "ov-bf16"
    no_openvino = Machine(("cpu",), frozenset({"onnxruntime"}), "EPYC", 2)
    assert choose_variant(variants, "auto", "cpu", no_openvino, ART) == "int8"
    assert choose_variant(variants, "auto", "cuda", CPU, ART) == "fp16"
    with pytest.raises(ArtifactError, match="no variant of /artifacts/m can run on 'cpu'.*openvino.*not installed"):
        choose_variant({"ov-bf16": entry("ov-bf16")}, "auto", "cpu", no_openvino, ART)
    with pytest.raises(ArtifactError, match="none passed its parity gate"):
        choose_variant({"int8": entry("int8", passed=False)}, "auto", "cpu", CPU, ART)


def test_explicit_variant_is_checked():
    variants = {"int8": entry("int8"), "ov-int8": entry("ov-int8"), "fp16": entry("fp16")}
    assert choose_variant(variants, "ov-int8", "cpu", CPU, ART) == "ov-int8"
    with pytest.raises(ArtifactError, match=r"variant 'opt' is not in /artifacts/m; it has \['fp16', 'int8', 'ov-int8'\]"):
        choose_variant(variants, "opt", "cpu", CPU, ART)
    with pytest.raises(ArtifactError, match=r"built for \['cpu'\], not 'cuda'"):
        choose_variant(variants, "int8", "cuda", CPU, ART)
    no_openvino = Machine(("cpu",), frozenset({"onnxruntime"}), "EPYC", 2)
    with pytest.raises(ProviderUnavailableError, match=r"runs on openvino, which is not installed: pip install 'corom-onnx\[openvino\]'"):
        choose_variant(variants, "ov-int8", "cpu", no_openvino, ART)


def test_choose_device():
    assert choose_device("auto", ("cuda", "cpu")) == "cuda"
    assert choose_device("auto", ("tensorrt", "cuda", "cpu")) == "tensorrt"
    assert choose_device("auto", ("cpu",)) == "cpu"
    assert choose_device("auto", ("cuda", "cpu"), supported=("cpu",)) == "cpu"  # an explicit CPU-only variant
    with pytest.raises(ProviderUnavailableError, match=r"device 'cuda'.*not available.*onnxruntime-gpu"):
        choose_device("cuda", ("cpu",))
    with pytest.raises(ProviderUnavailableError, match=r"device 'gpu'.*corom-onnx\[openvino\]"):
        choose_device("gpu", ("cpu",))
    assert choose_device("tensorrt", ("cpu",), allow_fallback=True) == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        choose_device("tpu", ("cpu",))


def test_openvino_compile_config():
    settings = SessionSettings(threads=3, cache_dir=Path("/c"))
    identity = "ab" * 32
    bf16 = compile_config("cpu", "bf16", settings, ["FP32", "BF16", "INT8"], identity)
    assert bf16["INFERENCE_PRECISION_HINT"] == "bf16" and bf16["INFERENCE_NUM_THREADS"] == 3
    # keyed by the variant's content: OpenVINO's own key (path, size, mtime) ran a stale blob
    assert bf16["NUM_STREAMS"] == 1 and bf16["CACHE_DIR"] == f"/c/openvino/{identity[:32]}"
    assert "CACHE_DIR" not in compile_config("cpu", "bf16", settings, ["FP32"])  # unknown content: no cache
    # bounded (the default 5,000 grew RSS by GBs under unbucketed shapes), and large enough for every
    # shape bucket of a 512-token model at batches up to 64: no hot kernel is evicted
    assert bucket_shapes(512, 64) <= bf16["CPU_RUNTIME_CACHE_CAPACITY"] <= 1024
    # no native bf16 on this CPU: f32, not a slow emulation
    assert compile_config("cpu", "bf16", settings, ["FP32", "INT8"])["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config("cpu", "int8", settings, ["FP32", "INT8"])["INFERENCE_PRECISION_HINT"] == "f32"
    assert "INFERENCE_NUM_THREADS" not in compile_config("gpu", "bf16", settings, ["FP16"])


def test_openvino_gets_a_bounded_onednn_primitive_cache_unless_the_user_set_one():
    """Set before OpenVINO's CPU plugin loads (it reads it once): a server's varying shapes would
    otherwise fill it for many minutes; with shape buckets it holds them all (see engines.openvino)."""
    import os
    import subprocess
    import sys

    code = ("import os; from corom_runtime.engines.openvino import import_openvino; import_openvino(); "
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"})
    assert int(default.stdout.strip()) >= bucket_shapes(512, 64) and chosen.stdout.strip() == "256", \
        default.stderr + chosen.stderr


def test_a_few_percent_of_measurement_noise_does_not_flip_auto():
    # within 5% of each other: a tie, which the more faithful wins (ov-bf16's gate is exact, ov-int8's
    # faithful), whichever is measured faster: a loaded machine cannot flip it either way
    variants = {"ov-int8": entry("ov-int8", speed=520.0), "ov-bf16": entry("ov-bf16", speed=500.0),
                "int8": entry("int8", speed=200.0)}
    assert choose_variant(variants, "auto", "cpu", CPU, ART) == "ov-bf16"
    variants["ov-int8"] = entry("ov-int8", speed=480.0)
    assert choose_variant(variants, "auto", "cpu", CPU, ART) == "ov-bf16"
    variants["ov-int8"] = entry("ov-int8", speed=500.0)
    variants["ov-bf16"] = entry("ov-bf16", speed=560.0)  # clearly faster: it wins
    assert choose_variant(variants, "auto", "cpu", CPU, ART) == "ov-bf16"
    assert variant_order(variants, "auto", "cpu", CPU, ART) == ["ov-bf16", "ov-int8", "int8"]


def test_rank_by_speed_is_the_table_order_with_measured_ties():
    assert rank_by_speed(["a", "b", "c"], {"a": 100.0, "b": 104.9, "c": None}) == ["a", "b", "c"]
    assert rank_by_speed(["a", "b", "c"], {"a": 100.0, "b": 106.0, "c": 300.0}) == ["c", "b", "a"]
    assert rank_by_speed(["a", "b"], {}) == ["a", "b"]


def test_cpu_speeds_do_not_rank_gpu_variants():
    # measured on the CPU (fp32 faster than fp16 there): on CUDA the table's accelerator order decides
    variants = {"opt": entry("opt", speed=900.0), "fp16": entry("fp16", speed=300.0)}
    gpu = Machine(("cuda", "cpu"), frozenset({"onnxruntime"}), "EPYC", 2)
    assert choose_variant(variants, "auto", "cuda", gpu, ART) == "fp16"
    assert choose_variant(variants, "auto", "cpu", gpu, ART) == "opt"


def test_every_cli_default_is_its_settings_default():
    """The CLI's defaults are the settings dataclasses' defaults: one value, not two that can drift."""
    import dataclasses

    from corom_runtime.bulk.local import BulkOptions
    from corom_runtime.serving.batcher import BatcherSettings
    from corom_runtime.bulk.ray_job import RayOptions
    from corom_runtime.serving.app import ServerSettings

    sub = build_parser()._subparsers._group_actions[0].choices
    defaults = {name: {a.dest: a.default for a in parser._actions} for name, parser in sub.items()}

    def field_defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    pairs = [
        ("embed", BulkOptions, {"text_field": "text_field", "id_field": "id_field", "format": "output_format",
                                "shard_size": "shard_size", "batch_size": "batch_size", "prompt_name": "prompt_name"}),
        ("embed", RayOptions, {"address": "address", "actors": "actors", "threads_per_actor": "threads_per_actor"}),
        ("serve", BatcherSettings, {"max_batch_size": "max_batch_size", "max_batch_tokens": "max_batch_tokens",
                                    "max_wait_ms": "max_wait_ms", "max_queue": "max_queue"}),
        ("serve", ServerSettings, {"max_items": "max_items", "max_body_bytes": "max_body_bytes",
                                   "body_timeout": "body_timeout_s", "header_timeout": "header_timeout_s",
                                   "max_connections": "max_connections", "drain_seconds": "drain_s"}),
    ]
    for command, cls, mapping in pairs:
        expected = field_defaults(cls)
        for dest, field in mapping.items():
            assert defaults[command][dest] == expected[field], (command, dest, cls.__name__, field)
