"""Dataset statistics for a look before training: class balance, splits, severity spread.

Computed in one streaming pass (memory grows with the number of cells, not of frames or
pixels). Severity and swelling histograms count each *cell* once, from its first frame,
because every view of a cell carries the same truth; label/view/split counts are per frame.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pouchline.datasets.manifest import DatasetReader
from pouchline.datasets.records import FrameRecord

#: Histograms count at 0.01 mm and regroup into at most `_MAX_BINS` bins of a "nice" width.
_FINE_PER_MM = 100
_NICE_WIDTHS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)  # in 0.01 mm
_MAX_BINS = 20
_BAR_WIDTH = 40


class _Histogram:
    """Streaming histogram of millimetre values; the bin width is chosen once the max is known."""

    def __init__(self) -> None:
        self.fine: Counter[int] = Counter()
        self.total = 0.0
        self.max = 0.0

    def add(self, value: float) -> None:
        # round() first so 0.29 lands in bin 29, not 28 (0.29 * 100 = 28.999...).
        self.fine[math.floor(round(value * _FINE_PER_MM, 6))] += 1
        self.total += value
        self.max = max(self.max, value)

    def result(self) -> dict[str, Any] | None:
        """``counts[i]`` covers ``[i * bin_mm, (i + 1) * bin_mm)``; None when nothing was added."""
        if not self.fine:
            return None
        top = max(self.fine)
        width = next((w for w in _NICE_WIDTHS if top // w < _MAX_BINS), -(-(top + 1) // _MAX_BINS))
        counts = [0] * (top // width + 1)
        for index, n in self.fine.items():
            counts[index // width] += n
        count = sum(self.fine.values())
        return {
            "bin_mm": width / _FINE_PER_MM,
            "counts": counts,
            "count": count,
            "max_mm": self.max,
            "mean_mm": round(self.total / count, 4),
        }


def summarize(root: Path) -> dict[str, Any]:
    """Counts and histograms of a dataset as a JSON-serialisable dict."""
    reader = DatasetReader(Path(root))
    info = reader.info
    split_names = list(info.splits.fractions)
    labels: Counter[str] = Counter()
    views: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    channels: Counter[str] = Counter()
    split_frames: Counter[str] = Counter()
    split_labels: dict[str, Counter[str]] = {name: Counter() for name in split_names}
    cell_split: dict[str, str] = {}
    severities: dict[str, _Histogram] = {}
    swelling = _Histogram()
    for record in reader:
        split = cell_split.get(record.cell)
        if split is None:
            split = cell_split[record.cell] = reader.split_of(record)
            _add_cell_truth(record, severities, swelling)
        labels.update(record.labels)
        views[record.view] += 1
        sizes[f"{record.width}x{record.height}"] += 1
        channels[str(record.channels)] += 1
        split_frames[split] += 1
        split_labels[split].update(record.labels)
    split_cells = Counter(cell_split.values())
    return {
        "name": info.name,
        "root": str(root),
        "classes": list(info.classes),
        "frames": sum(views.values()),
        "cells": len(cell_split),
        "labels": _ordered(labels, info.classes),
        "views": dict(sorted(views.items())),
        "splits": {
            name: {
                "frames": split_frames[name],
                "cells": split_cells[name],
                "labels": _ordered(split_labels[name], info.classes),
            }
            for name in split_names
        },
        "severities": {kind: hist.result() for kind, hist in sorted(severities.items())},
        "swelling_mm": swelling.result(),
        "image_sizes": dict(sizes.most_common()),
        "channels": dict(sorted(channels.items())),
        "torn_tail": reader.torn_tail,
    }


def _add_cell_truth(record: FrameRecord, severities: dict[str, _Histogram], swelling: _Histogram) -> None:
    """Severities (non-zero only: zero means 'within spec') and true swelling of a new cell."""
    for kind, value in record.severities.items():
        if value > 0:
            severities.setdefault(kind, _Histogram()).add(value)
    if record.ground_truth is not None:
        swelling.add(record.ground_truth.swelling_mm)


def _ordered(counts: Counter[str], classes: list[str]) -> dict[str, int]:
    """Counts in class order, every class present (zero too), then any stray label."""
    strays = sorted(label for label in counts if label not in classes)
    return {label: counts[label] for label in [*classes, *strays]}


def render_summary(summary: dict[str, Any], console: Console) -> None:
    """Print `summarize`'s result as tables, with text bars for the histograms."""
    console.print(
        f"[bold]{summary['name']}[/bold]: {summary['frames']} frames, {summary['cells']} cells, "
        f"classes {', '.join(summary['classes'])}"
    )
    if summary.get("torn_tail"):
        console.print(f"[yellow]warning:[/yellow] {summary['torn_tail']}")
    console.print(_label_table(summary))
    console.print(_split_table(summary))
    sizes = ", ".join(f"{size} ({n})" for size, n in summary["image_sizes"].items())
    views = ", ".join(f"{view} ({n})" for view, n in summary["views"].items())
    console.print(f"views: {views or '-'}\nimage sizes: {sizes or '-'}")
    for kind, hist in summary["severities"].items():
        if hist:
            console.print(_histogram_table(f"{kind} severity, non-zero (mm, per cell)", hist))
    if summary.get("swelling_mm"):
        console.print(_histogram_table("true swelling (mm, per cell)", summary["swelling_mm"]))


def _label_table(summary: dict[str, Any]) -> Table:
    table = Table(title="Frames per label")
    table.add_column("label")
    table.add_column("frames", justify="right")
    table.add_column("share", justify="right")
    frames = max(summary["frames"], 1)
    for label, n in summary["labels"].items():
        table.add_row(label, str(n), f"{100 * n / frames:.1f}%")
    return table


def _split_table(summary: dict[str, Any]) -> Table:
    table = Table(title="Splits (by cell)")
    for column in ("split", "cells", "frames", *summary["classes"]):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in summary["splits"].items():
        per_label = [str(split["labels"].get(label, 0)) for label in summary["classes"]]
        table.add_row(name, str(split["cells"]), str(split["frames"]), *per_label)
    return table


def _histogram_table(title: str, hist: dict[str, Any]) -> Table:
    table = Table(title=title, caption=f"n={hist['count']}, mean {hist['mean_mm']:g}, max {hist['max_mm']:g}")
    table.add_column("mm")
    table.add_column("count", justify="right")
    table.add_column("")
    width, peak = hist["bin_mm"], max(hist["counts"])
    for index, n in enumerate(hist["counts"]):
        bar = "█" * round(_BAR_WIDTH * n / peak) if n else ""
        table.add_row(f"{index * width:.2f}-{(index + 1) * width:.2f}", str(n), bar)
    return table
