"""`station.toml`: one station, its cameras and where its frames go.

Every model forbids unknown keys, so a typo is an error that names the key instead of a
setting silently left at its default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pouchline.datasets.records import check_identifier
from pouchline.station.curve import CurveServerConfig
from pouchline.station.presence import PresenceConfig
from pouchline.station.source import SourceConfig
from pouchline.station.transport import TransportSettings

#: Sources that know which cell each frame shows.
_TAGGING_SOURCES = ("synthetic", "replay")


class CameraSettings(BaseModel):
    """One camera of the station and how its frames become cells."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Camera name, unique within the station (part of every frame key).")
    view: Literal["top", "side"] = Field("top", description="What the camera sees of the cell.")
    source: SourceConfig = Field(description="Where frames come from: camera, video, folder, synthetic or replay.")
    cells: Literal["source", "external", "presence"] = Field(
        "external",
        description="What makes a frame a cell's view: the source's own cell tags (synthetic, replay), an "
        "external trigger from the line (ZeroMQ or HTTP), or the cell appearing in the image.",
    )
    presence: PresenceConfig | None = Field(None, description="Presence detection settings (cells = 'presence').")
    reconnect_initial_s: float = Field(0.5, gt=0, description="First wait before reopening a failed source.")
    reconnect_max_s: float = Field(10.0, gt=0, description="Longest wait between reopen attempts (back-off cap).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_identifier(value, "name")

    @model_validator(mode="after")
    def _cells_fit_source(self) -> CameraSettings:
        if self.cells == "source" and self.source.kind not in _TAGGING_SOURCES:
            raise ValueError(f"cells = 'source' needs a source that tags cells ({', '.join(_TAGGING_SOURCES)}), "
                             f"not {self.source.kind!r}; use 'external' or 'presence'")
        if self.cells == "presence" and self.presence is None:
            self.presence = PresenceConfig()
        if self.cells != "presence" and self.presence is not None:
            raise ValueError(f"[presence] settings given but cells = {self.cells!r}")
        return self


class StationConfig(BaseModel):
    """The whole station."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Station name, unique on the line (part of every frame key).")
    lot: str = Field("LOT-0", description="Lot of cells until a trigger names another.")
    bind: str = Field("tcp://*:5555", description="ZeroMQ endpoint the frame server binds; workers connect here.")
    trigger: str | None = Field(None, description="ZeroMQ endpoint (PULL) for trigger messages from the line/PLC.")
    status: str | None = Field(
        "127.0.0.1:8101", description="host:port of the HTTP status endpoint (GET /status, POST /trigger); none to disable."
    )
    trigger_timeout_s: float = Field(
        2.0, gt=0, description="A triggered cell whose camera delivers no frame in this time gets a drop notice for that view."
    )
    exit_when_done: bool = Field(False, description="Stop when every source has ended (files, replay, counted synthetic).")
    transport: TransportSettings = Field(default_factory=TransportSettings, description="Credit, heartbeat and queue settings.")
    curve: CurveServerConfig | None = Field(None, description="CurveZMQ encryption and client authentication.")
    cameras: list[CameraSettings] = Field(min_length=1, description="The station's cameras.")

    @field_validator("name", "lot")
    @classmethod
    def _identifiers(cls, value: str, info: object) -> str:
        return check_identifier(value, getattr(info, "field_name", "name"))

    @model_validator(mode="after")
    def _unique_cameras(self) -> StationConfig:
        names = [camera.name for camera in self.cameras]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"camera names repeat: {', '.join(repeated)}")
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(Exception):
    """A station config that cannot be used; the message names the file and the key."""


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The raw table of a TOML config file; `ConfigError` for a missing file or bad TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: no such {what} config") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error


def config_problems(where: object, error: ValidationError) -> ConfigError:
    """One `ConfigError` naming ``where`` and every bad key."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
        for problem in error.errors()
    )
    return ConfigError(f"{where}: {problems}")


def load_toml(path: Path, model: type[ConfigT], what: str) -> ConfigT:
    """Read and validate a TOML config file; `ConfigError` names the file and every bad key."""
    raw = read_toml(path, what)
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise config_problems(path, error) from error


def load_config(path: Path) -> StationConfig:
    """Read and validate a station TOML file."""
    return load_toml(path, StationConfig, "station")
