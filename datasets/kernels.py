"""Compiled per-pixel passes of the renderer (numba).

Vectorised NumPy needs some 150 full-image passes per frame for geometry, shading and the
sensor. Here each stage is one compiled loop over planar float32 images. The hot loops are
written without early exits or inner loops so that LLVM vectorises them (AVX2/AVX-512);
rare work (deformations, tabs) runs in separate passes. The formulas are explained where
their inputs are packed (geometry.py, shading.py, camera.py). Compiled code is cached on
disk next to this file (or in NUMBA_CACHE_DIR).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

F = np.float32
#: Fast-math flags that keep results independent of memory alignment: no approximate
#: functions or reciprocals, whose vector and scalar (loop peel) versions round differently.
_FAST = {"nnan", "ninf", "nsz", "contract"}
# Material ids (geometry.py re-exports them).
_BELT, _FILM, _SEAL, _SEALANT, _TAB_AL, _TAB_NI = 0, 1, 2, 3, 4, 5
# Deformation kind codes: index in records.DEFORMATION_KINDS.
_DENT, _CREASE, _BENT_CORNER, _EDGE_WRINKLE, _WARP, _TAB_DAMAGE = 0, 1, 2, 3, 4, 5

#: How far swelling pulls each long edge inwards, per mm of swelling.
PULL_PER_MM = F(0.12)
_WING_RISE = F(0.5)  # folded wings' height at the body side, share of nominal thickness
_TAB_Z, _TAB_THICKNESS = F(0.05), F(0.2)  # tab foil above the belt, and its thickness (mm)
_SEALANT_LENGTH = F(3.0)  # mm of tab sealant visible inside the top seal
_KNURL_PERIOD, _KNURL_DEPTH = F(0.9), F(0.04)  # ridges pressed into the seals (mm)
_AMBIENT = F(0.22)
_ZERO, _HALF, _ONE, _TWO = F(0.0), F(0.5), F(1.0), F(2.0)


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _bump(x):
    """Pillow profile: 1 at 0, 0 with zero slope at |x| >= 1."""
    q = max(_ONE - x * x, _ZERO)
    return q * math.sqrt(q)


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _box_sdf(pu, pv, half_u, half_v, radius):
    """Signed distance to a rounded rectangle centred at the origin (negative inside)."""
    qu = abs(pu) - (half_u - radius)
    qv = abs(pv) - (half_v - radius)
    ou, ov = max(qu, _ZERO), max(qv, _ZERO)
    return math.sqrt(ou * ou + ov * ov) + min(max(qu, qv), _ZERO) - radius


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def surface_kernel(affine, spec, swelling, swelling_labelled, fields) -> None:
    """Base pass: outline, body with its swelling dome, wings, seals (no deformations, no tabs).

    Pixel (row j, column i) samples the cell frame at u = a00*i + a01*j + a02,
    v = a10*i + a11*j + a12 (mm). ``fields`` planes receive, in order: outline distance,
    underside, top, defect extent, mark weight (how strongly surface marks show: full on
    the body, damped towards its edges) and material id. One output array lets LLVM
    vectorise the loop (no aliasing between outputs to rule out).
    """
    half_l, half_w0, thickness, corner, shoulder = spec[0], spec[1], spec[2], spec[3], spec[4]
    top_seal, bottom_seal, wing_w, seal_h = spec[5], spec[6], spec[7], spec[8]
    out_centre = (top_seal - bottom_seal) * _HALF
    out_half_u = half_l + (top_seal + bottom_seal) * _HALF
    inv_shoulder = _ONE / shoulder
    inv_inner_l = _ONE / (half_l - shoulder)
    inv_wing = _ONE / wing_w
    pull = PULL_PER_MM * swelling
    score_scale = _ONE / swelling if swelling_labelled and swelling > _ZERO else _ZERO
    a00, a01, a02 = affine[0, 0], affine[0, 1], affine[0, 2]
    a10, a11, a12 = affine[1, 0], affine[1, 1], affine[1, 2]
    for j in range(fields.shape[1]):
        for i in range(fields.shape[2]):
            u = a00 * F(i) + a01 * F(j) + a02
            v = a10 * F(i) + a11 * F(j) + a12
            along = _bump(u * inv_inner_l)
            half_w = half_w0 - pull * along
            pouch = _box_sdf(u - out_centre, v, out_half_u, half_w + wing_w, F(1.0))
            depth = -_box_sdf(u, v, half_l, half_w, corner)
            t = min(max(depth * inv_shoulder, _ZERO), _ONE)
            profile = math.sqrt(_ONE - (_ONE - t) * (_ONE - t))
            in_body = depth > _ZERO
            dome = swelling * along * _bump(v / (half_w - shoulder)) * profile if in_body else _ZERO
            beside = abs(v) - half_w
            in_wing = (depth <= _ZERO) & (beside >= _ZERO) & (beside <= wing_w) & (abs(u) <= half_l)
            in_pouch = pouch <= _ZERO
            phase = u * (_ONE / _KNURL_PERIOD)
            knurl = seal_h + _KNURL_DEPTH * abs(phase - np.floor(phase) - _HALF)
            wing_h = seal_h + _WING_RISE * thickness * math.sqrt(max(_ONE - beside * inv_wing, _ZERO))
            body_h = seal_h + (thickness - seal_h) * profile + dome
            height = body_h if in_body else (wing_h if in_wing else (knurl if in_pouch else _ZERO))
            film = in_body | in_wing
            fields[0, j, i] = pouch
            fields[1, j, i] = _ZERO
            fields[2, j, i] = height
            fields[3, j, i] = dome * score_scale
            fields[4, j, i] = (F(0.3) + F(0.7) * profile) if in_body else (F(0.3) if in_wing else _ZERO)
            fields[5, j, i] = F(_FILM) if film else (F(_SEAL) if in_pouch else F(_BELT))


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def deformation_kernel(affine, spec, swelling, kinds, magnitudes, params, labelled, box, bottom, top, defect, weight) -> None:
    """Add dents, creases, edge wrinkles (surface marks) and warp, bent corners (lift) over
    the pixel ``box`` (row from, row to, column from, column to) they can reach."""
    half_w0, wing_w = spec[1], spec[7]
    top_seal, bottom_seal = spec[5], spec[6]
    out_centre = (top_seal - bottom_seal) * _HALF
    out_half_u = spec[0] + (top_seal + bottom_seal) * _HALF
    out_half_v = half_w0 + wing_w
    inv_inner_l = _ONE / (spec[0] - spec[4])
    for j in range(box[0], box[1]):
        for i in range(box[2], box[3]):
            u = affine[0, 0] * F(i) + affine[0, 1] * F(j) + affine[0, 2]
            v = affine[1, 0] * F(i) + affine[1, 1] * F(j) + affine[1, 2]
            marks, lift, score = _ZERO, _ZERO, defect[j, i]
            for k in range(kinds.size):
                kind, m = kinds[k], magnitudes[k]
                field = _ZERO
                if kind == _DENT:
                    sigma = params[k, 2] * _HALF
                    d2 = (u - params[k, 0]) ** 2 + (v - params[k, 1]) ** 2
                    field = m * math.exp(-d2 / (_TWO * sigma * sigma)) if d2 < F(25.0) * sigma * sigma else _ZERO
                    marks -= field
                elif kind == _CREASE:
                    angle = math.radians(params[k, 2])
                    du, dv = u - params[k, 0], v - params[k, 1]
                    along_c = du * math.cos(angle) + dv * math.sin(angle)
                    across = -du * math.sin(angle) + dv * math.cos(angle)
                    taper = min(max((params[k, 3] * _HALF - abs(along_c)) / F(5.0), _ZERO), _ONE)
                    field = m * max(_ONE - abs(across) / params[k, 4], _ZERO) * taper
                    marks -= field
                elif kind == _EDGE_WRINKLE:
                    half_w = half_w0 - PULL_PER_MM * swelling * _bump(u * inv_inner_l)
                    inside = half_w - params[k, 0] * v
                    taper = min(max((params[k, 2] * _HALF - abs(u - params[k, 1])) / F(6.0), _ZERO), _ONE)
                    if inside > -_ONE and taper > _ZERO:
                        field = m * math.exp(-max(inside, _ZERO) / params[k, 5]) * taper
                        marks += field * math.sin(F(2 * math.pi) * (u - params[k, 1]) / params[k, 3] + params[k, 4])
                elif kind == _WARP:
                    x = (u - out_centre) / out_half_u if params[k, 0] > _HALF else v / out_half_v
                    field = m * (max(_ONE - x * x, _ZERO) if params[k, 1] > _HALF else min(x * x, _ONE))
                    lift += field
                elif kind == _BENT_CORNER:
                    c = int(params[k, 0])
                    su = _ONE if c & 1 else -_ONE
                    sv = _ONE if c & 2 else -_ONE
                    to_tip = ((out_centre + su * out_half_u - u) * su + (sv * out_half_v - v) * sv) * F(1 / math.sqrt(2))
                    field = max(params[k, 1] - to_tip, _ZERO) * (m / params[k, 1])
                    lift += field
                if labelled[k] and m > _ZERO:
                    score = max(score, field / m)
            top[j, i] += marks * weight[j, i] + lift
            bottom[j, i] += lift
            defect[j, i] = score


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _tab_sdf(tab, u, v, spec, tabs):
    """Distance to one tab as built and as nominal, and the tab's lift (bent tabs).

    ``tabs[tab]`` is (damage mode or -1, magnitude, labelled).
    """
    exit_u = spec[0] + spec[5]
    half_w, length = spec[9] * _HALF, spec[10]
    centre = -spec[11] * _HALF if tab == 0 else spec[11] * _HALF
    tu, tv = u - exit_u, v - centre
    nominal = _box_sdf(tu - length * _HALF, tv, length * _HALF, half_w, _HALF)
    lift, tab_length = _ZERO, length
    direction = _ONE if tab == 0 else -_ONE
    mode, magnitude = int(tabs[tab, 0]), tabs[tab, 1]
    if mode == 0:  # shifted sideways towards the other tab
        tv = tv - magnitude * direction
    elif mode == 1:  # rotated about its exit from the seal
        angle = math.asin(min(magnitude / length, F(0.9))) * direction
        tu, tv = tu * math.cos(angle) + tv * math.sin(angle), -tu * math.sin(angle) + tv * math.cos(angle)
    elif mode == 2:  # bent up: tip lifted by the magnitude, foreshortened from above
        angle = math.asin(min(magnitude / length, F(0.95)))
        tab_length = length * math.cos(angle)
        lift = max(tu, _ZERO) * math.tan(angle)
    elif mode == 3:  # torn short with a ragged end
        tab_length = length - min(magnitude, F(0.8) * length)
        tu = tu + F(0.6) * math.sin(tv * F(1.7))
    return _box_sdf(tu - tab_length * _HALF, tv, tab_length * _HALF, half_w, _HALF), nominal, lift


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def tab_kernel(affine, spec, tabs, box, sdf, bottom, top, material, defect) -> None:
    """Tabs and their sealant, and the extent of tab damage, over the pixel ``box``
    (row from, row to, column from, column to) that holds the tab end of the cell."""
    exit_u = spec[0] + spec[5]
    half_spacing, tab_half_w = spec[11] * _HALF, spec[9] * _HALF
    reach = tab_half_w + F(8.0)
    damaged = (tabs[0, 2] > 0) or (tabs[1, 2] > 0)
    for j in range(box[0], box[1]):
        for i in range(box[2], box[3]):
            u = affine[0, 0] * F(i) + affine[0, 1] * F(j) + affine[0, 2]
            v = affine[1, 0] * F(i) + affine[1, 1] * F(j) + affine[1, 2]
            if u < exit_u - _TWO or abs(abs(v) - half_spacing) > reach:
                continue
            pouch = sdf[j, i]
            if pouch <= _ZERO and u > exit_u - _SEALANT_LENGTH and abs(abs(v) - half_spacing) < tab_half_w + F(1.5):
                material[j, i] = _SEALANT
            moved, was = False, False
            for tab in range(2):
                tab_sdf, nominal, tab_lift = _tab_sdf(tab, u, v, spec, tabs)
                sdf[j, i] = min(sdf[j, i], tab_sdf)
                if tab_sdf <= _ZERO and pouch > _ZERO:
                    material[j, i] = _TAB_AL if tab == 0 else _TAB_NI
                    top[j, i] = _TAB_Z + _TAB_THICKNESS + tab_lift
                    bottom[j, i] = _TAB_Z + tab_lift
                    if tabs[tab, 2] > 0 and tab_lift > _ZERO:
                        defect[j, i] = max(defect[j, i], tab_lift / tabs[tab, 1])
                moved = moved or tab_sdf <= _ZERO
                was = was or nominal <= _ZERO
            if damaged and moved != was and pouch > _ZERO:
                defect[j, i] = max(defect[j, i], _ONE)


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _column(luts, column):
    """One property of every material, as a tuple held in registers."""
    return luts[0, column], luts[1, column], luts[2, column], luts[3, column], luts[4, column], luts[5, column]


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _pick(mat, values):
    """``values[mat]`` as a chain of selects: table look-ups would stop vectorisation."""
    return (
        values[1] if mat == 1 else values[2] if mat == 2 else values[3] if mat == 3
        else values[4] if mat == 4 else values[5] if mat == 5 else values[0]
    )


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def shade_kernel(top, gx, gy, material, sdf, texture, label, x0, y0, px_to_mm, camera, light, ring, bar_axis, room, luts, out) -> None:
    """Premultiplied linear B, G, R and coverage planes (out[0..3]) of the cell in an image region.

    Lighting is done in the belt's frame (mm, z up): ``px_to_mm`` is (centre x, centre y,
    mm per pixel) of the optical axis; ``gx``/``gy`` are surface slopes along image x/y.
    Each pixel's mirror ray is traced to the light's plane: lit where it meets the ring (a
    smooth band of the ring's width) or the bar. ``texture`` (film grain) and ``label``
    (0 none, 1 paper, 2 ink) are already resampled onto the region. ``ring`` is (is_ring,
    radius, width, bar half length, bar half width); ``luts`` rows are material ids with
    columns (B, G, R albedo, diffuse, specular, gloss blur).
    """
    cam_x, cam_y, cam_z = camera[0], camera[1], camera[2]
    light_x, light_y, light_z = light[0], light[1], light[2]
    ring_on = ring[0]
    radius_ring, inv_ring_w, bar_half_l, bar_half_w = ring[1], _ONE / ring[2], ring[3], ring[4]
    ax, ay = bar_axis[0], bar_axis[1]
    cx, cy, mm = px_to_mm[0], px_to_mm[1], px_to_mm[2]
    inv_mm = _ONE / mm
    albedo_b, albedo_g, albedo_r = _column(luts, 0), _column(luts, 1), _column(luts, 2)
    diffuse, specular_k, gloss_blur = _column(luts, 3), _column(luts, 4), _column(luts, 5)
    for j in range(top.shape[0]):
        py = (F(y0 + j) - cy) * mm
        for i in range(top.shape[1]):
            px = (F(x0 + i) - cx) * mm
            coverage = min(max(_HALF - sdf[j, i] * inv_mm, _ZERO), _ONE)
            z = top[j, i]
            g_x, g_y = gx[j, i], gy[j, i]
            inv = _ONE / math.sqrt(g_x * g_x + g_y * g_y + _ONE)
            nx, ny, nz = -g_x * inv, -g_y * inv, inv
            vx, vy, vz = cam_x - px, cam_y - py, cam_z - z
            vinv = _ONE / math.sqrt(vx * vx + vy * vy + vz * vz)
            vx, vy, vz = vx * vinv, vy * vinv, vz * vinv
            twice = _TWO * (nx * vx + ny * vy + nz * vz)
            rx, ry, rz = twice * nx - vx, twice * ny - vy, twice * nz - vz
            mat = material[j, i]
            travel = (light_z - z) / max(rz, F(0.05))
            hx = px + travel * rx - light_x
            hy = py + travel * ry - light_y
            spread = _ONE + _pick(mat, gloss_blur) * travel
            dr = (math.sqrt(hx * hx + hy * hy) - radius_ring) * inv_ring_w / spread
            fall = max(_ONE - F(0.25) * dr * dr, _ZERO)
            soft = F(4.0) * spread
            along = abs(hx * ax + hy * ay)
            across = abs(hy * ax - hx * ay)
            bar = min(max((bar_half_l - along) / soft, _ZERO), _ONE) * min(
                max((bar_half_w - across) / soft + _HALF, _ZERO), _ONE
            )
            highlight = (ring_on * fall * fall * fall + (_ONE - ring_on) * bar) if rz > F(0.05) else _ZERO
            surround = room[0] * min(max(_HALF + room[3] * (rx * room[1] + ry * room[2]), _ZERO), _ONE)
            highlight = highlight + surround
            lx, ly, lz = light_x - px, light_y - py, light_z - z
            lambert = max((nx * lx + ny * ly + nz * lz) / math.sqrt(lx * lx + ly * ly + lz * lz), _ZERO)
            art = label[j, i] if mat == _FILM else np.uint8(0)
            grey = F(0.86) if art == 1 else F(0.06)
            b = grey if art > 0 else _pick(mat, albedo_b)
            g = grey + F(0.01) if art > 0 else _pick(mat, albedo_g)
            r = grey + F(0.01) if art > 0 else _pick(mat, albedo_r)
            specular = F(0.08) if art > 0 else _pick(mat, specular_k)
            tex = texture[j, i]
            shade = (_AMBIENT + _pick(mat, diffuse) * lambert) * tex * coverage
            gloss = specular * highlight * tex * coverage
            out[0, j, i] = b * shade + gloss
            out[1, j, i] = g * shade + gloss
            out[2, j, i] = r * shade + gloss
            out[3, j, i] = coverage


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _quantise(value):
    return np.uint8(min(max(value * F(255.0) + _HALF, _ZERO), F(255.0)))


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def develop_kernel(background, columns, vignetting, cell, x0, y0, tint, noise, sign, shot, read, out) -> None:
    """Premultiplied cell planes (B, G, R, coverage; region at x0, y0) over the background.

    The background's brightness is ``background`` times a per-column factor ``columns``
    (the belt's weave). Then light tint (times exposure gain), vignetting (the corners
    lose ``vignetting`` of their light), shot and read
    noise (level set by the green channel; ``noise`` is Gaussian noise in int8 planes,
    times ``sign`` it has unit variance) and quantisation into the B, G, R planes of ``out``.
    """
    read2 = read * read
    tb, tg, tr = tint[0], tint[1], tint[2]
    height, width = background.shape
    half_w, half_h = F(width) * _HALF, F(height) * _HALF
    inv_r2 = _ONE / (half_w * half_w + half_h * half_h)
    for y in range(height):
        j = y - y0
        row_in = 0 <= j < cell.shape[1]
        dy2 = (F(y) - half_h) * (F(y) - half_h)
        for x in range(width):
            i = x - x0
            inside = row_in and 0 <= i < cell.shape[2]
            ii, jj = (i, j) if inside else (0, 0)
            a = cell[3, jj, ii] if inside else _ZERO
            cb = cell[0, jj, ii] if inside else _ZERO
            cg = cell[1, jj, ii] if inside else _ZERO
            cr = cell[2, jj, ii] if inside else _ZERO
            r2 = ((F(x) - half_w) * (F(x) - half_w) + dy2) * inv_r2
            scale = _ONE - vignetting * r2 * (F(1.2) - F(0.2) * r2)
            ground = background[y, x] * columns[x] * (_ONE - a)
            b = (ground + cb) * tb * scale
            g = (ground + cg) * tg * scale
            r = (ground + cr) * tr * scale
            sigma = math.sqrt(max(g, _ZERO) * shot + read2) * sign
            out[0, y, x] = _quantise(b + sigma * F(noise[0, y, x]))
            out[1, y, x] = _quantise(g + sigma * F(noise[1, y, x]))
            out[2, y, x] = _quantise(r + sigma * F(noise[2, y, x]))
