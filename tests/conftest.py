"""Shared fixtures for the dataset tests: small real image files and datasets on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pouchline.datasets.manifest import MANIFEST, DatasetWriter
from pouchline.datasets.records import SYNTH_CLASSES, DatasetInfo, FrameRecord


def _encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok, f"cv2 could not encode {ext}"
    return data.tobytes()


@pytest.fixture
def encode() -> Callable[..., bytes]:
    """``encode(array, ".png")``: the bytes of a real image file."""
    return _encode


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., tuple[Path, list[FrameRecord]]]:
    """``make_dataset(n)``: a dataset of n frames (two views per cell, masks, truth) and its records."""

    def make(n: int = 6, *, root: Path | None = None) -> tuple[Path, list[FrameRecord]]:
        root = root or tmp_path / "ds"
        info = DatasetInfo(name="test", classes=list(SYNTH_CLASSES))
        records = []
        with DatasetWriter(root, info, fsync=False) as writer:
            for i in range(n):
                image = np.random.default_rng(i).integers(0, 255, (12, 16, 3), dtype=np.uint8)
                mask = np.zeros((12, 16), np.uint8)
                mask[2:5, 3:7] = 255
                records.append(
                    writer.add(
                        image_bytes=_encode(image),
                        image_ext="png",
                        mask_png=_encode(mask) if i % 2 else None,
                        **_fields(i),
                    )
                )
        return root, records

    return make


def _fields(i: int) -> dict[str, Any]:
    label = SYNTH_CLASSES[i % 3]
    return {
        "id": f"frame-{i:04d}",
        "width": 16,
        "height": 12,
        "view": ("top", "side")[i % 2],
        "station": "st1",
        "camera": ("cam_top", "cam_side")[i % 2],
        "lot": "LOT-1",
        "cell": f"cell-{i // 2:04d}",
        "timestamp": 1_700_000_000.0 + i,
        "labels": [label],
        "severities": {"swelling": 0.1 * i, "dent": 0.0},
        "ground_truth": {
            "seed": 7,
            "index": i // 2,
            "px_per_mm": 2.5,
            "swelling_mm": 0.1 * i,
            "swelling_pct": 2.0 * i,
            "polygon": [(1.0, 1.0), (14.0, 1.0), (14.0, 10.0)],
            "render": {"film": "silver"},
        },
        "meta": {"i": i},
    }


@pytest.fixture
def edit_manifest() -> Callable[..., None]:
    """``edit_manifest(root, line, **changes)``: change fields of one manifest line (1-based)."""

    def edit(root: Path, line: int, **changes: Any) -> None:
        path = root / MANIFEST
        lines = path.read_text().splitlines(keepends=True)
        record = json.loads(lines[line - 1])
        record.update(changes)
        lines[line - 1] = json.dumps(record) + "\n"
        path.write_text("".join(lines))

    return edit
