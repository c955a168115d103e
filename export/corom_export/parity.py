"""The parity figures and gates live in the runtime (it judges variants at load too); re-exported here."""

from corom_runtime.parity import Parity, batch_invariance, compare, cosine_rows, scores, top_k, top_k_agreement

__all__ = ["Parity", "batch_invariance", "compare", "cosine_rows", "scores", "top_k", "top_k_agreement"]
