"""Install paths: the lean wheel in a fresh venv (no torch) finds an artifact by preset name in the
user cache and embeds; `[gpu]` resolves to exactly one ONNX Runtime build (pip's resolver report:
no GPU wheel is installed here); no extra pulls torch unless asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pip_report(extras: str, tmp_path: Path) -> set[str]:
    """Names of what `pip install .[extras]` would install into an empty environment (resolved, not installed)."""
    report = tmp_path / f"report-{extras}.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--report", str(report), f"{ROOT}[{extras}]"], check=True, capture_output=True, text=True)
    return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("extras, present, absent", [
    ("gpu", {"onnxruntime-gpu"}, {"onnxruntime", "torch"}),
    ("cpu", {"onnxruntime"}, {"onnxruntime-gpu", "torch"}),
    ("openvino", {"openvino"}, {"onnxruntime", "onnxruntime-gpu", "torch"}),
])
def test_each_engine_extra_resolves_to_one_build_and_no_torch(extras, present, absent, tmp_path):
    names = pip_report(extras, tmp_path)
    assert present <= names, names
    assert not (absent & names), names & absent


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv with the built wheel and its `[cpu]` extra: numpy, tokenizers, onnxruntime; no torch."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next((tmp / "dist").glob("corom_onnx-*.whl"))
    venv.create(tmp / "venv", with_pip=True)
    python = tmp / "venv" / "bin" / "python"
    out = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[cpu]"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return python


def test_wheel_in_a_fresh_venv_loads_a_preset_from_the_cache_and_embeds(fresh_venv, bundled_artifact, tmp_path):
    cache = tmp_path / "cache"
    (cache / "artifacts").mkdir(parents=True)
    (cache / "artifacts" / "all-minilm-l6-v2").symlink_to(bundled_artifact)
    code = """
import sys
from corom_runtime import Embedder
e = Embedder.load("all-minilm-l6-v2")
print("SHAPE", e.encode(["installed like a library"]).shape, e.variant)
print("FROM", Embedder.__module__, sys.modules["corom_runtime"].__file__)
print("HEAVY", sorted(m for m in ("torch", "transformers", "optimum") if m in sys.modules))
try:
    Embedder.load("e5-small-v2")
except Exception as exc:
    print("MISSING", exc)
"""
    env = {**os.environ, "COROM_CACHE_DIR": str(cache)}
    out = subprocess.run([str(fresh_venv), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    # no OpenVINO in this venv: auto takes the fastest ONNX Runtime variant measured on this CPU
    manifest = json.loads((bundled_artifact / "manifest.json").read_text())
    ort = {n: e for n, e in manifest["variants"].items() if e["engine"] == "onnxruntime" and e["passed"]}
    fastest = max(ort, key=lambda n: ort[n]["speed"]["texts_per_s"])
    picked = out.stdout.split("SHAPE (1, 384) ")[1].split()[0]
    assert picked in ort and ort[picked]["speed"]["texts_per_s"] >= 0.95 * ort[fastest]["speed"]["texts_per_s"]
    assert "site-packages" in out.stdout and "HEAVY []" in out.stdout
    assert "run `corom export e5-small-v2`" in out.stdout  # no exporter here: the one command to run
    listing = subprocess.run([str(fresh_venv), "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    installed = {p["name"].lower() for p in json.loads(listing.stdout)}
    assert "onnxruntime" in installed and not installed & {"torch", "transformers", "optimum", "onnxruntime-gpu"}
    presets = subprocess.run([str(fresh_venv.parent / "corom"), "presets", "--json"], capture_output=True, text=True,
                             cwd=tmp_path, env=env)
    rows = {r["name"]: r for r in json.loads(presets.stdout)}
    assert rows["all-minilm-l6-v2"]["exported"] and rows["e5-small-v2"]["prompts"]["query"] == "query: "


def test_lean_install_without_an_engine_says_which_extra_to_add(fresh_venv, bundled_artifact):
    code = f"""
import sys
sys.modules["onnxruntime"] = None; sys.modules["openvino"] = None   # as if no engine extra were installed
from corom_runtime import Embedder
try:
    Embedder.load({str(bundled_artifact)!r})
except Exception as exc:
    print("ERROR", exc)
"""
    out = subprocess.run([str(fresh_venv), "-c", code], capture_output=True, text=True)
    assert "pip install 'corom-onnx[cpu]'" in out.stdout, out.stdout + out.stderr
