"""What a JPEG or PNG says about itself in its header: format, size, channels, completeness.

Read without decoding, by sources (is this camera buffer a whole JPEG?) and by the wire
protocol (does the payload match its frame header? a few-kB payload must never make a
worker allocate an image larger than the header allows). Bytes or memoryviews; the JPEG
walk is bounded, because received data is hostile until proven otherwise.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from pouchline.datasets.manifest import sniff_format

_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
#: Cameras may pad a JPEG after its end marker; the end marker must lie within this tail.
#: (FF D9 cannot occur earlier by accident: encoders stuff every FF in the scan data.)
_TAIL = 64
#: JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC share the range but are not SOFs).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: A marker segment's start (FF, marker, length) and a frame header's height, width, components.
_SEGMENT = struct.Struct(">BBH")
_SOF_FIELDS = struct.Struct(">HHB")
#: Marker segments walked at most before the frame header (real files need a handful).
_MAX_SEGMENTS = 64


@dataclass(frozen=True)
class ImageHeader:
    """What the header of a JPEG or PNG file says about its image."""

    encoding: Literal["jpeg", "png"]
    width: int
    height: int
    channels: int  # as records count them: grey(+alpha) is 1, colour(+alpha) is 3


def image_header(data: bytes | memoryview) -> ImageHeader:
    """Encoding and size of a complete JPEG or PNG file, read from its header (no decoding).

    Raises ValueError saying what is wrong: another format, a broken header, or a file
    without its end marker (a truncated file or a camera frame cut short).
    """
    tail = bytes(data[max(len(data) - _TAIL, 0):])
    if data[: len(_PNG)] == _PNG:
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise ValueError("PNG without an IHDR header")
        if tail.rfind(_PNG_END) < 0:
            raise ValueError(f"PNG ends without its IEND chunk ({len(data)} bytes): truncated")
        colour = data[25]
        return ImageHeader("png", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"),
                           1 if colour in (0, 4) else 3)
    if data[: len(_JPEG_SOI)] == _JPEG_SOI:
        header = _jpeg_frame_header(data)
        if tail.rfind(_JPEG_EOI) < 0:
            raise ValueError(f"JPEG ends without its end-of-image marker ({len(data)} bytes): truncated")
        return header
    found = sniff_format(bytes(data[:16]))
    raise ValueError(f"a {found.upper()} file; only JPEG and PNG are forwarded" if found else "not a JPEG or PNG image")


def _jpeg_frame_header(data: bytes | memoryview) -> ImageHeader:
    """Walk the JPEG's marker segments up to its start-of-frame."""
    at, size = 2, len(data)
    for _ in range(_MAX_SEGMENTS):
        if at + 4 > size:
            break
        fill, marker, length = _SEGMENT.unpack_from(data, at)
        if fill != 0xFF:
            raise ValueError(f"corrupt JPEG header (no marker at byte {at})")
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _SOF:
            if at + 10 > size:
                break
            height, width, components = _SOF_FIELDS.unpack_from(data, at + 5)
            return ImageHeader("jpeg", width, height, 1 if components == 1 else 3)
        if marker in (0xDA, 0xD9):  # start of scan / end of image before any frame header
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        at += 2 + length
    raise ValueError("JPEG without a frame header (SOF)")
