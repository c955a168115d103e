"""The parity figures and gates live in the runtime (it judges variants at load too); re-exported here."""

from corom_runtime.parity import Parity, batch_invariance, compare, cosine_rows, top_k

__all__ = ["Parity", "batch_invariance", "compare", "cosine_rows", "top_k"]
