"""A synthetic conveyor: rendered cells arriving at a line rate, each with its exact truth.

Cells come from the dataset renderer (`pouchline.datasets.synth.render_cell`), so cell ids,
lots, images and truth are those ``pouchline datasets synth`` writes for the same seed: a
station fed by this source exercises the whole line end to end with known answers.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pouchline.datasets.domain import load_domain
from pouchline.datasets.records import DEFORMATION_KINDS, GroundTruth
from pouchline.datasets.render import ViewName
from pouchline.datasets.spec import CellSpec
from pouchline.datasets.synth import SynthConfig, render_cell
from pouchline.station.sourcebase import BufferPolicy, CellTag, Pacer, SourceFrame, encoded_frame


class SyntheticConfig(BaseModel):
    """Rendered cells on a simulated conveyor."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["synthetic"] = Field(description="Source kind.")
    seed: int = Field(0, description="Run seed; with the cell index it determines every frame.")
    cells_per_s: float = Field(3.0, ge=0, description="Line rate in cells per second; 0 = as fast as they render.")
    defect_rate: float = Field(0.3, ge=0, le=1, description="Share of defective cells.")
    views: list[ViewName] = Field(["top"], min_length=1, description="Views rendered per cell: 'top' and/or 'side'.")
    size: tuple[int, int] = Field((640, 480), description="Frame width and height in pixels.")
    domain: str = Field("default", description="Appearance domain: a built-in name or a domain JSON file.")
    spec: CellSpec = Field(default_factory=CellSpec, description="Cell specification the labels derive from.")
    kinds: list[str] = Field(list(DEFORMATION_KINDS), description="Deformation kinds defective cells are drawn from.")
    lot_size: int = Field(200, ge=1, description="Cells per lot.")
    count: int | None = Field(None, ge=1, description="Cells before the stream ends; none = endless.")
    drift_after: int | None = Field(None, ge=0, description="From this cell on, the material drifts: swelling grows "
                                                            "by drift_mm_per_cell per cell (a supplier's silent change).")
    drift_mm_per_cell: float = Field(0.004, ge=0, le=1, description="Swelling added per cell once drifting.")
    drift_max_mm: float = Field(0.15, ge=0, le=5, description="Largest swelling the drift adds.")

    @field_validator("views")
    @classmethod
    def _unique_views(cls, value: list[ViewName]) -> list[ViewName]:
        if len(set(value)) != len(value):
            raise ValueError(f"views {value} repeat a view")
        return value

    @field_validator("domain")
    @classmethod
    def _domain_loads(cls, value: str) -> str:
        load_domain(value)  # its ValueError names the file and field
        return value

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(DEFORMATION_KINDS))
        if unknown:
            raise ValueError(f"unknown deformation kinds {unknown}; known: {', '.join(DEFORMATION_KINDS)}")
        return value

    @model_validator(mode="after")
    def _renderable(self) -> SyntheticConfig:
        self.synth_config()  # the renderer's own checks (frame size), at config time
        return self

    def synth_config(self) -> SynthConfig:
        """The renderer's settings. Its count and line rate only feed dataset provenance and
        record timestamps, which a live source replaces with its own clock."""
        return SynthConfig(
            count=self.count or 1, seed=self.seed, views=tuple(self.views), size=self.size,
            defect_rate=self.defect_rate, domain=load_domain(self.domain), spec=self.spec,
            kinds=tuple(self.kinds), lot_size=self.lot_size, cells_per_s=self.cells_per_s or 1.0,
        )


def truth_of(fields: dict[str, Any]) -> dict[str, Any]:
    """The truth a frame carries, from a rendered frame's record fields."""
    return {
        "labels": fields["labels"],
        "severities": fields["severities"],
        "ground_truth": GroundTruth.model_validate(fields["ground_truth"]).model_dump(mode="json"),
    }


class SyntheticSource:
    """Cells 0, 1, 2, ... of the run, every view of a cell in a row, cell k due k / cells_per_s
    seconds after the stream started."""

    policy: BufferPolicy = "every"

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.name = f"synthetic:seed={config.seed}"
        self._synth = config.synth_config()
        self._index = 0
        self._pending: deque[SourceFrame] = deque()
        self._pacer = Pacer()

    def drift(self, index: int) -> float:
        """Swelling the drift adds to cell ``index`` (0 before ``drift_after``)."""
        start = self.config.drift_after
        if start is None or index < start:
            return 0.0
        return min(self.config.drift_max_mm, (index - start + 1) * self.config.drift_mm_per_cell)

    def open(self) -> None:
        """Start (again) at cell 0: the stream is the same every time."""
        self._index, self._pending, self._pacer = 0, deque(), Pacer()

    def read(self) -> SourceFrame | None:
        if not self._pending:
            if self.config.count is not None and self._index >= self.config.count:
                return None
            views = render_cell(self._synth, self._index, self.drift(self._index))
            if self.config.cells_per_s:
                self._pacer.wait(self._index / self.config.cells_per_s)
            # Stamped at release, after rendering and pacing: the moment a camera would capture.
            self._pending.extend(
                encoded_frame(
                    fields["image_bytes"], truth=truth_of(fields),
                    cell=CellTag(cell=fields["cell"], lot=fields["lot"], view=fields["view"], views=len(views)),
                )
                for fields in views
            )
            self._index += 1
        return self._pending.popleft()

    def close(self) -> None:
        self._pending.clear()
