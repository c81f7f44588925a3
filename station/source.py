"""The boundary between where frames come from and the station that serves them.

A station only sees `FrameSource`: ``open()``, ``read()`` until None (or a `SourceError`),
``close()``. Each kind of source has its config model beside its class; this module joins
the configs into one tagged union, so a station config picks its source with ``kind`` and a
misspelt key of any source is an error naming it, and builds the source a config describes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from pouchline.station.capture import CameraConfig, CameraSource
from pouchline.station.filesource import ImageFolderConfig, ImageFolderSource, VideoFileConfig, VideoFileSource
from pouchline.station.replay import ReplayConfig, ReplaySource
from pouchline.station.sourcebase import BufferPolicy, CellTag, FrameSource, SourceError, SourceFrame
from pouchline.station.synthetic import SyntheticConfig, SyntheticSource

__all__ = [
    "BufferPolicy", "CellTag", "FrameSource", "SourceConfig", "SourceError", "SourceFrame", "build_source",
]

SourceConfig = Annotated[
    CameraConfig | VideoFileConfig | ImageFolderConfig | SyntheticConfig | ReplayConfig,
    Field(discriminator="kind"),
]

_SOURCES: dict[type, Callable[[Any], FrameSource]] = {
    CameraConfig: CameraSource,
    VideoFileConfig: VideoFileSource,
    ImageFolderConfig: ImageFolderSource,
    SyntheticConfig: SyntheticSource,
    ReplayConfig: ReplaySource,
}


def build_source(config: SourceConfig) -> FrameSource:
    """The source a config describes (not yet opened)."""
    return _SOURCES[type(config)](config)
