"""Find the pouch cell in a side-view frame and cut its silhouette out in a canonical frame.

The side camera looks across the belt at a backlight panel, so the cell is a dark silhouette
standing on the belt line. That view shows what the top view can only guess from shading:
thickness (swelling), bends across the cell (warp), lifted corners and bent tabs.

`locate_side` is the side view's counterpart of `locate`, used identically by training,
evaluation and live inspection:

1. Brightness is normalised per column between the backlight (the frame's upper rows) and
   the belt (its lowest rows), so exposure, light colour and the panel's gradient drop out.
2. The belt line is found to a fraction of a pixel in the columns the cell leaves free.
3. The cell's body is the run of columns whose silhouette is at least 40 % of its typical
   height; its length sets the crop's scale, so the crop does not depend on the camera's
   distance.
4. A fixed window around the body, in body lengths, is resampled to `SIDE_CROP_SIZE`.

The side camera is mounted so that the tab end is on the image's right, as the station's
cells pass it. Unlike the top view, the tabs cannot tell the orientation here: seen edge on
they are a fraction of a millimetre thick (measured: in 16 of 240 rendered frames that
test picked the wrong end), so the model learns the one orientation the rig gives it.

Needs only OpenCV and NumPy (no torch), so the runtime can use it.
"""

from __future__ import annotations

import cv2
import numpy as np

from pouchline.models.locate import Located

#: Canonical side crop (width, height): about 1.9 crop pixels per mm along the cell and
#: 4 per mm in height for a 100 mm body, where the thickness is measured.
SIDE_CROP_SIZE: tuple[int, int] = (256, 64)
#: The crop window around the body, in body lengths: before the body (seal side), after it
#: (tab side: seal and tabs), below the belt line and above it.
_BEFORE, _AFTER, _BELOW, _ABOVE = 0.12, 0.25, 0.02, 0.14
#: Rows that show only backlight (top) and only belt (bottom), as shares of the height.
_BACKLIGHT_ROWS, _BELT_ROWS = 0.3, 0.9
#: Backlight must be this much brighter than the belt (grey levels) to see a silhouette.
_MIN_CONTRAST = 40.0
#: A body is at least this tall (pixels); thinner material is seal or tab.
_MIN_BODY_PX = 4.0
_BODY_SHARE = 0.4
#: Rows either side of the belt line used to place it to a fraction of a pixel.
_EDGE_ROWS = 4
#: Normalised levels written into the crop: belt and backlight.
_DARK, _LIGHT = 30.0, 230.0


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3:
        image = image[..., 0]
    return image.astype(np.float32)


def _belt_edge(cover: np.ndarray) -> tuple[float, np.ndarray] | None:
    """Belt line (continuous row: pixel r spans [r, r + 1]) and the columns free of the cell.

    Below the belt line every column is dark. Walking up a column, the dark run that reaches
    the bottom ends at the belt line where the column is free (or the cell is lifted off the
    belt) and at the cell's top where the cell rests on the belt; the lowest of those ends,
    held by at least three columns, is the belt line.
    """
    height = cover.shape[0]
    light = cover < 0.5
    last_light = height - 1 - np.argmax(light[::-1], axis=0)
    last_light[~light.any(axis=0)] = -1
    run_top = last_light + 1
    row = int(np.sort(run_top)[-3])
    if row < _EDGE_ROWS or row > height - _EDGE_ROWS:
        return None
    free = (run_top >= row - 1) & ~(cover[: row - _EDGE_ROWS] > 0.5).any(axis=0)
    if free.sum() < 3:
        return None
    dark_rows = cover[row - _EDGE_ROWS : row + _EDGE_ROWS, free].sum(axis=0)
    return row + _EDGE_ROWS - float(np.median(dark_rows)), free


def locate_side(image: np.ndarray, crop_size: tuple[int, int] = SIDE_CROP_SIZE) -> Located:
    """Find the cell in a side-view frame (BGR or grayscale) and crop it."""
    if image.ndim not in (2, 3) or image.shape[0] < 32 or image.shape[1] < 32:
        raise ValueError(f"locate_side needs a 2-D or 3-D image of at least 32x32 pixels, got shape {image.shape}")
    grey = _grey(image)
    height, width = grey.shape
    backlight = np.median(grey[: int(height * _BACKLIGHT_ROWS)], axis=0)
    belt = np.median(grey[int(height * _BELT_ROWS) :], axis=0)
    contrast = backlight - belt
    if float(np.median(contrast)) < _MIN_CONTRAST:
        return Located("no_cell")
    contrast = np.maximum(contrast, _MIN_CONTRAST / 2)
    level = (grey - belt) / contrast  # 1 = backlight, 0 = belt
    cover = np.clip(1.0 - level, 0.0, 1.0)
    found = _belt_edge(cover)
    if found is None:
        return Located("no_cell")
    edge, free = found
    row = int(np.floor(edge))
    heights = cover[:row].sum(axis=0) + (edge - row) * cover[row]
    heights -= float(np.median(heights[free]))
    typical = float(np.percentile(heights, 90))
    if typical < _MIN_BODY_PX:
        return Located("no_cell")
    body = np.flatnonzero(heights > _BODY_SHARE * typical)
    first, last = int(body[0]), int(body[-1])
    if first <= 1 or last >= width - 2:
        return Located("partial_cell")
    length = float(last + 1 - first)
    scale_x = (1.0 + _BEFORE + _AFTER) * length / crop_size[0]
    scale_y = (_BELOW + _ABOVE) * length / crop_size[1]
    left, top = first - _BEFORE * length, edge - _ABOVE * length
    # crop pixel centre (u, v) -> frame pixel centre; pixel i spans [i, i + 1]
    to_image = np.array([[scale_x, 0.0, left + 0.5 * scale_x - 0.5], [0.0, scale_y, top + 0.5 * scale_y - 0.5]])
    normalised = np.clip(_DARK + (_LIGHT - _DARK) * level, 0, 255).astype(np.float32)
    # Low-pass before resampling (the crop is coarser than the frame along the cell).
    smooth = cv2.GaussianBlur(normalised, (0, 0), sigmaX=0.45 * scale_x, sigmaY=0.45 * max(scale_y, 1.0))
    crop = cv2.warpAffine(smooth, to_image, crop_size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
    corners = np.array([[first, top], [last + 1, top], [last + 1, edge], [first, edge]], np.float32)
    return Located("ok", crop=np.round(crop).astype(np.uint8), crop_to_image=to_image, corners=corners)
