"""`corom export`: checkpoint -> artifact folder with the fp32, opt, fp16 and int8 variants."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
from onnxruntime.transformers.onnx_model import OnnxModel

from corom_runtime.artifacts.artifact import sha256_file
from corom_runtime.artifacts.cache import cache_lock
from corom_runtime.cpu_check import CHECK_FILE
from corom_runtime.shaping import QUANTIZATION_FILE
from corom_runtime.artifacts.manifest import MANIFEST, Manifest
from corom_runtime.catalog import INT8_RECIPES, VARIANTS
from corom_runtime.errors import CoromError, PresetError
from corom_runtime.artifacts.presets import Preset, find_preset, list_presets, load_preset

from . import graph, int8, optimize
from .manifest import add_variant, new_manifest
from .reference import build_reference
from .sources import SOURCE_PREFIXES, Checkpoint, resolve
from .tokenizer import build_tokenizer

log = logging.getLogger(__name__)

FILES = {name: spec.file for name, spec in VARIANTS.items()}


@dataclass(frozen=True)
class ExportOptions:
    pooling: str | None = None  # None: the preset's, else what the checkpoint declares, else cls
    normalize: bool | None = None
    score: str | None = None
    max_length: int | None = None
    int8_recipe: str = INT8_RECIPES[0]
    int8_static: bool = False
    openvino: bool = True  # the OpenVINO variants, when openvino and nncf are installed
    force: bool = False
    preset: str | None = None  # a checkpoint folder exported with this preset's settings (and prompts)
    # which of the table's variants the artifact holds (None: all); fp16's and ov-int8-fast's steps are
    # skipped when not wanted, any other unwanted variant is left out of the manifest and folder
    variants: tuple[str, ...] | None = None
    # how many calibration-corpus texts NNCF calibrates the OpenVINO int8 variants on (None: all 925):
    # fewer export faster and move the int8 variants' figures (the gates judge them either way)
    calibration_texts: int | None = None

    def __post_init__(self) -> None:
        n = self.calibration_texts
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"calibration_texts must be a positive number of texts (None: the whole calibration "
                             f"corpus), got {n!r}")

    def wants(self, name: str) -> bool:
        return self.variants is None or name in self.variants


def settings_for(model: str, options: ExportOptions) -> tuple[Preset, str | None, Checkpoint]:
    """Preset (with the options applied), preset name (None for a folder without --preset) and checkpoint."""
    known = find_preset(model)
    if known:
        preset, name = load_preset(known), known
        checkpoint = resolve(preset.source)
    elif Path(model).exists() or "/" in model or model.startswith(SOURCE_PREFIXES):
        checkpoint = resolve(model)
        table = position_limit(checkpoint.config, checkpoint.family)
        within_table(options.max_length, table, checkpoint)  # before a Preset refuses it less clearly
        if options.preset:  # a preset's model, downloaded elsewhere: its settings, this folder's weights
            preset, name = load_preset(options.preset), find_preset(options.preset)
            preset = Preset(**{**preset.to_dict(), "source": model})
        else:
            name = None
            pooling, normalize = checkpoint.pooling_hint() or ("cls", False)
            preset = Preset(name=checkpoint.folder.name, source=model, pooling=pooling, normalize=normalize,
                            score="cosine" if normalize else "dot",
                            # --max-length, else the folder's own max_seq_length (sentence_bert_config.json), as
                            # sentence-transformers cuts, else 128 or the position table where that is shorter
                            # (less the pad id and 1 where positions start after it: RoBERTa, XLM-R)
                            max_length=options.max_length or checkpoint.max_seq_length() or min(128, table or 512),
                            prompts=checkpoint.prompts(), max_length_limit=table or 512)
    else:
        raise PresetError(f"unknown preset {model!r}; known presets: {', '.join(list_presets())}. "
                          "Pass one of them, or a checkpoint folder.")
    overrides = {k: v for k, v in (("pooling", options.pooling), ("normalize", options.normalize),
                                   ("score", options.score), ("max_length", options.max_length)) if v is not None}
    if overrides:
        preset = Preset(**{**preset.to_dict(), **overrides})
    within_table(preset.max_length, position_limit(checkpoint.config, checkpoint.family), checkpoint)
    return preset, name, checkpoint


def within_table(max_length: int | None, limit: int | None, checkpoint: Checkpoint) -> None:
    """Refuse a window longer than the checkpoint's position table holds (`position_limit`)."""
    if limit is not None and max_length is not None and max_length > limit:
        raise CoromError(f"--max-length {max_length} is more than this {checkpoint.family.name} checkpoint's "
                         f"position table holds: at most {limit} tokens (config.json max_position_embeddings"
                         f"{' less the pad id and 1: positions start after the pad id' if checkpoint.family.positions_after_pad else ''})")


def position_limit(config: dict, family) -> int | None:
    """The longest input the checkpoint's position table holds (None: the config does not say). Pure."""
    table = config.get("max_position_embeddings")
    if not isinstance(table, int):
        return None
    return table - family.pad_id(config) - 1 if family.positions_after_pad else table


def _step(n: int, total: int, text: str) -> float:
    log.info("[%d/%d] %s", n, total, text)
    print(f"[{n}/{total}] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


# `verify(work) -> accept`: run on the finished artifact in its work folder, before the swap
Verifier = Callable[[Path], bool]


def export_artifact(model: str, out: Path, options: ExportOptions = ExportOptions(),
                    verify: Verifier | None = None) -> Path | None:
    """Export every variant into a new folder beside `out`, verify it there (`verify`, if given), then
    swap it in atomically: until the swap, an artifact already at `out` is untouched and keeps
    serving; an interrupted export or verification leaves it as it was.

    `verify(work)` returns whether the new artifact may replace an existing one (`corom export`: some
    variant passed its gate). Returns `out`, or None when `verify` refused and the old artifact was
    kept. Without `verify` the variants are not marked passed: run `verify_artifact` afterwards.
    """
    out = Path(out)
    if out.is_symlink():  # replace what the link points to, and keep the link
        out = out.resolve()
    if options.int8_static and options.int8_recipe in ("nbits8", "smooth"):
        raise CoromError(f"--int8-static calibrates activation ranges; the {options.int8_recipe!r} recipe has none "
                         "(use --int8-recipe attention, no-ffn-out or full with it)")
    unknown = sorted(set(options.variants or ()) - set(VARIANTS))
    if unknown:
        raise CoromError(f"unknown variant(s) {unknown}: the variants are {list(VARIANTS)}")
    if out.exists() and not options.force:
        raise CoromError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.exists():
        check_replaceable(out)
    preset, preset_name, checkpoint = settings_for(model, options)
    with_openvino = options.openvino and _openvino_exporter_installed()
    total = 7 if with_openvino else 6
    _step(1, total, f"loading {checkpoint.source} ({checkpoint.layout} layout)")
    encoder = build_reference(checkpoint, preset.pooling, preset.normalize)
    config = checkpoint.config
    family = checkpoint.family
    pad_id = family.pad_id(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = new_work_folder(out)
    try:
        tokenizer = build_tokenizer(checkpoint, preset.max_length)
        tokenizer.save(str(work / "tokenizer.json"))
        manifest = new_manifest(
            name=preset.name, source=preset.source if preset_name else str(checkpoint.folder.resolve()),
            preset=preset_name, config=config, family=family, pooling=preset.pooling, normalize=preset.normalize,
            score=preset.score, max_length=preset.max_length, lowercase=checkpoint.do_lower_case,
            tokenizer=tokenizer, tokenizer_sha256=sha256_file(work / "tokenizer.json"), prompts=preset.prompts,
            extra={"int8_recipe": options.int8_recipe, "int8_static": options.int8_static,
                   "checkpoint_layout": checkpoint.layout,
                   "head": checkpoint.head().to_dict() if checkpoint.head() else None},
        )
        manifest.embedding_dim = encoder.dim  # a folder's Dense layers set the width, not the encoder's

        t = _step(2, total, f"exporting the plain fp32 graph ({family.name}; pooling inside, dynamic axes)")
        trace_ids = tokenizer.encode("a short text to trace the export with").ids
        graph.export_plain(encoder, work / FILES["fp32"], *graph.dummy_batch(trace_ids, pad_id))
        manifest.inputs = graph.input_names(work / FILES["fp32"])
        add_variant(manifest, work, "fp32")
        log.info("fp32 export took %.1fs", time.perf_counter() - t)

        _step(3, total, "fusing for ONNX Runtime (Attention, SkipLayerNorm, BiasGelu)")
        sizes = family.sizes(config)
        fused = optimize.fuse(work / FILES["fp32"], sizes["heads"], sizes["hidden"], sizes["layers"],
                              family.optimizer_type)
        manifest.export["fusions"] = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        fused.save_model_to_file(str(work / FILES["opt"]))
        add_variant(manifest, work, "opt")

        _step(4, total, "converting to fp16 (LayerNorm, Softmax and pooling kept fp32)")
        if options.wants("fp16"):
            optimize.write_fp16(OnnxModel(onnx.load(str(work / FILES["opt"]))), work / FILES["fp16"])
            add_variant(manifest, work, "fp16")

        recipe = "static, calibrated" if options.int8_static else "8-bit weight blocks, per-token activations" \
            if options.int8_recipe == "nbits8" else "dynamic"
        _step(5, total, f"quantizing to int8 ({recipe}, recipe {options.int8_recipe!r})")
        calibration = None
        if options.int8_static or options.int8_recipe == "smooth":
            calibration = list(_calibration_batches(work / "tokenizer.json", preset.max_length, pad_id))
        if options.int8_static:
            kept = int8.write_int8_static(work / FILES["fp32"], work / FILES["int8"], calibration, options.int8_recipe,
                                          sizes["hidden"], sizes["intermediate"])
        else:
            kept = int8.write_int8_dynamic(work / FILES["opt"], work / FILES["int8"], options.int8_recipe,
                                           sizes["hidden"], sizes["intermediate"], calibration)
        if options.int8_recipe not in ("full", "nbits8") and not kept:
            raise CoromError(f"the int8 recipe {options.int8_recipe!r} keeps the FFN MatMuls in float, but none was "
                             f"found in this {family.name} graph: refusing to quantize everything silently; "
                             "use --int8-recipe full to do that on purpose")
        manifest.export["int8_kept_fp32"] = kept
        add_variant(manifest, work, "int8")

        if with_openvino:
            from . import openvino_int8

            _step(6, total, "OpenVINO: static int8 with NNCF, calibrated on the calibration corpus (and bf16 on the plain graph)")
            ov_calibration = openvino_int8.calibration_inputs(work / "tokenizer.json", preset.max_length,
                                                              options.calibration_texts, pad_id=pad_id)
            manifest.export["openvino_int8"] = openvino_int8.write_ov_int8(
                work / FILES["fp32"], work / FILES["ov-int8"], ov_calibration, sizes["hidden"], sizes["intermediate"])
            add_variant(manifest, work, "ov-int8")
            add_variant(manifest, work, "ov-bf16")
            if options.wants("ov-int8-fast"):  # the fast tier's recipe: every weight MatMul int8
                manifest.export["openvino_int8_fast"] = openvino_int8.write_ov_int8(
                    work / FILES["fp32"], work / FILES["ov-int8-fast"], ov_calibration, sizes["hidden"],
                    sizes["intermediate"], recipe="full")
                add_variant(manifest, work, "ov-int8-fast")

        for name in [n for n in manifest.variants if not options.wants(n)]:
            entry = manifest.variants.pop(name)
            if all(entry.file != other.file for other in manifest.variants.values()):
                for file, _ in entry.files():
                    (work / file).unlink(missing_ok=True)
        manifest.write(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return install(work, out, options.force, verify, step=lambda: _step(total, total, f"writing the artifact to {out}"))


def install(work: Path, out: Path, force: bool, verify: Verifier | None = None,
            step: Callable[[], object] = lambda: None) -> Path | None:
    """Verify the finished artifact in `work` (beside `out`), then swap it into `out`. Until the swap an
    artifact at `out` is untouched; on any error or interruption `work` is removed and `out` is as it
    was. Returns `out`, or None when `verify` refused and an existing artifact was kept."""
    if out.is_symlink():  # replace what the link points to, and keep the link (renaming the link aside
        out = out.resolve()  # would leave a link that rmtree refuses, and the new artifact unverified)
    try:
        if verify is not None:
            print(f"verifying the new artifact beside {out} (an artifact there keeps serving until it passes)",
                  file=sys.stderr, flush=True)
            if not verify(work) and out.exists():
                print(f"no variant of the new export passed its gate: kept the artifact at {out} as it was "
                      "(the new one is discarded)", file=sys.stderr, flush=True)
                shutil.rmtree(work)
                return None
        step()
        # two exports to one --out: the later swap finds the earlier one's result, judged again here
        with _swap_lock(out):
            if out.exists() and not force:
                raise CoromError(f"{out} appeared while exporting (another export?); pass --force to replace "
                                 "it, or choose another --out")
            if out.exists():
                check_replaceable(out)
            swap_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def new_work_folder(out: Path) -> Path:
    """An empty folder beside `out`, created with the umask's mode (mkdtemp's 0700 would be kept by
    the rename and lock other users out of the artifact)."""
    while True:
        work = out.parent / f".{out.name}.new-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            work.mkdir()
            return work
        except FileExistsError:
            continue


def _swap_lock(out: Path):
    import hashlib

    return cache_lock("swap-" + hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16], timeout=600)


def check_replaceable(out: Path) -> None:
    """`--force` replaces only an artifact corom wrote, holding nothing else: its manifest names every
    file in it. Anything else is refused before any work is done."""
    if not out.is_dir():
        raise CoromError(f"--out {out} is a file, not an artifact folder; choose another --out")
    present = {p.name for p in out.iterdir()}
    if not present:
        return
    if MANIFEST not in present:
        raise CoromError(f"{out} is not empty and holds no {MANIFEST}: it was not written by `corom export`, so "
                         "--force will not replace it; choose another --out (or empty it yourself)")
    try:
        ours = artifact_files(Manifest.read(out / MANIFEST))
    except CoromError:  # a damaged manifest still marks corom's folder: its usual files only
        ours = {MANIFEST, "tokenizer.json", CHECK_FILE, QUANTIZATION_FILE, *FILES.values(), *(f.replace(".xml", ".bin") for f in FILES.values())}
    # what an interrupted `corom verify` may leave: content-addressed files not yet (or no longer)
    # named by the manifest, and its temporary files
    foreign = sorted(n for n in present - ours if not _LEFTOVER.fullmatch(n))
    if foreign:
        raise CoromError(f"{out} holds files `corom export` did not write ({', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}): --force will not delete them; move them, or "
                         "choose another --out")


_LEFTOVER = re.compile(r"(check|quantization)\.[0-9a-f]{16}\.npz|\.(check|quantization)\.\d+\.\d+\.tmp|"
                       r"manifest\.json(\.\d+)?\.tmp")


def artifact_files(manifest: Manifest) -> set[str]:
    names = {MANIFEST, manifest.tokenizer.file}
    for entry in manifest.variants.values():
        names |= {relative for relative, _ in entry.files()}
    for extra in (manifest.check, manifest.quantization):
        if extra:
            names.add(extra["file"])
    return names


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2 flags (Linux)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux's renameat2; False where it is not available (other systems, old libc, some file
    systems), so the caller falls back to plain renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if call(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def swap_into_place(work: Path, out: Path) -> None:
    """Move the finished artifact to `out`. An existing one is exchanged with it in one step (Linux
    renameat2; elsewhere renamed aside first) and removed after the new one is in place, so a reader
    never sees a half-deleted folder (a server that opened the old files keeps reading them: on POSIX
    they live until closed)."""
    if not out.exists():
        if not _renameat2(work, out, _RENAME_NOREPLACE):
            if out.exists():
                raise FileExistsError(errno.EEXIST, "appeared while exporting", str(out))
            work.rename(out)
        return
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
    if _renameat2(work, out, _RENAME_EXCHANGE):
        work.rename(old)  # `work` now holds the old artifact
    else:
        out.rename(old)
        work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _openvino_exporter_installed() -> bool:
    import importlib.util

    missing = [m for m in ("openvino", "nncf") if importlib.util.find_spec(m) is None]
    if missing:
        log.warning("skipping the OpenVINO variants: %s not installed (pip install 'corom-onnx[openvino]')",
                    " and ".join(missing))
    return not missing


def _calibration_batches(tokenizer_file: Path, max_length: int, pad_id: int, n: int = 272, batch: int = 16):
    """Batches of the calibration corpus (never evaluated), padded to max_length: the histogram
    calibrators need every batch to have one shape."""
    import numpy as np

    from corom_runtime.batching import pad_batch, plan_batches
    from corom_runtime.tokenization import TextTokenizer

    from .corpus import calibration_texts

    items = TextTokenizer.from_file(tokenizer_file, max_length).encode(calibration_texts(n))
    for idx in plan_batches([i.length for i in items], batch):
        if len(idx) < batch:
            continue
        ids, mask = pad_batch([items[i] for i in idx], pad_id)
        width = ((0, 0), (0, max_length - ids.shape[1]))
        yield np.pad(ids, width, constant_values=pad_id), np.pad(mask, width)
