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


def _runtime_imports() -> dict[str, set[str]]:
    """Every runtime module's imports (lazy ones inside functions included), as module names."""
    import ast

    package = ROOT / "runtime" / "corom_runtime"
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                    module = f"{anchor}.{node.module}" if node.module else anchor
                    deps |= {module} if node.module else {f"{anchor}.{a.name}" for a in node.names}
                else:
                    deps.add(node.module or "")
        graph[name] = deps
    return graph


def test_the_runtime_never_names_the_exporter():
    """Export on first use and `corom export` reach the exporter through its entry point only."""
    for module, deps in _runtime_imports().items():
        assert not any(d.split(".")[0] == "corom_export" for d in deps), (module, deps)
    for path in (ROOT / "runtime" / "corom_runtime").rglob("*.py"):
        code = [line for line in path.read_text().splitlines() if not line.strip().startswith("#")]
        assert not any("import" in line and "corom_export" in line for line in code), path.name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["corom_onnx.exporter"] == {"corom_export": "corom_export.hooks"}


def test_runtime_modules_import_each_other_without_cycles():
    graph = {m: {d for d in deps if d.startswith("corom_runtime")} for m, deps in _runtime_imports().items()}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if dep == "corom_runtime":  # the package's re-exports, imported by users, not by modules
                continue
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) >= 20


def test_public_imports_work_the_old_way_and_the_new_way():
    """The paths the README and earlier releases show resolve to the same objects as the new layout."""
    import corom_runtime
    from corom_runtime import bulk, catalog, dynamic_batcher, engines, ray_bulk
    from corom_runtime.bulk import local, ray_job
    from corom_runtime.serving import batcher

    assert engines.VARIANTS is catalog.VARIANTS and engines.gate_of is catalog.gate_of
    assert bulk.embed_corpus is local.embed_corpus and bulk.BulkOptions is local.BulkOptions
    assert dynamic_batcher.DynamicBatcher is batcher.DynamicBatcher is corom_runtime.DynamicBatcher
    assert ray_bulk.embed_dataset is ray_job.embed_dataset and ray_bulk.run_ray is ray_job.run_ray
    # the shims re-export and define nothing of their own
    for shim in (dynamic_batcher, ray_bulk, engines, bulk):
        own = [n for n, v in vars(shim).items() if not n.startswith("_") and getattr(v, "__module__", None) == shim.__name__]
        assert not own, (shim.__name__, own)
