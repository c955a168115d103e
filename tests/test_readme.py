"""Every README example runs as written: its bash and python blocks, in order, from a folder laid out
like the repository root (`examples/` and `models/build/all-minilm-l6-v2` -> the session artifact; the
user cache holds the preset), against one `corom serve` started here (`localhost:8080` in the README
is this server's port). Python blocks share one namespace, as a reader's session would; each bash
block runs in one bash process, with curl failing on an HTTP error. A block that cannot run here is
marked `<!-- not run: why -->` on the line before it; `test_blocks_not_run_say_why` lists them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.served import start_server

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?:<!-- not run: (?P<why>[^\n]*?) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)^```$",
                   re.M | re.S)
# what makes a block impossible here: a marked block must show one of these, so none is skipped lazily
CANNOT_RUN = ("make ", "corom export", "corom verify", "corom serve", "--engine ray", "benchmarks")
# curl answers an HTTP error with exit 0 unless told: a 415 must fail the block
BASH_PROLOGUE = 'curl() { command curl --fail-with-body --show-error "$@"; }\n'


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """The top-level ```bash and ```python blocks, with their line and `not run` reason if marked."""
    return [Block(text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["code"], m["why"])
            for m in FENCE.finditer(text)]


BLOCKS = readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
RUN = [b for b in BLOCKS if b.not_run is None]


def test_readme_blocks_are_found():
    assert len(RUN) >= 8 and {b.lang for b in RUN} == {"bash", "python"}
    assert readme_blocks("<!-- not run: x -->\n```bash\nmake y\n```\n```python\nz = 1\n```\n") == [
        Block(2, "bash", "make y\n", "x"), Block(5, "python", "z = 1\n", None)]


def test_blocks_not_run_say_why(capsys):
    skipped = [b for b in BLOCKS if b.not_run is not None]
    with capsys.disabled():
        print("\nREADME blocks not run here:\n" + "\n".join(f"  {b.id}: {b.not_run}" for b in skipped))
    for block in skipped:
        assert block.not_run.strip() and any(k in block.code for k in CANNOT_RUN), \
            f"{block.id} is marked not run ({block.not_run!r}) but does nothing that cannot run here"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Session:
    folder: Path
    env: dict[str, str]
    port: int
    namespace: dict


@pytest.fixture(scope="module")
def session(bundled_artifact, tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "examples").symlink_to(ROOT / "examples")
    (folder / "models" / "build").mkdir(parents=True)
    (folder / "models" / "build" / "all-minilm-l6-v2").symlink_to(bundled_artifact)
    cache = folder / "cache"
    (cache / "artifacts").mkdir(parents=True)
    (cache / "artifacts" / "all-minilm-l6-v2").symlink_to(bundled_artifact)  # `-m all-minilm-l6-v2`
    os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # the client examples: no telemetry calls
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    env = {**os.environ, "COROM_CACHE_DIR": str(cache),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    saved = os.environ.get("COROM_CACHE_DIR")
    os.environ["COROM_CACHE_DIR"] = str(cache)  # for the python blocks, run in this process
    proc, _ = start_server(["--model", str(bundled_artifact)], port)
    try:
        assert proc.poll() is None, f"corom serve exited with {proc.returncode}"
        yield Session(folder, env, port, {"__name__": "readme"})
    finally:
        proc.terminate()
        proc.wait(30)
        if saved is None:
            os.environ.pop("COROM_CACHE_DIR", None)
        else:
            os.environ["COROM_CACHE_DIR"] = saved


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_block_runs(block: Block, session: Session, monkeypatch):
    code = block.code.replace("localhost:8080", f"localhost:{session.port}")
    if block.lang == "python":
        monkeypatch.chdir(session.folder)
        exec(compile(code, block.id, "exec"), session.namespace)  # noqa: S102 - the README's own code
        return
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", BASH_PROLOGUE + code], cwd=session.folder,
                            env=session.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{block.id} failed ({result.returncode}):\n{code}\n{result.stdout}\n{result.stderr}"


README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_comment(code_prefix: str) -> str:
    """The `# ...` comment README prints beside the line that starts with `code_prefix`."""
    line = next(ln for ln in README.splitlines() if ln.startswith(code_prefix))
    return line.split("#", 1)[1].strip()


def test_long_text_examples_show_what_they_claim(bundled_artifact):
    """The long-text blocks run without printing anything: a long.txt that fits the window makes them
    pass while showing nothing (it did at 215 tokens once the default's window became 256). Check that
    it is over the window, that each option it shows changes something, and that README's printed
    values are what the code returns."""
    from corom_runtime import Embedder
    from corom_runtime.errors import TextTooLongError

    emb = Embedder.load(str(bundled_artifact))
    long_text = (ROOT / "examples" / "long.txt").read_text(encoding="utf-8")
    assert readme_comment("emb.get_sentence_embedding_dimension(), emb.max_seq_length").startswith(
        str((emb.get_sentence_embedding_dimension(), emb.max_seq_length)))
    with pytest.raises(TextTooLongError) as exc:
        emb.encode([long_text], truncate=False)
    tokens = int(re.search(r"has (\d+) tokens", str(exc.value))[1])
    assert readme_comment('long_text = open("examples/long.txt")').startswith(
        f"{tokens} tokens: over the model's {emb.max_seq_length}")
    plain = emb.encode([long_text])[0]
    assert float(plain @ emb.encode([long_text], truncation_direction="left")[0]) < 0.99
    assert float(plain @ emb.encode([long_text, "a short text"], chunking="mean")[0]) < 0.99
    spans = [c.spans for c in emb.encode_chunks([long_text])]
    assert len(spans[0]) >= 3 and readme_comment("[c.spans for c in emb.encode_chunks").startswith(str(spans))


@pytest.mark.parametrize("package", ["corom_runtime", "corom_export"])
def test_docstring_examples_run_as_written(package):
    # the examples in the public docstrings are documentation too: one went stale when the tiers began
    # to nest (`tiers_of` said ('faithful',)), unnoticed, because nothing ran them
    import doctest
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    failed, tried = [], 0
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        result = doctest.testmod(importlib.import_module(info.name), optionflags=doctest.ELLIPSIS, report=False)
        tried += result.attempted
        if result.failed:
            failed.append(f"{info.name}: {result.failed} of {result.attempted}")
    assert tried > 20 if package == "corom_runtime" else tried > 0
    assert not failed, f"docstring examples that do not run as written: {failed} (pytest --doctest-modules shows them)"
