"""Common shape of every `pouchline bench NAME` report: a table on the terminal and a JSON file.

``{"bench": NAME, "machine": {...}, "results": [...], "figures": {...}, "ratios": {...}}``:
``results`` holds one row per measured case, ``figures`` the headline numbers and ``ratios``
the side-by-side comparisons, with the key names the issues give.
"""

from __future__ import annotations

import io
import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_VERSIONED = ("pouchline", "numpy", "opencv-python-headless", "numba", "onnxruntime", "torch", "pyzmq")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }


@dataclass
class BenchReport:
    """Results of one benchmark run, printed and saved the same way by every bench."""

    bench: str
    results: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "machine": machine_info(),
            "results": self.results,
            "figures": self.figures,
            "ratios": self.ratios,
        }

    def print(self, console: Console) -> None:
        """Results as a table when it fits the terminal, else one block per case; then the
        headline figures and ratios, one per line (a table squeezed into 80 columns wraps every
        cell into an unreadable column of fragments)."""
        if self.results:
            columns = list(dict.fromkeys(key for row in self.results for key in row))
            table = Table(title=f"pouchline bench {self.bench}")
            for column in columns:
                table.add_column(column, justify="left" if column == "case" else "right", no_wrap=True)
            for row in self.results:
                table.add_row(*(_fmt(row.get(column, "")) for column in columns))
            natural = Console(width=100_000, file=io.StringIO()).measure(table).maximum
            if natural <= console.width:
                console.print(table)
            else:
                console.print(f"[bold]pouchline bench {self.bench}[/bold]")
                for row in self.results:
                    label = str(row.get("case") or " ".join(str(row[key]) for key in ("system", "payload", "mode") if key in row))
                    pairs = [f"{key} {_fmt(value)}" for key, value in row.items()
                             if key not in ("system", "payload", "mode", "case") and value != ""]
                    console.print(f"[bold]{label}[/bold]: " + ", ".join(pairs))
        for title, values in (("figures", self.figures), ("ratios", self.ratios)):
            if values:
                console.print(f"[bold]{title}[/bold]")
                for key, value in values.items():
                    console.print(f"  {key} = {_fmt(value)}")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
