"""Where earlier releases had the dynamic batcher; it lives in `corom_runtime.serving.batcher`."""

from corom_runtime.serving.batcher import BatcherSettings, DynamicBatcher, RequestTimings, Ticket

__all__ = ["BatcherSettings", "DynamicBatcher", "RequestTimings", "Ticket"]
