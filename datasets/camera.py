"""Camera side of the renderer: calibration, the belt background and the sensor's imperfections.

Sensor noise is drawn from one fixed bank of Gaussian samples at a per-frame random offset:
drawing a fresh 640x480x3 normal field costs more than rendering the cell itself, and a
bank read at random offsets is just as deterministic per seed.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from pouchline.datasets import kernels
from pouchline.datasets.scene import Appearance

#: Focal length in pixels of a 640 px wide sensor: 4 px/mm at 300 mm above the belt.
_FOCAL_PX_AT_640 = 1200.0
_NOISE_BANK_SIZE = 1 << 22


def px_per_mm(appearance: Appearance, width: int) -> float:
    """Calibration at the belt plane: focal length (scaled with sensor width) over height."""
    return _FOCAL_PX_AT_640 * (width / 640.0) / appearance.camera_height_mm


#: Bank samples are unit Gaussians stored as int8 in 1/32 steps (4x less memory traffic).
NOISE_SCALE = 32.0


@functools.cache
def _noise_bank() -> np.ndarray:
    normal = np.random.default_rng(0x5EED).standard_normal(_NOISE_BANK_SIZE, dtype=np.float32)
    return np.clip(np.round(normal * NOISE_SCALE), -127, 127).astype(np.int8)


def noise_field(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """Gaussian noise of ``shape`` (int8, sigma `NOISE_SCALE`) read from the bank at a random
    offset, and a random sign to use it with."""
    count = int(np.prod(shape))
    bank = _noise_bank()
    if count > bank.size:
        raise ValueError(f"frame of {count} samples is larger than the noise bank ({bank.size})")
    start = int(rng.integers(0, bank.size - count + 1))
    return bank[start : start + count].reshape(shape), (-1.0 if rng.random() < 0.5 else 1.0)


#: Belt light and shadow are smooth: they are made at this fraction of the frame size.
_COARSE = 4


def drop_shadow(
    alpha: np.ndarray, origin: tuple[int, int], size: tuple[int, int], offset_px: tuple[float, float], strength: float
) -> np.ndarray:
    """The cell's soft shadow on the belt (0 = none) at coarse resolution, cast
    ``offset_px`` away from the light; ``alpha`` is the cell's coverage of the image region
    starting at ``origin`` (x, y)."""
    width, height = size
    canvas = np.zeros((max(height // _COARSE, 1), max(width // _COARSE, 1)), np.float32)
    small_size = (max(alpha.shape[1] // _COARSE, 1), max(alpha.shape[0] // _COARSE, 1))
    small = cv2.resize(alpha, small_size, interpolation=cv2.INTER_AREA)
    x0, y0 = origin[0] // _COARSE, origin[1] // _COARSE
    h, w = min(small.shape[0], canvas.shape[0] - y0), min(small.shape[1], canvas.shape[1] - x0)
    canvas[y0 : y0 + h, x0 : x0 + w] = small[:h, :w]
    shift = np.float32([[1, 0, offset_px[0] / _COARSE], [0, 1, offset_px[1] / _COARSE]])
    canvas = cv2.GaussianBlur(cv2.warpAffine(canvas, shift, canvas.shape[::-1]), (0, 0), 2.0)
    return canvas * np.float32(strength)


def belt(
    rng: np.random.Generator, appearance: Appearance, size: tuple[int, int], light_xy: tuple[float, float],
    shadow: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Matte conveyor belt brightness (brighter under the light, darker in the cell's coarse
    ``shadow``) and its weave, a factor per column."""
    width, height = size
    small_h, small_w = shadow.shape
    x = (np.arange(small_w, dtype=np.float32)[None, :] + 0.5) * np.float32(width / small_w) - np.float32(light_xy[0])
    y = (np.arange(small_h, dtype=np.float32)[:, None] + 0.5) * np.float32(height / small_h) - np.float32(light_xy[1])
    falloff = 1.0 / (1.0 + (x * x + y * y) / np.float32((0.9 * width) ** 2))
    blotch = 1.0 + 0.08 * rng.standard_normal((small_h, small_w)).astype(np.float32)
    light = cv2.resize(falloff * cv2.GaussianBlur(blotch, (0, 0), 3.0) * (1.0 - shadow), (width, height))
    weave = 1.0 + 0.05 * np.sin(np.arange(width, dtype=np.float32) * 1.9)
    return light, (weave * np.float32(appearance.belt_grey * appearance.light_intensity)).astype(np.float32)


def develop(
    cell: np.ndarray, origin: tuple[int, int], background: tuple[np.ndarray, np.ndarray],
    appearance: Appearance, rng: np.random.Generator,
) -> np.ndarray:
    """Focus blur, light tint, exposure, vignetting, shot and read noise; 8-bit BGR out.

    ``cell`` holds the cell's premultiplied linear B, G, R and coverage planes (4 x H x W)
    for the image region starting at ``origin`` (x, y); ``background`` is the belt's (or
    backlight's) brightness as a map and a per-column factor. Blur applies to the cell
    only: the belt's light varies too slowly for focus to show.
    """
    light, columns = background
    height, width = light.shape
    if appearance.blur_sigma_px >= 0.3:
        for plane in cell:
            cv2.GaussianBlur(plane, (0, 0), appearance.blur_sigma_px, dst=plane)
    planes = np.empty((3, height, width), np.uint8)
    noise, sign = noise_field(rng, (3, height, width))
    kernels.develop_kernel(
        light, columns, np.float32(appearance.vignetting), cell, origin[0], origin[1],
        light_tint(appearance.light_warmth) * np.float32(appearance.exposure), noise, np.float32(sign / NOISE_SCALE),
        np.float32(appearance.shot_noise), np.float32(appearance.read_noise), planes,
    )
    return cv2.merge(list(planes))


def light_tint(warmth: float) -> np.ndarray:
    """BGR multiplier of the light colour: warm lights are amber, cool ones blue."""
    return np.array([1.0 - 0.25 * warmth, 1.0, 1.0 + 0.2 * warmth], np.float32)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes as a camera would deliver them."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def rotation(angle_deg: float) -> tuple[float, float]:
    """cos and sin of an angle in degrees."""
    angle = math.radians(angle_deg)
    return math.cos(angle), math.sin(angle)
