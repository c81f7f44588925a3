"""Counters and histograms that cross process boundaries, and their Prometheus text form.

Workers are separate processes, so instead of a metrics library's shared-memory mode each
worker keeps plain counters and fixed-bucket histograms and sends a snapshot to the
collector once a second (`WorkerStats`); the service renders the sum for Prometheus.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping

from pouchline.inspect.verdicts import Histogram

#: Bucket bounds per histogram: latencies in ms, batch sizes in frames.
LATENCY_BOUNDS_MS = [1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 5000]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class Accumulator:
    """A fixed-bucket histogram being filled."""

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> Histogram:
        return Histogram(bounds=[float(b) for b in self.bounds], counts=list(self.counts), total=self.total)


def merge(histograms: Iterable[Histogram]) -> Histogram | None:
    """Sum of histograms with the same bounds (None when there are none)."""
    merged: Histogram | None = None
    for item in histograms:
        if merged is None:
            merged = item
        elif item.bounds == merged.bounds:
            merged = Histogram(bounds=merged.bounds, counts=[a + b for a, b in zip(merged.counts, item.counts)],
                               total=merged.total + item.total)
    return merged


def quantile(histogram: Histogram, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (what a Prometheus query would estimate)."""
    seen, wanted = 0, q * sum(histogram.counts)
    if wanted == 0:
        return None
    for bound, count in zip([*histogram.bounds, math.inf], histogram.counts):
        seen += count
        if seen >= wanted:
            return bound
    return math.inf


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for key, value in labels.items())
    return "{" + ",".join(escaped) + "}"


class PrometheusText:
    """Builds the text exposition format, one metric family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {value:g}")

    def histogram(self, name: str, histogram: Histogram, labels: Mapping[str, str] | None = None) -> None:
        running = 0
        for bound, count in zip([*histogram.bounds, math.inf], histogram.counts):
            running += count
            self.sample(f"{name}_bucket", running, {**(labels or {}), "le": "+Inf" if bound == math.inf else f"{bound:g}"})
        self.sample(f"{name}_sum", histogram.total, labels)
        self.sample(f"{name}_count", running, labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
