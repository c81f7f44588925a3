"""Render camera frames of one `CellScene`: the top camera above the belt, the side camera beside it.

Top view: the cell's height field is shaded in the cell's own frame (a patch at the image's
px/mm), warped onto the belt at its pose, then the sensor's imperfections are applied.
Side view: a backlit thickness gauge; the silhouette of the cell's profile (the highest and
lowest surface over its depth) is drawn with exact area coverage, so the thickness can be
measured from the image to a fraction of a pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import cv2
import numpy as np

from pouchline.datasets.camera import belt, develop, drop_shadow, encode_jpeg, px_per_mm, rotation
from pouchline.datasets.geometry import outline_box, patch_bounds, surface
from pouchline.datasets.scene import CellScene
from pouchline.datasets.shading import FILMS, place_lights, shade_region

ViewName = Literal["top", "side"]
VIEWS: tuple[ViewName, ...] = ("top", "side")

#: A defect's mask covers where it changes the surface by this share of its magnitude.
_MASK_SHARE = 0.25
#: Side view: focal length at 640 px wide, belt top line as a share of the height, depth sampling.
_SIDE_FOCAL_PX_AT_640 = 1440.0
_SIDE_HORIZON = 0.62
_SIDE_DEPTH_STEP_MM = 0.5


@dataclass
class RenderedFrame:
    """A rendered view with its exact ground truth."""

    view: ViewName
    image: np.ndarray  # 8-bit BGR
    jpeg: bytes
    mask: np.ndarray  # uint8 0/255, defects visible in this view
    polygon: list[tuple[float, float]]  # cell outline in image coordinates
    px_per_mm: float
    extra: dict[str, Any]  # view-specific calibration (side view: belt line)


def _view_rng(scene: CellScene, view: ViewName) -> np.random.Generator:
    return np.random.default_rng([scene.seed, scene.index, VIEWS.index(view) + 1])


def _outline(inside: np.ndarray) -> list[tuple[float, float]]:
    """Polygon of the largest region of a binary image."""
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    biggest = max(contours, key=cv2.contourArea)
    poly = cv2.approxPolyDP(biggest, 0.7, True).reshape(-1, 2)
    return [(float(x), float(y)) for x, y in poly]


def _finish(
    scene: CellScene, view: ViewName, image: np.ndarray, alpha: np.ndarray, defect: np.ndarray,
    origin: tuple[int, int], ppm: float, extra: dict[str, Any],
) -> RenderedFrame:
    """Encode, and turn the region's coverage and defect extent into mask and outline."""
    x0, y0 = origin
    inside = alpha > 0.5
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]] = np.where(inside & defect, 255, 0)
    polygon = [(x + x0, y + y0) for x, y in _outline(inside)]
    return RenderedFrame(
        view=view,
        image=image,
        jpeg=encode_jpeg(image, scene.appearance.jpeg_quality),
        mask=mask,
        polygon=polygon,
        px_per_mm=ppm,
        extra=extra,
    )


def _body_centre(scene: CellScene) -> tuple[float, float]:
    """Where the body's centre lies (mm from the optical axis) so that the whole outline,
    tabs included, is centred on the pose: the tabs make the outline longer on one side."""
    u0, u1, _, _ = patch_bounds(scene.spec)
    cos_t, sin_t = rotation(scene.pose.rotation_deg)
    offset = (u0 + u1) / 2
    return scene.pose.x_mm - cos_t * offset, scene.pose.y_mm - sin_t * offset


def _top_region(scene: CellScene, size: tuple[int, int], ppm: float) -> tuple[int, int, int, int]:
    """Image region (x0, y0, x1, y1) that holds the whole cell at its pose."""
    width, height = size
    cos_t, sin_t = rotation(scene.pose.rotation_deg)
    u0, u1, v0, v1 = patch_bounds(scene.spec)
    corners = np.array([(u, v) for u in (u0, u1) for v in (v0, v1)])
    body_x, body_y = _body_centre(scene)
    xs = (cos_t * corners[:, 0] - sin_t * corners[:, 1] + body_x) * ppm + width / 2
    ys = (sin_t * corners[:, 0] + cos_t * corners[:, 1] + body_y) * ppm + height / 2
    return (
        max(int(xs.min()) - 1, 0), max(int(ys.min()) - 1, 0),
        min(int(np.ceil(xs.max())) + 1, width), min(int(np.ceil(ys.max())) + 1, height),
    )


def render_top(scene: CellScene, size: tuple[int, int] = (640, 480)) -> RenderedFrame:
    """The camera above the belt: a shaded, textured cell at its pose on the belt."""
    width, height = size
    appearance, pose = scene.appearance, scene.pose
    rng = _view_rng(scene, "top")
    ppm = px_per_mm(appearance, width)
    x0, y0, x1, y1 = _top_region(scene, size, ppm)
    # Region pixel (i, j) -> cell frame: undo the pose (shift, then rotation), in mm.
    cos_t, sin_t = rotation(pose.rotation_deg)
    body_x, body_y = _body_centre(scene)
    wx = (x0 + 0.5 - width / 2) / ppm - body_x
    wy = (y0 + 0.5 - height / 2) / ppm - body_y
    affine = np.array([
        [cos_t / ppm, sin_t / ppm, cos_t * wx + sin_t * wy],
        [-sin_t / ppm, cos_t / ppm, -sin_t * wx + cos_t * wy],
    ])
    surf = surface(scene, affine, (y1 - y0, x1 - x0))
    axis = (width / 2 - 0.5, height / 2 - 0.5)
    cell = shade_region(surf, (x0, y0), axis, ppm, affine, patch_bounds(scene.spec), appearance, rng)

    light = place_lights(appearance).centre
    light_xy = (axis[0] + light[0] * ppm, axis[1] + light[1] * ppm)
    away = np.array([axis[0] - light_xy[0], axis[1] - light_xy[1]], np.float32)
    away *= 6.0 / max(float(np.hypot(*away)), 1.0)
    shadow = drop_shadow(cell[3], (x0, y0), size, (float(away[0]), float(away[1])), 0.45)
    image = develop(cell, (x0, y0), belt(rng, appearance, size, light_xy, shadow), appearance, rng)
    return _finish(scene, "top", image, cell[3], surf.defect > _MASK_SHARE, (x0, y0), ppm, {})


def _without_defects(scene: CellScene) -> CellScene:
    """The same cell with its labelled defects taken away (in-spec effects stay)."""
    _, severities = scene.labels()
    return replace(
        scene,
        swelling_mm=0.0 if severities["swelling"] > 0 else scene.swelling_mm,
        deformations=tuple(d for d in scene.deformations if severities[d.kind] == 0),
    )


def _side_coverage(
    scene: CellScene, u0: float, width: int, z_high: np.ndarray, ppm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact pixel coverage of the cell's silhouette, and its top (mm) per column.

    The silhouette of each column spans from the lowest underside to the highest top over
    the cell's depth; each pixel's share of that span is its coverage.
    """
    _, _, half_v = outline_box(scene.spec)
    depth_rows = int(np.ceil((2 * half_v + 12.0) / _SIDE_DEPTH_STEP_MM))
    affine = np.array([[1.0 / ppm, 0.0, u0], [0.0, _SIDE_DEPTH_STEP_MM, -half_v - 6.0]])
    surf = surface(scene, affine, (depth_rows, width))
    inside = surf.sdf <= 0
    top = np.where(inside, surf.top, -np.inf).max(axis=0)
    bottom = np.where(inside, surf.bottom, np.inf).min(axis=0)
    covered = np.minimum(top[None, :], z_high) - np.maximum(bottom[None, :], z_high - 1.0 / ppm)
    return np.clip(covered * ppm, 0.0, 1.0).astype(np.float32), top


def render_side(scene: CellScene, size: tuple[int, int] = (640, 480)) -> RenderedFrame:
    """The camera beside the belt: the cell's silhouette against a backlight panel."""
    width, height = size
    appearance = scene.appearance
    rng = _view_rng(scene, "side")
    ppm = _SIDE_FOCAL_PX_AT_640 * (width / 640.0) / appearance.camera_height_mm
    horizon = height * _SIDE_HORIZON
    x = np.arange(width, dtype=np.float32)
    u0 = (0.5 - width / 2) / ppm - _body_centre(scene)[0]  # cell-frame u of column 0
    rows = np.arange(height, dtype=np.float32)[:, None]
    z_high = (horizon - rows) / ppm  # height above the belt of each row's upper edge, mm
    alpha, top = _side_coverage(scene, u0, width, z_high, ppm)
    nominal_alpha, _ = _side_coverage(_without_defects(scene), u0, width, z_high, ppm)

    backlight = 0.78 + 0.1 * np.exp(-(((x - width * rng.uniform(0.3, 0.7)) / width) ** 2))[None, :]
    belt_band = (rows >= horizon).astype(np.float32)
    background = (backlight * (1.0 - belt_band) + appearance.belt_grey * 0.5 * belt_band) * appearance.light_intensity
    film = np.array(FILMS[appearance.film][0], np.float32)
    edge_glint = 0.25 * np.exp(-((((z_high - top[None, :]) * ppm + 1.5) / 1.2) ** 2))
    colour = (film[:, None, None] * 0.18 + edge_glint[None]) * (appearance.light_intensity * alpha)[None]
    cell = np.ascontiguousarray(np.concatenate([colour, alpha[None]]), dtype=np.float32)
    background = np.ascontiguousarray(background, dtype=np.float32)
    image = develop(cell, (0, 0), (background, np.ones(width, np.float32)), appearance, rng)
    return _finish(scene, "side", image, alpha, nominal_alpha <= 0.5, (0, 0), ppm, {"belt_line_px": horizon})


def render(scene: CellScene, view: ViewName, size: tuple[int, int] = (640, 480)) -> RenderedFrame:
    """Render one view of a scene."""
    if view == "top":
        return render_top(scene, size)
    if view == "side":
        return render_side(scene, size)
    raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
