"""Pouch-cell geometry as height fields in millimetres, in the cell's own frame.

The cell frame has ``u`` along the body length (tabs towards +u) and ``v`` across it, with
the body centre at the origin. Every view samples the same `surface` on its own grid, so the
top and side cameras see one and the same cell. The per-pixel work is one compiled pass
(`pouchline.datasets.kernels.surface_kernel`); this module packs the scene for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from pouchline.datasets import kernels
from pouchline.datasets.records import DEFORMATION_KINDS
from pouchline.datasets.scene import CellScene, Deformation
from pouchline.datasets.spec import CellSpec

# Material ids of the `Surface.material` map (kept in step with kernels.py).
BELT, FILM, SEAL, SEALANT, TAB_AL, TAB_NI = range(6)

#: Order of a deformation's shape parameters in the packed array, per kind.
_PARAM_ORDER: dict[str, tuple[str, ...]] = {
    "dent": ("u", "v", "radius_mm"),
    "crease": ("u", "v", "angle_deg", "length_mm", "width_mm"),
    "bent_corner": ("corner", "fold_mm"),
    "edge_wrinkle": ("side", "u", "length_mm", "wavelength_mm", "phase", "decay_mm"),
    "warp": ("along_length", "arch"),
    "tab_damage": ("tab", "mode"),
}


@dataclass
class Surface:
    """Sampled geometry: where the cell is, how high its surfaces are, what they are made of."""

    sdf: np.ndarray  # signed distance to the outline (pouch and tabs), mm, negative inside
    bottom: np.ndarray  # underside above the belt, mm
    top: np.ndarray  # top surface above the belt, mm
    material: np.ndarray  # uint8 material id
    defect: np.ndarray  # largest change made by a labelled defect, as a share of its severity


def outline_box(spec: CellSpec) -> tuple[float, float, float]:
    """Centre (along u) and half sizes of the sealed pouch outline, tabs excluded."""
    centre = (spec.top_seal_mm - spec.bottom_seal_mm) / 2
    half_u = spec.length_mm / 2 + (spec.top_seal_mm + spec.bottom_seal_mm) / 2
    return centre, half_u, spec.width_mm / 2 + spec.wing_mm


def patch_bounds(spec: CellSpec, margin_mm: float = 6.0) -> tuple[float, float, float, float]:
    """Region of the cell frame that any drawn cell (tabs and damage included) stays inside."""
    half_l = spec.length_mm / 2
    _, _, half_v = outline_box(spec)
    return (
        -half_l - spec.bottom_seal_mm - margin_mm,
        half_l + spec.top_seal_mm + spec.tab_length_mm + margin_mm,
        -half_v - margin_mm,
        half_v + margin_mm,
    )


def _pack_spec(spec: CellSpec) -> np.ndarray:
    return np.array(
        [
            spec.length_mm / 2, spec.width_mm / 2, spec.thickness_mm, spec.corner_radius_mm,
            spec.shoulder_mm, spec.top_seal_mm, spec.bottom_seal_mm, spec.wing_mm,
            spec.seal_height_mm, spec.tab_width_mm, spec.tab_length_mm, spec.tab_spacing_mm,
        ],
        np.float32,
    )


def _pack_deformations(scene: CellScene) -> tuple[np.ndarray, ...]:
    """Kinds, magnitudes, shape parameters, labelled flags and tab damage for the kernel."""
    _, severities = scene.labels()
    count = len(scene.deformations)
    kinds = np.zeros(count, np.int64)
    magnitudes = np.zeros(count, np.float32)
    params = np.zeros((count, 6), np.float32)
    labelled = np.zeros(count, np.bool_)
    for row, deformation in enumerate(scene.deformations):
        kinds[row] = DEFORMATION_KINDS.index(deformation.kind)
        magnitudes[row] = deformation.magnitude
        params[row, : len(_PARAM_ORDER[deformation.kind])] = [
            deformation.params[name] for name in _PARAM_ORDER[deformation.kind]
        ]
        labelled[row] = severities[deformation.kind] > 0
    tabs = np.array([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], np.float32)
    for deformation in scene.deformations:
        if deformation.kind == "tab_damage":
            tab = int(deformation.params["tab"])
            tabs[tab] = (deformation.params["mode"], deformation.magnitude, severities["tab_damage"] > 0)
    return kinds, magnitudes, params, labelled, tabs


def _tab_zone(spec: CellSpec) -> tuple[float, float, float, float]:
    """Cell-frame box (u0, u1, v0, v1) that any tab, damaged or not, stays inside."""
    exit_u = spec.length_mm / 2 + spec.top_seal_mm
    reach = spec.tab_spacing_mm / 2 + spec.tab_width_mm / 2 + 8.0
    return exit_u - 3.0, exit_u + spec.tab_length_mm + 8.0, -reach, reach


def _deformation_zone(spec: CellSpec, deformation: Deformation) -> tuple[float, float, float, float]:
    """Cell-frame box (u0, u1, v0, v1) outside which a deformation changes nothing."""
    p = deformation.params
    if deformation.kind == "dent":
        reach = 2.5 * p["radius_mm"]
        return p["u"] - reach, p["u"] + reach, p["v"] - reach, p["v"] + reach
    if deformation.kind == "crease":
        reach = p["length_mm"] / 2 + p["width_mm"]
        return p["u"] - reach, p["u"] + reach, p["v"] - reach, p["v"] + reach
    if deformation.kind == "edge_wrinkle":
        reach = p["length_mm"] / 2 + 6.0
        edge = spec.width_mm / 2
        inner, outer = edge - 12.0 * p["decay_mm"], edge + spec.wing_mm + 1.0
        v0, v1 = (inner, outer) if p["side"] > 0 else (-outer, -inner)
        return p["u"] - reach, p["u"] + reach, v0, v1
    if deformation.kind == "bent_corner":
        centre, half_u, half_v = outline_box(spec)
        corner = int(p["corner"])
        tip_u = centre + (half_u if corner & 1 else -half_u)
        tip_v = half_v if corner & 2 else -half_v
        reach = p["fold_mm"] * math.sqrt(2.0) + 1.0
        return tip_u - reach, tip_u + reach, tip_v - reach, tip_v + reach
    return patch_bounds(spec)


def _grid_box(affine: np.ndarray, shape: tuple[int, int], zone: tuple[float, float, float, float]) -> np.ndarray:
    """Rows and columns (j0, j1, i0, i1) of a grid that cover a cell-frame box."""
    to_grid = np.linalg.inv(np.vstack([affine, [0.0, 0.0, 1.0]]))
    u0, u1, v0, v1 = zone
    corners = to_grid @ np.array([[u0, u0, u1, u1], [v0, v1, v0, v1], [1.0, 1.0, 1.0, 1.0]])
    i0, j0 = np.floor(corners[:2].min(axis=1)).astype(int)
    i1, j1 = np.ceil(corners[:2].max(axis=1)).astype(int) + 1
    rows, cols = shape
    return np.array([max(j0, 0), min(j1, rows), max(i0, 0), min(i1, cols)], np.int64)


def surface(scene: CellScene, affine: np.ndarray, shape: tuple[int, int]) -> Surface:
    """Sample the cell's geometry on a grid of ``shape`` (rows, columns).

    ``affine`` (2x3) maps grid (column, row, 1) to the cell frame's (u, v) in millimetres:
    a rotated image region for the top camera, a (length, depth) grid for the side camera.
    """
    _, severities = scene.labels()
    affine32 = np.ascontiguousarray(affine, np.float32)
    spec = _pack_spec(scene.spec)
    swelling = np.float32(scene.swelling_mm)
    fields = np.empty((6, *shape), np.float32)
    kernels.surface_kernel(affine32, spec, swelling, bool(severities["swelling"] > 0), fields)
    out = Surface(sdf=fields[0], bottom=fields[1], top=fields[2], material=fields[5].astype(np.uint8), defect=fields[3])
    weight = fields[4]
    kinds, magnitudes, params, labelled, tabs = _pack_deformations(scene)
    box = _grid_box(affine, shape, _tab_zone(scene.spec))
    kernels.tab_kernel(affine32, spec, tabs, box, out.sdf, out.bottom, out.top, out.material, out.defect)
    for k, deformation in enumerate(scene.deformations):
        if deformation.kind == "tab_damage":
            continue
        box = _grid_box(affine, shape, _deformation_zone(scene.spec, deformation))
        kernels.deformation_kernel(
            affine32, spec, swelling, kinds[k : k + 1], magnitudes[k : k + 1], params[k : k + 1],
            labelled[k : k + 1], box, out.bottom, out.top, out.defect, weight,
        )
    return out
