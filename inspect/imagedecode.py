"""Frame bytes to the image size the model needs, with as little work as possible.

A 1280x960 JPEG for a model trained on 640x480 frames is decoded at half scale by
libjpeg-turbo itself (DCT-domain scaling, simplejpeg's ``min_width``/``min_height``) straight
from the ZeroMQ (or shared-memory) buffer: no full-size decode, no copy, no resize. PNG and
raw frames are decoded whole and shrunk by the same power-of-two factor, so every encoding
gives the locate step the same scale. ``scale`` maps the decoded image back to frame pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg

from pouchline.station.protocol import Frame, ProtocolError

#: libjpeg-turbo's DCT scaling factors (1/8 .. 1) that keep the aspect exact.
_FACTORS = (8, 4, 2, 1)


class DecodeError(Exception):
    """A frame the worker cannot turn into an image; ``status`` becomes the verdict's status."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Decoded:
    """The image at working size (BGR, or grayscale for gray frames) and its scale to the frame."""

    image: np.ndarray
    scale: float  # frame pixels per decoded pixel


def reduction(width: int, height: int, min_size: tuple[int, int]) -> int:
    """Largest power-of-two factor that keeps the image at least ``min_size`` (width, height)."""
    return next(f for f in _FACTORS if f == 1 or (width // f >= min_size[0] and height // f >= min_size[1]))


def decode_for_model(frame: Frame, min_size: tuple[int, int], max_pixels: int) -> Decoded:
    """Decode ``frame`` at the smallest scale that keeps ``min_size``; `DecodeError` otherwise."""
    header = frame.header
    what = f"frame {header.key} ({header.encoding} {header.width}x{header.height})"
    if header.width * header.height > max_pixels:
        raise DecodeError("too_large", f"{what} has {header.width * header.height} pixels; this worker reads at most "
                                       f"{max_pixels}")
    factor = reduction(header.width, header.height, min_size)
    try:
        if header.encoding == "jpeg":
            image = simplejpeg.decode_jpeg(frame.payload, colorspace="GRAY" if header.channels == 1 else "BGR",
                                           min_width=header.width // factor, min_height=header.height // factor)
            frame.verify()  # a zero-copy arena frame must not have been reused under the decoder
            if image.shape[2] == 1:
                image = image[..., 0]
        else:
            image = frame.image()
            if image.dtype == np.uint16:
                image = (image >> 8).astype(np.uint8)
            if factor > 1:
                image = cv2.resize(image, (header.width // factor, header.height // factor), interpolation=cv2.INTER_AREA)
    except (ValueError, ProtocolError, cv2.error) as error:
        if isinstance(error, ProtocolError) and error.kind == "arena_stale":
            raise
        raise DecodeError("undecodable", f"{what} cannot be decoded: {error}") from error
    return Decoded(image, header.width / image.shape[1])
