"""Render a synthetic dataset: cells drawn from a spec and a domain, written in the dataset format.

Cells are rendered by worker processes and written, in index order, by one writer in this
process, so the dataset's files and manifest are identical whatever the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pouchline.datasets.domain import Domain, load_domain
from pouchline.datasets.manifest import MANIFEST, DatasetError, DatasetReader, DatasetWriter
from pouchline.datasets.records import DEFORMATION_KINDS, SYNTH_CLASSES, DatasetInfo
from pouchline.datasets.render import VIEWS, ViewName, render
from pouchline.datasets.scene import COSMETIC_RATE, MAX_SWELLING_MM, sample_scene
from pouchline.datasets.spec import CellSpec

#: Synthetic capture clock: 2026-01-01T00:00:00Z plus the cell's index over the line rate.
_EPOCH = 1767225600.0


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic dataset (stored in dataset.json)."""

    count: int
    seed: int
    views: tuple[ViewName, ...] = ("top",)
    size: tuple[int, int] = (640, 480)
    defect_rate: float = 0.3
    domain: Domain = field(default_factory=lambda: load_domain("default"))
    spec: CellSpec = field(default_factory=CellSpec)
    kinds: tuple[str, ...] = DEFORMATION_KINDS
    cosmetic_rate: float = COSMETIC_RATE
    lot_size: int = 200
    cells_per_s: float = 3.0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1 (got {self.count})")
        if not self.views or any(view not in VIEWS for view in self.views):
            raise ValueError(f"views {self.views} must be a non-empty selection of {', '.join(VIEWS)}")
        width, height = self.size
        if not (64 <= width <= 4096 and 48 <= height <= 4096):
            raise ValueError(f"size {width}x{height} is outside 64x48 .. 4096x4096")
        if self.lot_size < 1 or self.cells_per_s <= 0:
            raise ValueError("lot_size must be >= 1 and cells_per_s > 0")

    def source(self) -> dict[str, Any]:
        """Provenance stored in dataset.json."""
        return {
            "kind": "synth",
            "count": self.count,
            "seed": self.seed,
            "views": list(self.views),
            "size": list(self.size),
            "defect_rate": self.defect_rate,
            "domain": self.domain.model_dump(),
            "kinds": list(self.kinds),
            "cosmetic_rate": self.cosmetic_rate,
            "lot_size": self.lot_size,
            "cells_per_s": self.cells_per_s,
        }


@dataclass
class SynthResult:
    """What a run wrote."""

    out: Path
    cells: int
    frames: int
    skipped: int


def cell_id(seed: int, index: int) -> str:
    """Id of synthetic cell ``index`` of run ``seed``."""
    return f"s{seed}-c{index:06d}"


def render_cell(config: SynthConfig, index: int, swelling_offset_mm: float = 0.0) -> list[dict[str, Any]]:
    """Every view of cell ``index`` as writer arguments (fields, JPEG and mask bytes).

    ``swelling_offset_mm`` adds swelling to the drawn cell (a supplier's material drifting);
    its labels follow from the spec as always, so a large enough drift makes cells swollen."""
    scene = sample_scene(
        config.seed, index, spec=config.spec, domain=config.domain, defect_rate=config.defect_rate, kinds=config.kinds,
        cosmetic_rate=config.cosmetic_rate,
    )
    if swelling_offset_mm:
        scene = replace(scene, swelling_mm=min(MAX_SWELLING_MM, scene.swelling_mm + swelling_offset_mm))
    labels, severities = scene.labels()
    cell = cell_id(config.seed, index)
    frames = []
    for view in config.views:
        frame = render(scene, view, config.size)
        mask_png = None
        if frame.mask.any():
            ok, data = cv2.imencode(".png", frame.mask)
            if not ok:
                raise RuntimeError(f"cell {cell}: could not encode its mask")
            mask_png = data.tobytes()
        frames.append({
            "image_bytes": frame.jpeg,
            "image_ext": "jpg",
            "mask_png": mask_png,
            "id": f"{cell}-{view}",
            "width": config.size[0],
            "height": config.size[1],
            "channels": 3,
            "view": view,
            "station": "synth",
            "camera": view,
            "lot": f"s{config.seed}-lot{index // config.lot_size:04d}",
            "cell": cell,
            "timestamp": _EPOCH + index / config.cells_per_s,
            "labels": labels,
            "severities": severities,
            "ground_truth": {
                "seed": config.seed,
                "index": index,
                "px_per_mm": frame.px_per_mm,
                "swelling_mm": scene.swelling_mm,
                "swelling_pct": 100.0 * scene.swelling_mm / config.spec.thickness_mm,
                "polygon": frame.polygon,
                "render": {**scene.render_params(), "view": view, "size": list(config.size), **frame.extra},
            },
        })
    return frames


_WORKER_CONFIG: SynthConfig | None = None


def _init_worker(config: SynthConfig) -> None:
    global _WORKER_CONFIG
    _WORKER_CONFIG = config
    cv2.setNumThreads(1)


def _render_in_worker(index: int) -> tuple[int, list[dict[str, Any]]]:
    assert _WORKER_CONFIG is not None, "worker not initialised"
    return index, render_cell(_WORKER_CONFIG, index)


def render_cells(config: SynthConfig, indices: list[int], workers: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Rendered cells in index order, from this process or a pool of worker processes."""
    if workers <= 1:
        for index in indices:
            yield index, render_cell(config, index)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
        yield from pool.imap(_render_in_worker, indices, chunksize=4)


def _existing_cells(out: Path) -> set[str]:
    return {record.cell for record in DatasetReader(out)}


def synthesize(out: Path, config: SynthConfig, *, workers: int = 1, resume: bool = False, progress: bool = True) -> SynthResult:
    """Render ``config.count`` cells into the dataset folder ``out``.

    A folder that already holds frames is refused unless ``resume`` is set: then the run
    must have the same settings and only the cells not yet written are rendered (a run
    cut short by a crash or Ctrl-C continues where it stopped).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    info = DatasetInfo(name=out.name or "synthetic", classes=list(SYNTH_CLASSES), spec=config.spec.model_dump(), source=config.source())
    done: set[str] = set()
    manifest = out / MANIFEST
    if manifest.exists() and manifest.stat().st_size > 0:
        if not resume:
            raise DatasetError(out, "already holds a dataset; choose another --out or pass --resume to continue it")
        existing = DatasetReader(out).info
        if existing.source != json.loads(json.dumps(info.source)):
            raise DatasetError(out, "was made with other synth settings; --resume needs the same ones")
        done = _existing_cells(out)
    todo = [index for index in range(config.count) if cell_id(config.seed, index) not in done]
    frames = 0
    with DatasetWriter(out, info, fsync=False) as writer, Progress(
        TextColumn("[bold]synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress
    ) as bar:
        task = bar.add_task("cells", total=len(todo))
        for _, views in render_cells(config, todo, min(workers, max(len(todo), 1))):
            for frame in views:
                writer.add(**frame)
                frames += 1
            bar.advance(task)
    return SynthResult(out=out, cells=len(todo), frames=frames, skipped=config.count - len(todo))


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    return max(len(os.sched_getaffinity(0)), 1)
