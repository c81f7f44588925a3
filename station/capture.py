"""USB/UVC cameras through OpenCV's V4L2 backend, and the VideoCapture read loop they share
with video files.

A UVC camera compresses to MJPEG itself. With passthrough on, OpenCV is told not to decode
(``CAP_PROP_CONVERT_RGB = 0``) and ``read()`` returns the camera's own JPEG bytes, which go
on the wire as they are: no decode and re-encode on the station, no second generation of
JPEG artefacts for the inspection model. Other pixel formats arrive as raw BGR.

Reconnecting is not done here: the station service closes and reopens a failed source with
back-off, so ``open()`` works again after ``close()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Literal

import cv2
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pouchline.station.sourcebase import BufferPolicy, SourceError, SourceFrame, encoded_frame

log = logging.getLogger(__name__)

#: V4L2_CID_EXPOSURE_AUTO values, which OpenCV's V4L2 backend passes through unchanged.
_V4L2_EXPOSURE_MANUAL, _V4L2_EXPOSURE_APERTURE_PRIORITY = 1, 3

CaptureFactory = Callable[[int | str], cv2.VideoCapture]


def fourcc_text(value: float) -> str:
    """The four characters of a ``CAP_PROP_FOURCC`` value."""
    code = int(value)
    return "".join(chr((code >> shift) & 0xFF) for shift in (0, 8, 16, 24))


class CaptureReader:
    """One ``cv2.VideoCapture`` read turned into a `SourceFrame`: the loop the camera and the
    video file share.

    With ``jpeg`` set the capture must hand out whole JPEG files (a V4L2 camera with
    ``CONVERT_RGB`` off, or FFmpeg's raw packet mode); each is checked to be a complete image
    file and forwarded unchanged. Otherwise the capture decodes and the pixels are forwarded.
    """

    def __init__(
        self, name: str, capture: cv2.VideoCapture, *, jpeg: bool, exposure: float | None = None,
        gain: float | None = None,
    ) -> None:
        self.name, self.capture, self.jpeg = name, capture, jpeg
        self.exposure, self.gain = exposure, gain
        self.frames = 0  # frames read so far

    def read(self) -> SourceFrame | None:
        """The next frame; None when the capture has none (the caller decides what that means)."""
        ok, image = self.capture.read()
        if not ok or image is None:
            return None
        self.frames += 1
        if not self.jpeg:
            return SourceFrame(
                payload=image, encoding="raw", width=image.shape[1], height=image.shape[0],
                channels=1 if image.ndim == 2 else image.shape[2], t_mono_ns=time.monotonic_ns(), t_wall=time.time(),
                exposure=self.exposure, gain=self.gain,
            )
        try:  # a view, not a copy: each read hands out a new array, which the frame keeps alive
            return encoded_frame(memoryview(image).cast("B"), exposure=self.exposure, gain=self.gain)
        except ValueError as error:  # a frame cut short, or a buffer that is no JPEG at all
            raise SourceError(f"{self.name}: frame {self.frames}: {error}") from None

    def release(self) -> None:
        self.capture.release()


class CameraConfig(BaseModel):
    """A USB/UVC camera read through V4L2."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["camera"] = Field(description="Source kind.")
    device: int | str = Field(
        description="Camera index (0 = /dev/video0) or device path; prefer the stable /dev/v4l/by-id/... "
        "path, which names the same camera whatever order the USB bus enumerates them in."
    )
    fourcc: str = Field(
        "MJPG", description="Pixel format asked of the camera; set explicitly, or OpenCV tries YUYV first."
    )
    width: int = Field(640, gt=0, description="Frame width in pixels; the camera must deliver exactly this.")
    height: int = Field(480, gt=0, description="Frame height in pixels; the camera must deliver exactly this.")
    fps: float = Field(30.0, gt=0, description="Frame rate asked of the camera.")
    exposure: float | None = Field(
        None, gt=0, description="Manual exposure in V4L2 units (exposure_time_absolute, 100 µs); none = auto exposure."
    )
    gain: float | None = Field(None, ge=0, description="Sensor gain in the camera's own units; none = leave as set.")
    passthrough: bool = Field(
        True, description="Forward the camera's own MJPEG bytes unchanged (no decode/re-encode) when it delivers MJPEG."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"camera index {value} must be 0 or more")
        elif not value.startswith("/dev/") or ".." in PurePosixPath(value).parts:
            raise ValueError(f"device {value!r} must be a camera index or a device path under /dev/ "
                             "(e.g. /dev/v4l/by-id/usb-...-video-index0)")
        return value

    @field_validator("fourcc")
    @classmethod
    def _fourcc(cls, value: str) -> str:
        if len(value) != 4 or not value.isascii() or not value.isprintable():
            raise ValueError(f"fourcc {value!r} must be four printable ASCII characters, e.g. 'MJPG' or 'YUYV'")
        return value


def open_v4l2(device: int | str) -> cv2.VideoCapture:
    """The default capture factory: the device through OpenCV's V4L2 backend."""
    return cv2.VideoCapture(device, cv2.CAP_V4L2)


class CameraSource:
    """A live camera: the newest frame matters, a stalled or vanished camera is an error.

    ``capture_factory`` makes the ``cv2.VideoCapture`` for the device (V4L2 by default); the
    tests hand in a capture of a video file to drive exactly this code without a camera.
    """

    policy: BufferPolicy = "newest"

    def __init__(self, config: CameraConfig, capture_factory: CaptureFactory = open_v4l2) -> None:
        self.config = config
        self.name = f"camera:{config.device}"
        self._factory = capture_factory
        self._reader: CaptureReader | None = None

    def open(self) -> None:
        self.close()
        capture = self._factory(self.config.device)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"{self.name}: cannot open the camera (unplugged, busy, or not a V4L2 device)")
        try:
            jpeg = self._configure(capture)
        except BaseException:
            capture.release()
            raise
        self._reader = CaptureReader(
            self.name, capture, jpeg=jpeg, exposure=self.config.exposure, gain=self.config.gain
        )

    def _configure(self, capture: cv2.VideoCapture) -> bool:
        """Apply the settings; whether the capture now hands out the camera's JPEG bytes."""
        config = self.config
        # Order matters to V4L2: the pixel format decides which sizes and rates exist.
        capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*config.fourcc))
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
        capture.set(cv2.CAP_PROP_FPS, config.fps)
        if config.exposure is None:
            capture.set(cv2.CAP_PROP_AUTO_EXPOSURE, _V4L2_EXPOSURE_APERTURE_PRIORITY)
        else:
            capture.set(cv2.CAP_PROP_AUTO_EXPOSURE, _V4L2_EXPOSURE_MANUAL)
            capture.set(cv2.CAP_PROP_EXPOSURE, config.exposure)
        if config.gain is not None:
            capture.set(cv2.CAP_PROP_GAIN, config.gain)
        size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if size != (config.width, config.height):
            raise SourceError(
                f"{self.name}: delivers {size[0]}x{size[1]}, not the configured {config.width}x{config.height}"
            )
        delivered = fourcc_text(capture.get(cv2.CAP_PROP_FOURCC))
        if delivered != config.fourcc:
            log.warning("%s: delivers %r instead of the configured %r", self.name, delivered, config.fourcc)
        return config.passthrough and delivered == "MJPG" and bool(capture.set(cv2.CAP_PROP_CONVERT_RGB, 0))

    def read(self) -> SourceFrame:
        """The next frame; a camera has no clean end, so no frame is an error (unplugged, stalled)."""
        assert self._reader is not None, "open() the source first"
        frame = self._reader.read()
        if frame is None:
            raise SourceError(f"{self.name}: no frame after {self._reader.frames} frames (unplugged or stalled)")
        return frame

    def close(self) -> None:
        if self._reader is not None:
            self._reader.release()
            self._reader = None
