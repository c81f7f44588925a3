"""Contact sheet: a labelled grid of a dataset's frames that a person can check at a glance.

Frames are picked round-robin over categories (good cells, swollen cells, each deformation
kind, or each class of an imported dataset) so every kind of defect shows up even when it
is rare. Each tile is framed in its label's colour, outlines the defect mask and names the
defect and its severity.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from pouchline.datasets.manifest import DatasetError, DatasetReader
from pouchline.datasets.records import FrameRecord

#: Tile border colours (BGR) by label; other classes cycle through _OTHER_COLOURS.
_LABEL_COLOURS = {"ok": (70, 170, 60), "swollen": (40, 40, 220), "deformed": (0, 150, 255)}
_BOTH_COLOUR = (200, 60, 200)
_OTHER_COLOURS = [(200, 120, 40), (40, 200, 200), (160, 80, 160), (80, 80, 80)]
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def category(record: FrameRecord) -> str:
    """What a frame shows, for balanced picking: 'ok', a defect kind, or its label."""
    defects = [kind for kind, severity in record.severities.items() if severity > 0]
    if defects:
        return max(defects, key=lambda kind: record.severities[kind])
    return "+".join(record.labels)


def _caption(record: FrameRecord) -> list[str]:
    defects = sorted(((s, k) for k, s in record.severities.items() if s > 0), reverse=True)
    lines = ["+".join(record.labels)]
    lines += [f"{kind} {severity:.2f} mm" for severity, kind in defects[:2]]
    if record.ground_truth is not None and not defects and record.ground_truth.swelling_mm > 0:
        lines.append(f"in-spec swell {record.ground_truth.swelling_mm:.2f} mm")
    return lines


def _colour(record: FrameRecord, classes: list[str]) -> tuple[int, int, int]:
    if "swollen" in record.labels and "deformed" in record.labels:
        return _BOTH_COLOUR
    label = record.labels[0]
    if label in _LABEL_COLOURS:
        return _LABEL_COLOURS[label]
    return _OTHER_COLOURS[classes.index(label) % len(_OTHER_COLOURS)] if label in classes else (128, 128, 128)


def pick(reader: DatasetReader, count: int) -> list[FrameRecord]:
    """Up to ``count`` frames, round-robin over categories, in manifest order within each."""
    by_category: dict[str, list[FrameRecord]] = defaultdict(list)
    for record in reader:
        bucket = by_category[category(record)]
        if len(bucket) < count:
            bucket.append(record)
    chosen: list[FrameRecord] = []
    queues = [by_category[name] for name in sorted(by_category)]
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def _profile_rows(height: int, polygon: list[tuple[float, float]]) -> tuple[int, int]:
    """Rows around a side view's silhouette: a thickness profile is only a few pixels tall,
    so the sheet shows this band stretched to the frame's shape."""
    ys = [y for _, y in polygon]
    top = max(int(min(ys)) - 12, 0)
    return top, min(int(max(ys)) + 12, height)


def _tile(reader: DatasetReader, record: FrameRecord, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    image = reader.read_image(record, cv2.IMREAD_COLOR)
    mask = reader.read_mask(record)
    caption = _caption(record)
    height = max(int(round(image.shape[0] * width / image.shape[1])), 1)
    if record.view == "side" and record.ground_truth is not None:
        top, bottom = _profile_rows(image.shape[0], record.ground_truth.polygon)
        caption[0] += f"  (height x{image.shape[0] / (bottom - top):.0f})"
        image = image[top:bottom]
        mask = None if mask is None else mask[top:bottom]
    thumb = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    if mask is not None and mask.any():
        # Outline a slightly grown mask so the line surrounds the defect instead of hiding it.
        small = cv2.resize((mask > 0).astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_AREA) > 0
        grown = cv2.dilate(small.astype(np.uint8), np.ones((3, 3), np.uint8))
        contours, _ = cv2.findContours(grown, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(thumb, contours, -1, (0, 0, 255), 1, cv2.LINE_AA)
    band = np.full((18 * len(caption) + 8, width, 3), 30, np.uint8)
    for row, text in enumerate(caption):
        cv2.putText(band, text, (6, 18 + 18 * row), _FONT, 0.45, (255, 255, 255) if row == 0 else (210, 210, 210), 1, cv2.LINE_AA)
    cv2.putText(band, record.view, (width - 40, 18), _FONT, 0.4, (170, 170, 170), 1, cv2.LINE_AA)
    tile = np.vstack([thumb, band])
    return cv2.copyMakeBorder(tile, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=colour)


def contact_sheet(root: Path, out: Path, *, count: int = 48, columns: int = 8, tile_width: int = 240) -> int:
    """Write a PNG contact sheet of up to ``count`` frames; returns how many it shows."""
    if count < 1 or columns < 1 or tile_width < 64:
        raise ValueError("count and columns must be >= 1 and tile width >= 64 px")
    reader = DatasetReader(root)
    records = pick(reader, count)
    if not records:
        raise DatasetError(root, "has no frames to put on a contact sheet")
    classes = reader.info.classes
    tiles = [_tile(reader, record, tile_width, _colour(record, classes)) for record in records]
    tile_h = max(t.shape[0] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 0, tile_h - t.shape[0], 0, 0, cv2.BORDER_CONSTANT, value=(20, 20, 20)) for t in tiles]
    blank = np.full_like(tiles[0], 20)
    rows = [tiles[i : i + columns] for i in range(0, len(tiles), columns)]
    grid = np.vstack([np.hstack(row + [blank] * (columns - len(row))) for row in rows])
    header = np.full((40, grid.shape[1], 3), 20, np.uint8)
    cv2.putText(header, f"{reader.info.name}: {len(records)} frames", (8, 27), _FONT, 0.7, (255, 255, 255), 1, cv2.LINE_AA)
    x = grid.shape[1] - 10
    legend = [*((name, _LABEL_COLOURS[name]) for name in ("ok", "swollen", "deformed")), ("both", _BOTH_COLOUR)]
    for name, colour in reversed(legend):
        x -= 12 + 10 * len(name)
        cv2.rectangle(header, (x, 14), (x + 12, 26), colour, -1)
        cv2.putText(header, name, (x + 16, 26), _FONT, 0.45, (230, 230, 230), 1, cv2.LINE_AA)
        x -= 24
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), np.vstack([header, grid])):
        raise OSError(f"{out}: could not write the contact sheet (is the extension .png?)")
    return len(records)
