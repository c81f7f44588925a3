"""Cell specification: nominal pouch-cell geometry and the limits that turn measurements into labels.

Labels are derived from the spec, not drawn directly, so that in-spec swelling and cosmetic
marks exist among the ``ok`` cells exactly as they do on a real line.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pouchline.datasets.records import DEFORMATION_KINDS


class DeformationLimits(BaseModel):
    """Largest severity (mm) of each deformation kind that still passes inspection."""

    model_config = ConfigDict(extra="forbid")

    dent: float = Field(0.3, gt=0, description="Dent depth below the surrounding surface.")
    crease: float = Field(0.2, gt=0, description="Depth of a crease or fold line.")
    bent_corner: float = Field(1.0, gt=0, description="Lift of a bent corner's tip above the belt.")
    edge_wrinkle: float = Field(0.25, gt=0, description="Amplitude of ripples along a long edge.")
    warp: float = Field(0.8, gt=0, description="Sag of a bend across the whole cell.")
    tab_damage: float = Field(1.0, gt=0, description="Displacement of a tab's tip from its nominal place.")

    def limit(self, kind: str) -> float:
        """Limit of one deformation kind (KeyError for an unknown kind)."""
        if kind not in DEFORMATION_KINDS:
            raise KeyError(f"unknown deformation kind {kind!r}; known: {', '.join(DEFORMATION_KINDS)}")
        return float(getattr(self, kind))


class CellSpec(BaseModel):
    """Nominal dimensions of a pouch cell (millimetres) and its acceptance limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("PL-5060100", description="Product code of the cell.")
    length_mm: float = Field(100.0, gt=10, le=400, description="Body length, along the tabs' axis.")
    width_mm: float = Field(60.0, gt=10, le=300, description="Body width.")
    thickness_mm: float = Field(5.0, gt=0.5, le=20, description="Nominal body thickness.")
    corner_radius_mm: float = Field(3.0, ge=0, description="Radius of the body's corners seen from above.")
    shoulder_mm: float = Field(2.0, gt=0, description="Width of the rounded shoulder from seal to full thickness.")
    top_seal_mm: float = Field(6.0, gt=0, description="Seal width on the tab side.")
    bottom_seal_mm: float = Field(4.0, gt=0, description="Seal width opposite the tabs.")
    wing_mm: float = Field(3.0, gt=0, description="Width of each folded side wing seen from above.")
    seal_height_mm: float = Field(0.3, gt=0, description="Thickness of the sealed laminate.")
    tab_width_mm: float = Field(10.0, gt=0, description="Width of each tab.")
    tab_length_mm: float = Field(12.0, gt=0, description="How far each tab sticks out of the top seal.")
    tab_spacing_mm: float = Field(30.0, gt=0, description="Distance between the two tabs' centres.")
    swelling_limit_pct: float = Field(
        5.0, gt=0, description="A cell is 'swollen' when swelling exceeds this % of nominal thickness."
    )
    deformation_limits: DeformationLimits = Field(
        default_factory=DeformationLimits, description="Per-kind limits for the 'deformed' label."
    )

    @model_validator(mode="after")
    def _tabs_fit(self) -> CellSpec:
        if self.tab_spacing_mm + self.tab_width_mm > self.width_mm:
            raise ValueError(
                f"tabs do not fit: tab_spacing_mm + tab_width_mm = "
                f"{self.tab_spacing_mm + self.tab_width_mm} > width_mm {self.width_mm}"
            )
        return self

    @property
    def swelling_limit_mm(self) -> float:
        """Swelling (mm) above which a cell is labelled swollen."""
        return self.thickness_mm * self.swelling_limit_pct / 100.0

    @property
    def outline_mm(self) -> tuple[float, float]:
        """Overall length (seals and tabs included) and width (wings included)."""
        length = self.bottom_seal_mm + self.length_mm + self.top_seal_mm + self.tab_length_mm
        return length, self.width_mm + 2 * self.wing_mm

    def labels(self, swelling_mm: float, deformations: dict[str, float]) -> tuple[list[str], dict[str, float]]:
        """Labels and per-kind severities from measured swelling and deformation magnitudes.

        A severity is the measured magnitude when it exceeds the kind's limit and 0 otherwise,
        so an ``ok`` cell always has every severity 0.
        """
        severities = {"swelling": swelling_mm if swelling_mm > self.swelling_limit_mm else 0.0}
        for kind in DEFORMATION_KINDS:
            magnitude = deformations.get(kind, 0.0)
            severities[kind] = magnitude if magnitude > self.deformation_limits.limit(kind) else 0.0
        labels = []
        if severities["swelling"] > 0:
            labels.append("swollen")
        if any(severities[kind] > 0 for kind in DEFORMATION_KINDS):
            labels.append("deformed")
        return labels or ["ok"], severities
