"""Where earlier releases had the Ray Data job; it lives in `corom_runtime.bulk.ray_job`."""

from corom_runtime.bulk.ray_job import RayOptions, block_rows, embed_dataset, run_ray

__all__ = ["RayOptions", "block_rows", "embed_dataset", "run_ray"]
