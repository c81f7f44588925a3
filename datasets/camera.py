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


def belt(
    rng: np.random.Generator, appearance: Appearance, size: tuple[int, int], light_xy: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Matte conveyor belt brightness, higher under the light, and its weave (per column)."""
    width, height = size
    small_w, small_h = max(width // 8, 2), max(height // 8, 2)
    x = np.arange(small_w, dtype=np.float32)[None, :] - np.float32(light_xy[0] / 8)
    y = np.arange(small_h, dtype=np.float32)[:, None] - np.float32(light_xy[1] / 8)
    falloff = 1.0 / (1.0 + (x * x + y * y) / np.float32((0.9 * small_w) ** 2))
    blotch = 1.0 + 0.08 * rng.standard_normal((small_h, small_w)).astype(np.float32)
    light = cv2.resize(falloff * cv2.GaussianBlur(blotch, (0, 0), 1.5), (width, height))
    weave = 1.0 + 0.05 * np.sin(np.arange(width, dtype=np.float32) * 1.9)
    return light, (weave * np.float32(appearance.belt_grey * appearance.light_intensity)).astype(np.float32)


def drop_shadow(
    alpha: np.ndarray, origin: tuple[int, int], size: tuple[int, int], offset_px: tuple[float, float], strength: float
) -> np.ndarray:
    """The cell's soft shadow on the belt (0 = none), cast ``offset_px`` away from the light.

    ``alpha`` is the cell's coverage of the image region starting at ``origin`` (x, y);
    the shadow is made at quarter resolution, it is soft anyway.
    """
    width, height = size
    canvas = np.zeros((max(height // 4, 1), max(width // 4, 1)), np.float32)
    small = cv2.resize(alpha, (max(alpha.shape[1] // 4, 1), max(alpha.shape[0] // 4, 1)), interpolation=cv2.INTER_AREA)
    x0, y0 = origin[0] // 4, origin[1] // 4
    h, w = min(small.shape[0], canvas.shape[0] - y0), min(small.shape[1], canvas.shape[1] - x0)
    canvas[y0 : y0 + h, x0 : x0 + w] = small[:h, :w]
    shift = np.float32([[1, 0, offset_px[0] / 4], [0, 1, offset_px[1] / 4]])
    canvas = cv2.GaussianBlur(cv2.warpAffine(canvas, shift, canvas.shape[::-1]), (0, 0), 2.0)
    return cv2.resize(canvas, (width, height)) * np.float32(strength)


def develop(
    cell: np.ndarray, origin: tuple[int, int], background: tuple[np.ndarray, np.ndarray], shadow: np.ndarray,
    appearance: Appearance, rng: np.random.Generator,
) -> np.ndarray:
    """Focus blur, light tint, exposure, vignetting, shot and read noise; 8-bit BGR out.

    ``cell`` holds the cell's premultiplied linear B, G, R and coverage planes (4 x H x W)
    for the image region starting at ``origin`` (x, y); ``background`` is the belt's (or
    backlight's) brightness as a map and a per-column factor, and ``shadow`` how much of
    it the cell shades. Blur applies to the cell only: the belt's light varies too slowly
    for focus to show.
    """
    light, columns = background
    height, width = light.shape
    if appearance.blur_sigma_px >= 0.3:
        for plane in cell:
            cv2.GaussianBlur(plane, (0, 0), appearance.blur_sigma_px, dst=plane)
    planes = np.empty((3, height, width), np.uint8)
    noise, sign = noise_field(rng, (3, height, width))
    kernels.develop_kernel(
        light, columns, shadow, np.float32(appearance.vignetting), cell, origin[0], origin[1],
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
