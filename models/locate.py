"""Find the pouch cell in a top-view frame and cut it out in a canonical pose.

One function, `locate`, used identically by training, evaluation and live inspection, so
the detector always sees crops made the same way. The cell is segmented by its difference
from the belt (the belt's colour is read off the frame's border), the minimum-area rectangle
around its pieces (one for most cells; a dark cell on a dark belt may show only its seal's
edge, the light's reflection and its tabs) gives position and rotation, and the tab end is
turned to the right. The belt is taken to be clear but for the cell and the edge of the
next one. Needs only OpenCV and NumPy (no torch), so the runtime can use it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

Status = Literal["ok", "no_cell", "partial_cell"]

#: Canonical crop size (width, height) and the margin kept around the cell's rectangle.
CROP_SIZE: tuple[int, int] = (208, 112)
_MARGIN = 0.04
#: Segmentation runs at this fraction of the frame size.
_SCALE = 0.25
#: A cell must cover this share of the frame; its outline may not come closer to the border.
_MIN_AREA = 0.03
_BORDER_PX = 1
#: Smallest extent of a separate piece of the cell (share of the frame's shorter side).
_MIN_PIECE = 0.08
_MIN_CONTRAST = 10


@dataclass
class Located:
    """Where the cell is and its canonical crop (None unless ``status`` is 'ok')."""

    status: Status
    crop: np.ndarray | None = None
    crop_to_image: np.ndarray | None = None  # 2x3: crop pixel (x, y, 1) -> frame pixel
    corners: np.ndarray | None = None  # 4x2 rectangle corners in frame pixels
    angle_deg: float = 0.0  # rotation of the cell's long axis (tabs at +x) in the frame


def _border(values: np.ndarray) -> np.ndarray:
    """The frame's outer 4-pixel ring: belt only, the cell is never there."""
    return np.concatenate([values[:4].ravel(), values[-4:].ravel(), values[:, :4].ravel(), values[:, -4:].ravel()])


@functools.lru_cache(maxsize=8)
def _quadratic_basis(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """1, x, y, x^2, y^2, xy per pixel, and the mask of the frame's 3-pixel border ring."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = xs / width - 0.5, ys / height - 0.5
    basis = np.stack([np.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys], axis=-1)
    ring = np.zeros((height, width), bool)
    ring[:3], ring[-3:], ring[:, :3], ring[:, -3:] = True, True, True, True
    return basis, ring


def _belt_model(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The belt as it would look without the cell, and how much the belt itself varies.

    A quadratic surface per channel is fitted to the frame's border, so light falloff and
    vignetting are not mistaken for the cell. The fit is repeated without the border pixels
    it explains badly, which are a cell running off the frame.
    """
    height, width, channels = image.shape
    basis, ring = _quadratic_basis(height, width)
    samples, values = basis[ring], image[ring].reshape(-1, channels).astype(np.float32)
    keep = np.ones(len(samples), bool)
    for _ in range(2):
        used = samples[keep].astype(np.float64)
        coefficients = np.linalg.solve(used.T @ used + 1e-6 * np.eye(6), used.T @ values[keep])
        residual = np.abs(samples @ coefficients - values).max(axis=1)
        spread = float(np.median(residual[keep])) + 1.0
        keep = residual < 6.0 * spread
    model = (basis @ coefficients.astype(np.float32)).reshape(height, width, channels)
    return model, float(np.percentile(residual[keep], 99))


def _edge_strength(grey: np.ndarray) -> np.ndarray:
    """Gradient magnitude. np.hypot, not cv2.magnitude: OpenCV's rounds a little differently
    from run to run when it shares the image out between threads, and the edge threshold taken
    from it (so the mask, and a borderline frame's crop) must not move with that."""
    return np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))


def _foreground(image: np.ndarray) -> np.ndarray:
    """Binary mask of the cell at `_SCALE` resolution.

    Two cues, each thresholded against the belt's own variation (texture, noise, uneven
    light) measured on the frame's border: colour difference from the belt, and edges. The
    seal's outline is an edge even where dark film matches a dark belt; holes inside the
    closed outline are filled.
    """
    small = cv2.resize(image, None, fx=_SCALE, fy=_SCALE, interpolation=cv2.INTER_AREA)
    if small.ndim == 2:
        small = small[..., None]
    belt, belt_noise = _belt_model(small)
    diff = cv2.GaussianBlur(np.abs(small.astype(np.float32) - belt).max(axis=2), (3, 3), 0)
    grey = cv2.GaussianBlur(small.max(axis=2), (3, 3), 0)
    belt_edges = _border(_edge_strength(grey))
    low = max(4.0 * float(np.percentile(belt_edges, 75)), 2.0 * _MIN_CONTRAST)
    edges = cv2.Canny(grey, low, 2.0 * low, L2gradient=True)  # hysteresis keeps faint outline runs
    mask = (diff > max(2.5 * belt_noise, _MIN_CONTRAST)).astype(np.uint8) * 255
    mask = cv2.morphologyEx(mask | edges, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    outside = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    filled = mask.copy()
    cv2.floodFill(filled, outside, (0, 0), 255)
    mask |= cv2.bitwise_not(filled)  # pixels the border's flood could not reach: holes
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def _crop_matrix(center: tuple[float, float], size: tuple[float, float], angle_deg: float,
                 crop_size: tuple[int, int]) -> np.ndarray:
    """2x3 map from crop pixels to frame pixels for a rotated rectangle plus margin."""
    (cx, cy), (length, width) = center, size
    crop_w, crop_h = crop_size
    span_x, span_y = length * (1 + 2 * _MARGIN), width * (1 + 2 * _MARGIN)
    scale_x, scale_y = span_x / crop_w, span_y / crop_h
    cos_a, sin_a = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    # crop (x, y) -> offset from the centre in the cell frame -> rotated into the frame
    ox, oy = -(crop_w - 1) / 2 * scale_x, -(crop_h - 1) / 2 * scale_y
    return np.array([
        [cos_a * scale_x, -sin_a * scale_y, cx + cos_a * ox - sin_a * oy],
        [sin_a * scale_x, cos_a * scale_y, cy + sin_a * ox + cos_a * oy],
    ])


def _two_tab_share(columns: np.ndarray) -> float:
    """Share of mask columns (crossing the cell's width) that meet exactly two runs: the tabs."""
    crossing = columns > 0
    starts = crossing[1:] & ~crossing[:-1]
    runs = starts.sum(axis=0) + crossing[0]
    return float((runs == 2).mean())


def _tabs_on_left(mask: np.ndarray, matrix: np.ndarray) -> bool:
    """True when the tab end of the outline is at the crop's left.

    The tab end is where a line across the cell meets two separate pieces, the tabs. Tabs
    are bright metal and always stand out from the belt, even when the film does not. When
    that test is a tie, the narrow end (less fill) is taken.
    """
    canonical = cv2.warpAffine(mask, matrix, (64, 32), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    left, right = _two_tab_share(canonical[:, 1:7]), _two_tab_share(canonical[:, -7:-1])
    if left != right:
        return left > right
    fill = (canonical > 0).mean(axis=0)
    return float(fill[3:9].mean()) < float(fill[-9:-3].mean())


def _touches_border(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> bool:
    x, y, w, h = box
    return x <= _BORDER_PX or y <= _BORDER_PX or x + w >= shape[1] - _BORDER_PX or y + h >= shape[0] - _BORDER_PX


def _pieces(contours: Sequence[np.ndarray], biggest: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """The other pieces of the same cell: outline runs and tabs that the mask did not join to
    the biggest piece (dark film on a dark belt shows little more than its seal's edge and the
    bright tabs). A piece counts when it is long (`_MIN_PIECE` of the frame's shorter side),
    which belt texture and noise are not, and clear of the frame's edge, where a neighbouring
    cell would enter."""
    least = _MIN_PIECE * min(shape[:2])
    boxes = [(contour, cv2.boundingRect(contour)) for contour in contours if contour is not biggest]
    return [contour for contour, box in boxes if max(box[2], box[3]) >= least and not _touches_border(box, shape)]


def locate(image: np.ndarray, crop_size: tuple[int, int] = CROP_SIZE) -> Located:
    """Find the cell in a top-view frame (BGR or grayscale) and crop it, tabs to the right."""
    if image.ndim not in (2, 3) or image.shape[0] < 32 or image.shape[1] < 32:
        raise ValueError(f"locate needs a 2-D or 3-D image of at least 32x32 pixels, got shape {image.shape}")
    mask = _foreground(image)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return Located("no_cell")
    biggest = max(contours, key=cv2.contourArea)
    if cv2.contourArea(biggest) < _MIN_AREA * mask.size:
        return Located("no_cell")
    if _touches_border(cv2.boundingRect(biggest), mask.shape):
        return Located("partial_cell")
    outline = np.concatenate([biggest, *_pieces(contours, biggest, mask.shape)])
    (cx, cy), (rw, rh), angle = cv2.minAreaRect(cv2.convexHull(outline).astype(np.float32) / _SCALE)
    if rw < rh:
        rw, rh, angle = rh, rw, angle + 90.0
    full_mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    matrix = _crop_matrix((cx, cy), (rw, rh), angle, (64, 32))
    if _tabs_on_left(full_mask, matrix):
        angle += 180.0
    angle = (angle + 180.0) % 360.0 - 180.0
    to_image = _crop_matrix((cx, cy), (rw, rh), angle, crop_size)
    crop = cv2.warpAffine(image, to_image, crop_size, flags=cv2.INTER_AREA | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
    corners = cv2.boxPoints(((cx, cy), (rw, rh), angle))
    return Located("ok", crop=crop, crop_to_image=to_image, corners=corners, angle_deg=angle)


def warp_to_crop(plane: np.ndarray, located: Located, crop_size: tuple[int, int] = CROP_SIZE,
                 interpolation: int = cv2.INTER_NEAREST) -> np.ndarray:
    """Cut any per-pixel map of the frame (a defect mask, say) the same way as the crop."""
    if located.crop_to_image is None:
        raise ValueError("the cell was not located; there is no crop to warp to")
    return cv2.warpAffine(plane, located.crop_to_image, crop_size, flags=interpolation | cv2.WARP_INVERSE_MAP)


def fit_crop(image: np.ndarray, crop_size: tuple[int, int] = CROP_SIZE) -> Located:
    """For datasets of already aligned crops: resize to the crop size, no locating."""
    height, width = image.shape[:2]
    crop = cv2.resize(image, crop_size, interpolation=cv2.INTER_AREA)
    scale = np.array([[width / crop_size[0], 0, 0], [0, height / crop_size[1], 0]], dtype=np.float64)
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    return Located("ok", crop=crop, crop_to_image=scale, corners=corners)
