"""The runtime never needs torch, transformers or optimum: proven on a real embedding."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum")


def test_embedding_loads_no_heavy_module(bundled_artifact):
    code = f"""
import sys
from corom_runtime import Embedder
e = Embedder.load({str(bundled_artifact)!r}, device="cpu")
v = e.encode(["a lean runtime"])
assert v.shape == (1, 384)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print("HEAVY:", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY: []" in out.stdout, out.stdout + out.stderr


def test_runtime_install_requires_no_heavy_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert not dep.lower().startswith(HEAVY), dep


def test_runtime_sources_import_no_heavy_package():
    for path in (ROOT / "runtime" / "corom_runtime").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                module = stripped.split()[1].split(".")[0]
                assert module not in HEAVY, f"{path.name}: {stripped}"


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_openvino_absent_keeps_the_onnxruntime_path_working(bundled_artifact):
    out = _run(f"""
import sys
sys.modules["openvino"] = None  # as if the extra were not installed: `import openvino` fails
from corom_runtime import Embedder, ProviderUnavailableError
e = Embedder.load({str(bundled_artifact)!r})
print("AUTO:", e.info.engine, e.info.variant, e.encode(["still works"]).shape)
try:
    Embedder.load({str(bundled_artifact)!r}, variant="ov-bf16")
except ProviderUnavailableError as exc:
    print("ERROR:", exc)
""")
    assert "AUTO: onnxruntime" in out and "(1, 384)" in out, out
    assert "ERROR: variant 'ov-bf16' runs on openvino, which is not installed: pip install 'corom-onnx[openvino]'" in out


def test_openvino_is_imported_only_when_used(bundled_artifact):
    out = _run(f"""
import sys
from corom_runtime import Embedder
Embedder.load({str(bundled_artifact)!r}, variant="int8").encode(["x"])
print("OV:", sorted(m for m in sys.modules if m.split(".")[0] in ("openvino", "nncf")))
""")
    assert "OV: []" in out, out
