"""Top-view shading of the cell's height field: laminate film, tabs, labels under ring or bar light.

Foil is a glossy mirror, so its look is dominated by what it reflects: each pixel's mirror
ray (from the surface normal) is traced to the light's plane and lit where it hits the
ring or the bar. A swollen dome tilts the normals and so bends and moves those highlights,
as it does on a real line; diffuse shading and a brushed texture sit underneath.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pouchline.datasets import kernels
from pouchline.datasets.geometry import FILM, SEAL, SEALANT, TAB_AL, TAB_NI, Surface
from pouchline.datasets.scene import Appearance

#: Film albedo (BGR), diffuse weight, specular weight and gloss blur per film colour.
FILMS: dict[str, tuple[tuple[float, float, float], float, float, float]] = {
    "silver": ((0.62, 0.62, 0.64), 0.55, 0.85, 0.004),
    "grey": ((0.40, 0.40, 0.42), 0.60, 0.70, 0.005),
    "black": ((0.06, 0.06, 0.07), 0.70, 0.55, 0.006),
    "blue": ((0.55, 0.28, 0.12), 0.60, 0.60, 0.005),
}
#: Other materials: albedo (BGR), diffuse weight, specular weight, gloss blur.
_MATERIALS = {
    SEALANT: ((0.18, 0.52, 0.72), 0.8, 0.30, 0.02),
    TAB_AL: ((0.80, 0.80, 0.80), 0.5, 0.90, 0.003),
    TAB_NI: ((0.52, 0.56, 0.60), 0.5, 0.70, 0.004),
}
_RING_WIDTH_MM = 9.0
#: How fast the room's reflection brightens per unit of the mirror ray's sideways lean.
_ROOM_SLOPE = 3.0
_BAR_HALF_LENGTH_MM, _BAR_HALF_WIDTH_MM = 110.0, 16.0


@dataclass(frozen=True)
class LightRig:
    """Camera and light in the belt's frame: mm from the optical axis, z up from the belt."""

    camera: tuple[float, float, float]
    centre: tuple[float, float, float]
    axis: tuple[float, float]  # bar lights: direction of the bar's long side
    kind: str


def place_lights(appearance: Appearance) -> LightRig:
    """The ring light sits around the lens; a bar light to one side at the drawn angle."""
    camera = (0.0, 0.0, appearance.camera_height_mm)
    if appearance.lighting == "ring":
        return LightRig(camera, (0.0, 0.0, appearance.ring_height_mm), (1.0, 0.0), "ring")
    angle = math.radians(appearance.bar_angle_deg)
    dx, dy = math.cos(angle), math.sin(angle)
    centre = (appearance.bar_offset_mm * dx, appearance.bar_offset_mm * dy, appearance.bar_height_mm)
    return LightRig(camera, centre, (-dy, dx), "bar")


def material_luts(film: str) -> np.ndarray:
    """Rows indexed by material id: B, G, R albedo, diffuse, specular, gloss blur."""
    table = dict(_MATERIALS)
    film_props = FILMS[film]
    table[FILM] = film_props
    table[SEAL] = (tuple(0.9 * c for c in film_props[0]), film_props[1], 0.7 * film_props[2], 2 * film_props[3])
    luts = np.zeros((6, 6), np.float32)
    for material, (colour, kd, ks, blur) in table.items():
        luts[material] = (*colour, kd, ks, blur)
    return luts


#: The film texture grid is coarse along the brushing (u) and fine across it (v).
_TEXTURE_U_STEP = 16


def brushed_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Brushed-foil texture on a grid of ``shape`` (rows across the cell, columns along it
    every `_TEXTURE_U_STEP` pixels): streaks along the cell's length, a little grain."""
    height, width = shape
    streaks = cv2.resize(rng.standard_normal((max(height // 3, 2), 1)).astype(np.float32), (width, height))
    grain = cv2.resize(rng.standard_normal((max(height // 2, 2), max(width // 2, 2))).astype(np.float32), (width, height))
    return 1.0 + 0.06 * streaks + 0.03 * grain


def label_art(label: dict[str, float], ppm: float) -> np.ndarray:
    """Printed label as a small map: 0 none, 1 paper, 2 ink (barcode bars and text lines)."""
    width, height = int(label["length_mm"] * ppm), int(label["width_mm"] * ppm)
    art = np.ones((height, width), np.uint8)
    code = np.random.default_rng(int(label["code"]))
    x = max(width // 12, 2)
    bar_bottom = int(height * 0.62)
    while x < width * 0.9:
        bar = int(code.integers(1, 4))
        if code.random() < 0.55:
            art[max(height // 8, 1) : bar_bottom, x : x + bar] = 2
        x += bar + int(code.integers(1, 3))
    for row in range(2):
        y = bar_bottom + max(height // 10, 1) + row * max(height // 7, 2)
        length = int(width * code.uniform(0.4, 0.8))
        art[y : y + max(height // 14, 1), width // 12 : width // 12 + length] = 2
    return art


def shade_region(
    surf: Surface,
    origin: tuple[int, int],
    optical_axis: tuple[float, float],
    ppm: float,
    cell_affine: np.ndarray,
    bounds: tuple[float, float, float, float],
    appearance: Appearance,
    rng: np.random.Generator,
) -> np.ndarray:
    """Premultiplied linear B, G, R and coverage planes (float32, 4 x H x W) of an image region.

    ``origin`` is the region's top-left pixel and ``optical_axis`` the image pixel under the
    camera. ``cell_affine`` maps region pixels to the cell frame (mm); film texture and
    label are drawn on a grid over the cell-frame ``bounds`` (u0, u1, v0, v1) at ``ppm``.
    """
    gx = cv2.Sobel(surf.top, cv2.CV_32F, 1, 0, ksize=3, scale=ppm / 8.0)
    gy = cv2.Sobel(surf.top, cv2.CV_32F, 0, 1, ksize=3, scale=ppm / 8.0)
    rig = place_lights(appearance)
    u0, u1, v0, v1 = bounds
    # Region pixel -> cell-frame pixel; cv2 resamples the cell-frame maps onto the region.
    to_texture = ((cell_affine - np.array([[0.0, 0.0, u0], [0.0, 0.0, v0]])) * ppm).astype(np.float32)
    region = (surf.top.shape[1], surf.top.shape[0])
    inverse = cv2.WARP_INVERSE_MAP
    grain = brushed_texture(rng, (int(np.ceil((v1 - v0) * ppm)), int(np.ceil((u1 - u0) * ppm / _TEXTURE_U_STEP))))
    to_grain = to_texture * np.float32([[1.0 / _TEXTURE_U_STEP], [1.0]])
    texture = cv2.warpAffine(grain, to_grain, region, flags=cv2.INTER_LINEAR | inverse, borderMode=cv2.BORDER_REPLICATE)
    texture *= np.float32(appearance.light_intensity)
    label = np.zeros(surf.top.shape, np.uint8)
    if appearance.label is not None:
        art = label_art(appearance.label, ppm)
        to_art = to_texture - np.float32([[0, 0, (appearance.label["u"] - u0) * ppm], [0, 0, (appearance.label["v"] - v0) * ppm]])
        label = cv2.warpAffine(art, to_art, region, flags=cv2.INTER_NEAREST | inverse, borderValue=0)
    ring = np.array(
        [rig.kind == "ring", appearance.ring_radius_mm, _RING_WIDTH_MM, _BAR_HALF_LENGTH_MM, _BAR_HALF_WIDTH_MM],
        np.float32,
    )
    angle = math.radians(appearance.room_angle_deg)
    room = np.array([appearance.room_light, math.cos(angle), math.sin(angle), _ROOM_SLOPE], np.float32)
    out = np.empty((4, *surf.top.shape), np.float32)
    kernels.shade_kernel(
        surf.top, gx, gy, surf.material, surf.sdf, texture, label, origin[0], origin[1],
        np.array([optical_axis[0], optical_axis[1], 1.0 / ppm], np.float32), np.array(rig.camera, np.float32),
        np.array(rig.centre, np.float32), ring, np.array(rig.axis, np.float32), room, material_luts(appearance.film), out,
    )
    return out
