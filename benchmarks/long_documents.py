"""Long documents: does chunking find what truncation cuts off? Known-item retrieval, measured.

`python -m benchmarks.long_documents` takes every passage of the fixed parity corpus longer than the
model's window (real prose: the standard library's documentation, plus the longest of the other
kinds), makes one query per document from its text *past* the window (a sentence-sized span of ~16
words from its second half), embeds the documents truncated (the default) and chunked
(`chunking="mean"`), and reports recall@1, recall@10 and MRR of each query finding its own document
among all of them. Writes `long-documents-STAMP.json` and `latest-long-documents.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .run import RESULTS


def known_items(embedder, min_tokens: int, words: int = 16) -> tuple[list[str], list[str]]:
    """(documents, queries): documents over `min_tokens` tokens; each query a span of its second half."""
    from corom_export.corpus import parity_corpus

    passages = parity_corpus(n_queries=1, n_passages=2000).passages
    lengths = embedder.tokenizer.token_counts(passages)
    documents = [p for p, n in zip(passages, lengths) if n > min_tokens and len(p.split()) >= 3 * words]
    queries = []
    for doc in documents:
        tail = doc.split()[len(doc.split()) // 2:]
        middle = max(0, len(tail) // 2 - words // 2)
        queries.append(" ".join(tail[middle:middle + words]))
    return documents, queries


def retrieval(queries: np.ndarray, documents: np.ndarray) -> dict:
    scores = queries @ documents.T
    rank = (scores > scores[np.arange(len(queries)), np.arange(len(queries))][:, None]).sum(1)
    return {"recall@1": float((rank == 0).mean()), "recall@10": float((rank < 10).mean()),
            "mrr": float((1.0 / (rank + 1)).mean())}


def main(argv: list[str] | None = None) -> int:
    from corom_runtime import Embedder
    from corom_runtime.artifacts.cache import build_dir

    from . import hardware
    from .served import write_result

    p = argparse.ArgumentParser(prog="python -m benchmarks.long_documents", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default=str(build_dir("all-minilm-l6-v2")), help="corom artifact (default: make demo's)")
    p.add_argument("--variant", default="auto", help="variant (default auto)")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by neighbouring windows (default 32)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    emb = Embedder.load(args.artifact, variant=args.variant, device="cpu")
    documents, queries = known_items(emb, emb.artifact.max_length)
    q = emb.encode(queries, normalize_embeddings=True)
    truncated = emb.encode(documents, normalize_embeddings=True)
    chunked = emb.encode(documents, normalize_embeddings=True, chunking={"overlap": args.overlap})
    tokens = emb.tokenizer.token_counts(documents)
    result = {"hardware": hardware.describe(emb.info.threads), "variant": emb.variant, "documents": len(documents),
              "mean_tokens": float(np.mean(tokens)), "max_tokens": int(max(tokens)), "overlap": args.overlap,
              "truncation": retrieval(q, truncated), "chunking_mean": retrieval(q, chunked)}
    write_result(Path(args.out), "long-documents", result, report(result, emb.artifact.max_length))
    return 0


def report(result: dict, window: int) -> str:
    rows = [("truncated (default)", result["truncation"]),
            (f'chunking="mean" (overlap {result["overlap"]})', result["chunking_mean"])]
    lines = [f"Known-item retrieval on {result['documents']} documents past the {window}-token window (mean "
             f"{result['mean_tokens']:.0f} tokens, max {result['max_tokens']}), queries from past the window; "
             f"{result['variant']}, {result['hardware']['cpu']}:", "",
             "| documents embedded | recall@1 | recall@10 | MRR |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['mrr']:.3f} |" for name, r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
