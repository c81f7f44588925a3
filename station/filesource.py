"""Recorded frames as a station source: a video file, or a folder of images.

A video file is read through the same `CaptureReader` as a live camera. For MJPEG video
(MJPG in AVI, MKV or MOV), FFmpeg's raw packet mode (``CAP_PROP_FORMAT = -1``) hands out
each packet, a complete JPEG file, so the file's own frames go on the wire unchanged.

A file cut short must not pass for a short clip: the station must raise an alarm, exactly
as for a camera failing mid-stream. The container's header states its frame count (AVI and
MKV keep it at the start, so it survives a cut; an MP4 cut before its index does not open at
all); reading fewer frames than that is an error naming the file and the frame. In packet
mode the cut packet itself is caught, as a JPEG without its end marker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import cv2
from pydantic import BaseModel, ConfigDict, Field

from pouchline.station.capture import CaptureReader, fourcc_text
from pouchline.station.sourcebase import BufferPolicy, Pacer, SourceError, SourceFrame, encoded_frame

#: Codec tags of MJPEG streams (AVI, QuickTime, Avid), whose packets are whole JPEG files.
_MJPEG_TAGS = frozenset({"MJPG", "MJPA", "JPEG", "AVRN", "DMB1"})


class VideoFileConfig(BaseModel):
    """A video file played as if a camera were capturing it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["video"] = Field(description="Source kind.")
    path: Path = Field(description="Video file (anything FFmpeg reads: AVI, MKV, MP4, ...).")
    loop: bool = Field(False, description="Start again at the end instead of ending the stream.")
    fps: float | None = Field(None, gt=0, description="Pace frames to this rate; none = as fast as they can be read.")
    passthrough: bool = Field(
        True, description="Forward an MJPEG file's own JPEG frames unchanged instead of decoding them."
    )


class VideoFileSource:
    """Frames of a video file; fewer frames than the container states is a `SourceError`."""

    policy: BufferPolicy = "every"

    def __init__(self, config: VideoFileConfig) -> None:
        self.config = config
        self.name = f"video:{config.path}"
        self._reader: CaptureReader | None = None
        self._expected = 0
        self._pacer = Pacer()
        self._emitted = 0

    def open(self) -> None:
        """Start at the first frame (again, after a failure)."""
        self.close()
        self._start()
        self._pacer, self._emitted = Pacer(), 0

    def _start(self) -> None:
        path = self.config.path
        if not path.is_file():
            raise SourceError(f"{self.name}: no such file")
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"{self.name}: cannot be opened as a video (not a video, or cut before its index)")
        jpeg = (
            self.config.passthrough
            and fourcc_text(capture.get(cv2.CAP_PROP_FOURCC)).upper() in _MJPEG_TAGS
            and bool(capture.set(cv2.CAP_PROP_FORMAT, -1))
        )
        self._expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self._reader = CaptureReader(self.name, capture, jpeg=jpeg)

    def read(self) -> SourceFrame | None:
        assert self._reader is not None, "open() the source first"
        if self.config.fps is not None:
            self._pacer.wait(self._emitted / self.config.fps)
        frame = self._reader.read()
        if frame is None:
            self._check_complete(self._reader)
            if not self.config.loop:
                return None
            self._reader.release()
            self._start()
            return self.read()
        self._emitted += 1
        return frame

    def _check_complete(self, reader: CaptureReader) -> None:
        """At the end of the file: a clean end, or a cut."""
        if reader.frames == 0:
            raise SourceError(f"{self.name}: not a single frame can be read")
        if reader.frames < self._expected:
            raise SourceError(
                f"{self.name}: frame {reader.frames + 1} of {self._expected} cannot be read: "
                "the file is truncated or corrupt"
            )

    def close(self) -> None:
        if self._reader is not None:
            self._reader.release()
            self._reader = None


class ImageFolderConfig(BaseModel):
    """A folder of JPEG/PNG files played in name order."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["folder"] = Field(description="Source kind.")
    path: Path = Field(description="Folder holding the images.")
    pattern: str = Field("*", description="Glob of the files to play, relative to the folder (e.g. '**/*.jpg').")
    loop: bool = Field(False, description="Start again after the last file instead of ending the stream.")
    fps: float | None = Field(None, gt=0, description="Pace frames to this rate; none = as fast as they can be read.")


def _natural_key(path: Path) -> list[int | str]:
    """Name order with digit runs compared as numbers: frame2 before frame10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


class ImageFolderSource:
    """The folder's image files, forwarded as their bytes (the format is sniffed, not guessed
    from the extension); a file that is not a complete JPEG or PNG is a `SourceError`."""

    policy: BufferPolicy = "every"

    def __init__(self, config: ImageFolderConfig) -> None:
        self.config = config
        self.name = f"folder:{config.path}"
        self._files: list[Path] = []
        self._next = 0
        self._pacer = Pacer()
        self._emitted = 0

    def open(self) -> None:
        """List the files (again: a reopened folder picks up new ones) and start at the first."""
        root = self.config.path
        if not root.is_dir():
            raise SourceError(f"{self.name}: no such folder")
        files = sorted((p for p in root.glob(self.config.pattern) if p.is_file()),
                       key=lambda p: _natural_key(p.relative_to(root)))
        if not files:
            raise SourceError(f"{self.name}: no file matches {self.config.pattern!r}")
        self._files, self._next = files, 0
        self._pacer, self._emitted = Pacer(), 0

    def read(self) -> SourceFrame | None:
        assert self._files, "open() the source first"
        if self._next == len(self._files):
            if not self.config.loop:
                return None
            self._next = 0
        path = self._files[self._next]
        self._next += 1
        if self.config.fps is not None:
            self._pacer.wait(self._emitted / self.config.fps)
        try:
            frame = encoded_frame(path.read_bytes())
        except OSError as error:
            raise SourceError(f"{self.name}: cannot read {path}: {error.strerror or error}") from None
        except ValueError as error:
            raise SourceError(f"{self.name}: {path}: {error}") from None
        self._emitted += 1
        return frame

    def close(self) -> None:
        self._files, self._next = [], 0
