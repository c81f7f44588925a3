"""Random draw of one cell on the belt: its defects, its appearance and the camera settings.

A `CellScene` is everything needed to render any view of one cell; it is drawn from a
`numpy.random.Generator` seeded by (dataset seed, cell index), so a frame depends only on
those two numbers, never on how many workers render the dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pouchline.datasets.domain import Domain, draw
from pouchline.datasets.records import DEFORMATION_KINDS
from pouchline.datasets.spec import CellSpec

#: Share of defective cells that are swollen only, deformed only, or both.
_DEFECT_MIX = {"swollen": 0.45, "deformed": 0.45, "both": 0.10}
#: Largest swelling the renderer draws (mm), the range the thickness gauge is specified on.
MAX_SWELLING_MM = 3.0
#: Defective deformations are drawn between these multiples of the kind's limit.
_DEFECT_SEVERITY = (1.5, 6.0)
#: Chance that a good cell carries in-spec swelling, and (by default) one in-spec cosmetic mark.
_OK_SWELLING_P = 0.4
COSMETIC_RATE = 0.15


@dataclass(frozen=True)
class Deformation:
    """One deformation: its kind, its magnitude in mm (the severity measure) and its shape."""

    kind: str
    magnitude: float
    params: dict[str, float]


@dataclass(frozen=True)
class Appearance:
    """Film, light, belt and sensor settings of a frame."""

    domain: str
    film: str
    lighting: str
    light_intensity: float
    light_warmth: float
    ring_radius_mm: float
    ring_height_mm: float
    bar_offset_mm: float
    bar_height_mm: float
    bar_angle_deg: float
    room_light: float
    room_angle_deg: float
    camera_height_mm: float
    exposure: float
    read_noise: float
    shot_noise: float
    blur_sigma_px: float
    vignetting: float
    jpeg_quality: int
    belt_grey: float
    label: dict[str, float] | None


@dataclass(frozen=True)
class Pose:
    """Where the cell lies: centre offset from the optical axis (mm) and rotation (degrees)."""

    x_mm: float
    y_mm: float
    rotation_deg: float


@dataclass(frozen=True)
class CellScene:
    """Everything that determines the rendered views of one cell."""

    spec: CellSpec
    swelling_mm: float
    deformations: tuple[Deformation, ...]
    appearance: Appearance
    pose: Pose
    seed: int
    index: int

    def magnitudes(self) -> dict[str, float]:
        """Largest magnitude per deformation kind present."""
        out: dict[str, float] = {}
        for deformation in self.deformations:
            out[deformation.kind] = max(out.get(deformation.kind, 0.0), deformation.magnitude)
        return out

    def labels(self) -> tuple[list[str], dict[str, float]]:
        """Labels and severities under the cell's spec."""
        return self.spec.labels(self.swelling_mm, self.magnitudes())

    def render_params(self) -> dict[str, Any]:
        """JSON-ready record of every drawn parameter (stored as ground truth)."""
        return {
            "spec": self.spec.model_dump(),
            "swelling_mm": self.swelling_mm,
            "deformations": [asdict(d) for d in self.deformations],
            "appearance": asdict(self.appearance),
            "pose": asdict(self.pose),
        }


def sample_deformation(rng: np.random.Generator, spec: CellSpec, kind: str, magnitude: float) -> Deformation:
    """Shape parameters of one deformation of a given kind and magnitude."""
    half_l, half_w = spec.length_mm / 2, spec.width_mm / 2
    inner_u, inner_v = half_l - 2 * spec.shoulder_mm - 8, half_w - 2 * spec.shoulder_mm - 8
    params: dict[str, float]
    if kind == "dent":
        params = {
            "u": draw(rng, (-inner_u, inner_u)),
            "v": draw(rng, (-inner_v, inner_v)),
            "radius_mm": draw(rng, (3.0, 7.0)),
        }
    elif kind == "crease":
        params = {
            "u": draw(rng, (-inner_u * 0.6, inner_u * 0.6)),
            "v": draw(rng, (-inner_v * 0.6, inner_v * 0.6)),
            "angle_deg": draw(rng, (0.0, 180.0)),
            "length_mm": draw(rng, (25.0, 55.0)),
            "width_mm": draw(rng, (0.8, 1.6)),
        }
    elif kind == "bent_corner":
        params = {
            "corner": float(rng.integers(0, 4)),
            "fold_mm": draw(rng, (8.0, 16.0)),
        }
    elif kind == "edge_wrinkle":
        params = {
            "side": float(rng.choice([-1.0, 1.0])),
            "u": draw(rng, (-half_l * 0.5, half_l * 0.5)),
            "length_mm": draw(rng, (25.0, 55.0)),
            "wavelength_mm": draw(rng, (3.5, 7.0)),
            "phase": draw(rng, (0.0, 2 * np.pi)),
            "decay_mm": draw(rng, (3.0, 6.0)),
        }
    elif kind == "warp":
        params = {
            "along_length": float(rng.integers(0, 2)),
            "arch": float(rng.integers(0, 2)),
        }
    elif kind == "tab_damage":
        mode = int(rng.integers(0, 4))  # 0 shifted, 1 rotated, 2 bent up, 3 torn short
        params = {"tab": float(rng.integers(0, 2)), "mode": float(mode)}
    else:
        raise ValueError(f"unknown deformation kind {kind!r}; known: {', '.join(DEFORMATION_KINDS)}")
    return Deformation(kind=kind, magnitude=float(magnitude), params=params)


def sample_appearance(rng: np.random.Generator, domain: Domain) -> Appearance:
    """Appearance of one frame drawn from a domain."""
    label = None
    if rng.random() < domain.label_probability:
        label = {
            "u": draw(rng, (-25.0, 15.0)),
            "v": draw(rng, (-12.0, 4.0)),
            "length_mm": draw(rng, (24.0, 34.0)),
            "width_mm": draw(rng, (10.0, 16.0)),
            "code": float(rng.integers(0, 2**31 - 1)),
        }
    return Appearance(
        domain=domain.name,
        film=str(rng.choice(domain.films)),
        lighting=str(rng.choice(domain.lighting)),
        light_intensity=draw(rng, domain.light_intensity),
        light_warmth=draw(rng, domain.light_warmth),
        ring_radius_mm=draw(rng, domain.ring_radius_mm),
        ring_height_mm=draw(rng, domain.ring_height_mm),
        bar_offset_mm=draw(rng, domain.bar_offset_mm),
        bar_height_mm=draw(rng, domain.bar_height_mm),
        bar_angle_deg=draw(rng, (0.0, 360.0)),
        room_light=draw(rng, domain.room_light),
        room_angle_deg=draw(rng, (0.0, 360.0)),
        camera_height_mm=draw(rng, domain.camera_height_mm),
        exposure=draw(rng, domain.exposure),
        read_noise=draw(rng, domain.read_noise),
        shot_noise=draw(rng, domain.shot_noise),
        blur_sigma_px=draw(rng, domain.blur_sigma_px),
        vignetting=draw(rng, domain.vignetting),
        jpeg_quality=int(rng.integers(domain.jpeg_quality[0], domain.jpeg_quality[1] + 1)),
        belt_grey=draw(rng, domain.belt_grey),
        label=label,
    )


def sample_scene(
    seed: int,
    index: int,
    *,
    spec: CellSpec,
    domain: Domain,
    defect_rate: float,
    kinds: tuple[str, ...] = DEFORMATION_KINDS,
    cosmetic_rate: float = COSMETIC_RATE,
) -> CellScene:
    """Draw cell ``index`` of the synthetic run ``seed``.

    With probability ``defect_rate`` the cell is defective (swollen, deformed or both, the
    deformation kind drawn from ``kinds``); otherwise it is good but may carry in-spec
    swelling or (with probability ``cosmetic_rate``) one in-spec cosmetic mark, as good cells
    on a real line do. Raising ``cosmetic_rate`` makes sets that stress false rejects on marked
    good cells; the shipped model trains and is tested at the default.
    """
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate {defect_rate} must lie in [0, 1]")
    if not 0.0 <= cosmetic_rate <= 1.0:
        raise ValueError(f"cosmetic_rate {cosmetic_rate} must lie in [0, 1]")
    unknown = set(kinds) - set(DEFORMATION_KINDS)
    if unknown:
        raise ValueError(f"unknown deformation kinds {sorted(unknown)}; known: {', '.join(DEFORMATION_KINDS)}")
    rng = np.random.default_rng([seed, index])
    limit = spec.swelling_limit_mm
    swelling, deformations = 0.0, []
    if rng.random() < defect_rate:
        names, weights = zip(*_DEFECT_MIX.items())
        if not kinds:
            mix = "swollen"
        else:
            mix = str(rng.choice(names, p=np.asarray(weights) / sum(weights)))
        if mix in ("swollen", "both"):
            swelling = draw(rng, (limit * 1.02, MAX_SWELLING_MM))
        if mix in ("deformed", "both"):
            kind = str(rng.choice(kinds))
            low, high = _DEFECT_SEVERITY
            magnitude = spec.deformation_limits.limit(kind) * draw(rng, (low, high))
            deformations.append(sample_deformation(rng, spec, kind, magnitude))
    else:
        if rng.random() < _OK_SWELLING_P:
            swelling = draw(rng, (0.0, limit * 0.98))
        if kinds and rng.random() < cosmetic_rate:
            kind = str(rng.choice(kinds))
            magnitude = spec.deformation_limits.limit(kind) * draw(rng, (0.1, 0.5))
            deformations.append(sample_deformation(rng, spec, kind, magnitude))
    appearance = sample_appearance(rng, domain)
    pose = Pose(
        x_mm=draw(rng, (-domain.max_shift_mm, domain.max_shift_mm)),
        y_mm=draw(rng, (-domain.max_shift_mm, domain.max_shift_mm)),
        rotation_deg=draw(rng, (-domain.max_rotation_deg, domain.max_rotation_deg)),
    )
    return CellScene(
        spec=spec,
        swelling_mm=swelling,
        deformations=tuple(deformations),
        appearance=appearance,
        pose=pose,
        seed=seed,
        index=index,
    )
