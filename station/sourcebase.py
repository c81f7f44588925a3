"""What every frame source shares: the frame it hands out, its error, its protocol, pacing.

These types are re-exported by `pouchline.station.source`, the module callers import. They
live here, apart from it, because ``source.py`` imports every source module (to build the
config union) and every source module needs these types: one module holding both would be
an import cycle that breaks whenever a source module is imported first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from pouchline.station.imageinfo import image_header

#: ``every``: never drop, block the producer (files, replay, synthetic).
#: ``newest``: a live camera, whose old frames are worth nothing: keep the newest.
BufferPolicy = Literal["every", "newest"]
Encoding = Literal["jpeg", "png", "raw"]


@dataclass(frozen=True)
class CellTag:
    """Which cell a frame shows, from sources that know it (synthetic, replay)."""

    cell: str
    lot: str
    view: str
    views: int  # frames this cell will have: a worker knows when the cell is complete


@dataclass(frozen=True)
class SourceFrame:
    """One captured frame, as the source delivered it.

    ``payload`` is the encoded file exactly as captured or stored (JPEG/PNG bytes, never
    decoded and re-encoded; a view of the capture's own buffer where it has one), or raw
    pixels (HxW or HxWx3 uint8, BGR) when the source only has pixels. ``truth`` is
    ``{"labels", "severities", "ground_truth"}`` where known. ``checked``: encoding, size and
    channels were read from the payload's own image header (`encoded_frame`), so the
    transport does not read it again.
    """

    payload: bytes | memoryview | np.ndarray
    encoding: Encoding
    width: int
    height: int
    channels: int
    t_mono_ns: int  # time.monotonic_ns() at capture
    t_wall: float  # time.time() at capture
    exposure: float | None = None
    gain: float | None = None
    cell: CellTag | None = None
    truth: dict | None = None
    checked: bool = False


class SourceError(Exception):
    """A source failed (camera unplugged, truncated file, unreadable image).

    The message names the source and what failed; the station raises an alarm with it and
    reopens the source with back-off.
    """


class FrameSource(Protocol):
    """A stream of frames; ``open()`` may be called again after ``close()`` (reconnect)."""

    name: str  # for logs and stats, e.g. "camera:/dev/v4l/by-id/..."
    policy: BufferPolicy

    def open(self) -> None:
        """Start (or restart) the stream; raises SourceError."""

    def read(self) -> SourceFrame | None:
        """The next frame; None at a clean end of stream; raises SourceError on failure."""

    def close(self) -> None:
        """Release the device or file; safe to call twice, or before open()."""


# --- encoded frames -----------------------------------------------------------------------

def encoded_frame(
    data: bytes | memoryview, *, exposure: float | None = None, gain: float | None = None, cell: CellTag | None = None,
    truth: dict | None = None,
) -> SourceFrame:
    """A frame of JPEG/PNG bytes, stamped now; ValueError (from `image_header`) for anything else."""
    header = image_header(data)
    return SourceFrame(
        payload=data, encoding=header.encoding, width=header.width, height=header.height, channels=header.channels,
        t_mono_ns=time.monotonic_ns(), t_wall=time.time(), exposure=exposure, gain=gain, cell=cell, truth=truth,
        checked=True,
    )


# --- pacing -------------------------------------------------------------------------------

#: A stall longer than this (a consumer blocking an ``every`` source) restarts the schedule
#: from now instead of releasing the whole backlog in one burst.
_MAX_LAG_S = 0.25


class Pacer:
    """Releases a stream on a schedule against the monotonic clock.

    Each wait names its item's absolute offset from the start of the stream, not the gap
    since the previous item, so the time spent rendering or reading between items and the
    sleep's own overshoot never add up to drift.
    """

    def __init__(self) -> None:
        self._start: float | None = None

    def wait(self, offset_s: float) -> None:
        """Sleep until the item ``offset_s`` seconds into the stream is due."""
        now = time.monotonic()
        if self._start is None or now - (self._start + offset_s) > _MAX_LAG_S:
            self._start = now - offset_s
        delay = self._start + offset_s - now
        if delay > 0:
            time.sleep(delay)
