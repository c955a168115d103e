"""Minimal thread-safe counters and histograms, rendered in Prometheus' text format.

Enough for `/metrics` without pulling a metrics framework into the lean runtime.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Callable

TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = TIME_BUCKETS
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.total}", f"{self.name}_count {self.count}"]
        return lines


@dataclass
class Counter:
    name: str
    help: str
    value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter", f"{self.name} {self.value}"]


class Metrics:
    """A registry; `observe`/`inc` by name under one lock, `render()` for Prometheus."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Histogram | Counter | LabelledCounter] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def histogram(self, name: str, help: str, buckets: tuple[float, ...] = TIME_BUCKETS) -> None:
        self._items.setdefault(name, Histogram(name, help, buckets))

    def counter(self, name: str, help: str) -> None:
        self._items.setdefault(name, Counter(name, help))

    def labelled_counter(self, name: str, help: str, labels: tuple[str, ...]) -> None:
        self._items.setdefault(name, LabelledCounter(name, help, labels))

    def inc_labelled(self, name: str, key: tuple[str, ...], amount: float = 1.0) -> None:
        with self._lock:
            self._items[name].inc(key, amount)  # type: ignore[call-arg, arg-type]

    def labelled_value(self, name: str, key: tuple[str, ...]) -> float:
        with self._lock:
            return self._items[name].values.get(key, 0.0)  # type: ignore[union-attr]

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help, read)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._items[name].observe(value)  # type: ignore[union-attr]

    def inc(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            self._items[name].inc(amount)  # type: ignore[union-attr]

    def value(self, name: str) -> float:
        with self._lock:
            item = self._items[name]
            return item.value if isinstance(item, Counter) else item.count

    def render(self) -> str:
        with self._lock:
            lines = [line for item in self._items.values() for line in item.render()]
        for name, (help, read) in self._gauges.items():
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {read()}"]
        return "\n".join(lines) + "\n"


@dataclass
class LabelledCounter:
    """A counter per combination of labels. The label values must come from a fixed set the server
    chooses (route templates, status codes), never from the request: one series per value."""

    name: str
    help: str
    labels: tuple[str, ...]
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            pairs = ",".join(f'{label}="{v}"' for label, v in zip(self.labels, key))
            lines.append(f"{self.name}{{{pairs}}} {value}")
        return lines
