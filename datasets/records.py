"""Schema of a pouchline dataset: one `FrameRecord` per manifest line plus `DatasetInfo`.

Live recording, replay, training and evaluation all read and write these models, so a typo
in a field is an error (``extra="forbid"``), never a silently ignored key.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

#: Labels of the synthetic renderer. Imported datasets bring their own class names.
SYNTH_CLASSES: tuple[str, ...] = ("ok", "swollen", "deformed")

#: Deformation kinds the renderer knows, each with its own severity (millimetres).
DEFORMATION_KINDS: tuple[str, ...] = (
    "dent",
    "crease",
    "bent_corner",
    "edge_wrinkle",
    "warp",
    "tab_damage",
)

#: Every severity key a synthetic record carries.
SEVERITY_KINDS: tuple[str, ...] = ("swelling", *DEFORMATION_KINDS)

View = Literal["top", "side", "crop"]

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def is_identifier(value: object) -> bool:
    """Whether ``value`` is an id (see `check_identifier`); the whole string must match, so a
    trailing newline is refused too (``$`` would let it through)."""
    return type(value) is str and _ID_RE.fullmatch(value) is not None


def check_identifier(value: str, what: str) -> str:
    """Ids end up in file names, ZeroMQ topics and URLs: keep them to a safe alphabet."""
    if not is_identifier(value):
        raise ValueError(f"{what} {value!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return value


def check_relative_path(value: str) -> str:
    """Record paths are relative to the dataset folder and may never leave it."""
    if not value or value.startswith(("/", "\\")) or "\\" in value:
        raise ValueError(f"path {value!r} must be relative, with '/' separators")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"path {value!r} must not contain empty, '.' or '..' parts")
    return value


class GroundTruth(BaseModel):
    """What the renderer knows exactly about a frame (absent for recorded/imported frames)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(description="Dataset seed; with `index` it reproduces the frame exactly.")
    index: int = Field(ge=0, description="Index of the cell within the synthetic run.")
    px_per_mm: float = Field(gt=0, description="Camera calibration at the conveyor plane.")
    swelling_mm: float = Field(ge=0, description="True dome height above nominal thickness, in or out of spec.")
    swelling_pct: float = Field(ge=0, description="swelling_mm as % of the nominal thickness.")
    polygon: list[tuple[float, float]] = Field(
        min_length=3, description="Outline of the cell (pouch and tabs) in image pixel coordinates."
    )
    render: dict[str, Any] = Field(description="Every render parameter drawn for this frame.")


class FrameRecord(BaseModel):
    """One line of ``manifest.jsonl``: a frame, where its image is, and what it shows."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Unique frame id within the dataset.")
    image: str = Field(description="Image path relative to the dataset folder.")
    sha256: str = Field(description="SHA-256 of the image file's bytes (hex).")
    width: int = Field(gt=0, description="Image width in pixels.")
    height: int = Field(gt=0, description="Image height in pixels.")
    channels: Literal[1, 3] = Field(3, description="1 for grayscale, 3 for colour images.")
    view: View = Field(description="top/side camera view, or 'crop' for pre-aligned single-cell crops.")
    station: str = Field(description="Station that captured the frame.")
    camera: str = Field(description="Camera within the station.")
    lot: str = Field(description="Production lot of the cell.")
    cell: str = Field(description="Cell id; all views of one cell share it (and its split).")
    timestamp: float = Field(description="Capture time, seconds since the Unix epoch.")
    labels: list[str] = Field(min_length=1, description="Class labels; 'ok' excludes every other.")
    severities: dict[str, float] = Field(
        default_factory=dict, description="Per-kind defect severity in mm; 0 when the kind is within spec."
    )
    mask: str | None = Field(None, description="Defect mask PNG relative to the dataset folder.")
    ground_truth: GroundTruth | None = Field(None, description="Exact renderer truth (synthetic frames).")
    meta: dict[str, Any] = Field(default_factory=dict, description="Free metadata (importer columns, ...).")

    @field_validator("id", "station", "camera", "lot", "cell")
    @classmethod
    def _identifier(cls, value: str, info: Any) -> str:
        return check_identifier(value, info.field_name)

    @field_validator("image", "mask")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        return None if value is None else check_relative_path(value)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if not _SHA_RE.fullmatch(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @field_validator("severities")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for kind, severity in value.items():
            if severity < 0:
                raise ValueError(f"severity of {kind!r} is negative ({severity})")
        return value

    @model_validator(mode="after")
    def _labels_consistent(self) -> FrameRecord:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels {self.labels} repeat a label")
        if "ok" in self.labels and len(self.labels) > 1:
            raise ValueError(f"labels {self.labels}: 'ok' cannot be combined with a defect label")
        return self


class Splits(BaseModel):
    """Deterministic split by cell id: every view of a cell lands in the same split."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="Salt of the cell-id hash; change it for another split.")
    fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        description="Split name -> fraction of cells; fractions sum to 1.",
    )

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(f < 0 for f in value.values()) or abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions {value} must be non-negative and sum to 1")
        return value


class DatasetInfo(BaseModel):
    """Contents of ``dataset.json``: what every record of the dataset is measured against."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this dataset format.")
    name: str = Field(description="Human-readable dataset name.")
    classes: list[str] = Field(min_length=1, description="Every label a record may carry.")
    aligned_crops: bool = Field(
        False, description="Images are already aligned single-cell crops (the locate step is skipped)."
    )
    spec: dict[str, Any] | None = Field(None, description="Cell spec the labels were derived from.")
    splits: Splits = Field(default_factory=Splits, description="How cells are split.")
    source: dict[str, Any] = Field(default_factory=dict, description="Provenance: synth args, import source.")

    @field_validator("schema_version")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is not supported (this pouchline reads {SCHEMA_VERSION})")
        return value

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"classes {value} repeat a name")
        for name in value:
            check_identifier(name, "class name")
        return value
