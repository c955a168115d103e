"""Corpus jobs: reading and writing corpora (`corpus_io`), the single-machine job with resume (`local`)
and the Ray Data job (`ray_job`, the `[ray]` extra).

`corom_runtime.bulk.embed_corpus` and `BulkOptions` are re-exported here, where earlier releases had them.
"""

from corom_runtime.bulk.local import BulkOptions, BulkSummary, embed_corpus

__all__ = ["BulkOptions", "BulkSummary", "embed_corpus"]
