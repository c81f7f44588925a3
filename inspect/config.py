"""`inspect.toml`: which stations to serve, which model to run, where verdicts go.

Every model forbids unknown keys, so a typo is an error naming the key. Defaults are chosen
for the machine: one single-threaded worker process per usable core (onnxruntime threads
inside a worker would fight the other workers for the same cores).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pouchline.datasets.records import check_identifier
from pouchline.station.config import load_toml
from pouchline.station.curve import CurveClientConfig
from pouchline.station.transport import TransportSettings

#: The shipped INT8 detector (FP32 sits beside it as ``pouchline-detector.onnx``).
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "pouchline-detector.int8.onnx"
#: The shipped INT8 side-view model (the silhouette against the backlight).
SHIPPED_SIDE_MODEL = SHIPPED_MODEL.with_name("pouchline-side.int8.onnx")


class BatchSettings(BaseModel):
    """Dynamic micro-batching: frames that arrive together are judged in one forward pass."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(8, ge=1, le=256, description="Most frames per forward pass.")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long the first frame of a batch may wait for more (frames are decoded and "
        "located while they wait)."
    )


class InspectConfig(BaseModel):
    """An inspection service: N worker processes, a collector, a status endpoint."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("inspect", description="Service name; workers are called NAME-0, NAME-1, ...")
    stations: list[str] = Field(min_length=1, description="Station endpoints to take frames from (tcp://host:port).")
    collect: str = Field(
        "tcp://127.0.0.1:5570", description="Where workers send frame verdicts; the service binds it (remote "
        "workers' services connect to another service's collector with `collector`)."
    )
    collector: str | None = Field(
        None, description="Send frame verdicts to this remote collector instead of running one here "
        "(scale-out: workers on another machine)."
    )
    controller: str | None = Field(None, description="Line controller's verdict endpoint; cell verdicts are resent until it acks.")
    out: Path | None = Field(None, description="Also append every cell verdict as one JSON line to this file.")
    http: str | None = Field("127.0.0.1:8201", description="host:port for GET /status, /metrics, /healthz and POST /reload.")
    model: Path = Field(SHIPPED_MODEL, description="ONNX model (metadata JSON beside it); the shipped INT8 by default.")
    more_models: list[Path] = Field(
        default_factory=lambda: [SHIPPED_SIDE_MODEL], description="Models for further views, one per view (by "
        "default the shipped side-view model); each judges only the frames of its own view, and a cell passes only "
        "if every view passes."
    )
    shadow: Path | None = Field(None, description="A second model run beside the live one of its view; disagreements "
                                                  "are counted, never acted on.")
    watch_model: bool = Field(True, description="Reload the model when its file changes (swap between batches).")
    workers: int = Field(default_factory=lambda: len(os.sched_getaffinity(0)), ge=1, le=256,
                         description="Worker processes on this machine (default: one per usable core).")
    threads: int = Field(1, ge=1, le=64, description="onnxruntime threads per worker.")
    capacity: int = Field(8, ge=1, le=1024, description="Frames a worker may hold per station (its credit).")
    batching: BatchSettings = Field(default_factory=BatchSettings, description="Micro-batching.")
    cell_deadline_s: float = Field(
        2.0, gt=0, le=3600, description="A cell whose views are not all judged this long after capture is a "
        "fail-safe reject ('missing_view')."
    )
    audit_rate: float = Field(0.01, ge=0, le=1, description="Share of passed cells whose images go to the controller "
                                                            "for audit.")
    skip_views: list[str] = Field(
        default_factory=list, description="Views this service does not judge (their frames count as present but do "
        "not change the decision). Any other view without a model is a fail-safe reject."
    )
    max_pixels: int = Field(40_000_000, ge=1024, description="Frames with more pixels are rejected unread ('too_large').")
    curve: CurveClientConfig | None = Field(None, description="CurveZMQ keys for stations that require them.")
    transport: TransportSettings = Field(default_factory=TransportSettings, description="Heartbeat and timeout settings.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_identifier(value, "name")


def load_inspect_config(path: Path) -> InspectConfig:
    """Read and validate an inspection TOML file (`ConfigError` names the file and the key)."""
    return load_toml(path, InspectConfig, "inspection")
