"""The heat-map overlay QA looks at: a transparent PNG layer drawn over the frame's JPEG.

A layer rather than a finished picture: the review page stacks it on the original image
(and can hide it), and a transparent layer is cheap to make on the worker's hot path. It
holds only the defect heat map, warped back from the crop, at a quarter of the working size:
the heat map itself is 1/8 of the crop, so nothing is lost, and the browser smooths it when
it scales the layer up. The crisp parts, the defect outlines and the cell's rectangle,
travel as vectors in the verdict (``regions``, ``cell_corners``) and are drawn by the page.
PNG is written directly: one zlib pass at level 1, no per-row filter search (OpenCV's PNG
writer takes ~10 ms for a full-size layer).
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from pouchline.models.locate import Located

_SCALE = 0.25


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def rgba_png(layer: np.ndarray) -> bytes:
    """An (H, W, 4) uint8 RGBA array as PNG bytes."""
    height, width, _ = layer.shape
    rows = np.zeros((height, width * 4 + 1), np.uint8)  # each row starts with filter type 0 (none)
    rows[:, 1:] = layer.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA, no interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + _chunk(b"IEND", b"")


def overlay_layer(size: tuple[int, int], located: Located, heat: np.ndarray) -> bytes:
    """The heat-map layer for a working-size image of ``size`` (width, height)."""
    width, height = max(1, round(size[0] * _SCALE)), max(1, round(size[1] * _SCALE))
    if located.crop_to_image is None or located.crop is None:
        raise ValueError("the cell was not located: there is no heat map to place")
    crop_h, crop_w = located.crop.shape[:2]
    # crop pixel -> layer pixel; the heat map's own cells are (crop / heat) crop pixels wide
    step_x, step_y = crop_w / heat.shape[1], crop_h / heat.shape[0]
    to_crop = np.array([[step_x, 0, 0.5 * step_x - 0.5], [0, step_y, 0.5 * step_y - 0.5], [0, 0, 1.0]])
    to_layer = np.diag([_SCALE, _SCALE, 1.0]) @ np.vstack([located.crop_to_image, [0, 0, 1]]) @ to_crop
    warped = np.clip(cv2.warpAffine(heat.astype(np.float32), to_layer[:2], (width, height), flags=cv2.INTER_LINEAR), 0, 1)
    layer = np.empty((height, width, 4), np.uint8)
    level = (warped * 255).astype(np.uint8)
    layer[..., :3] = cv2.applyColorMap(level, cv2.COLORMAP_JET)[..., ::-1]
    layer[..., 3] = (warped * 170).astype(np.uint8)
    return rgba_png(layer)
