"""A cell arrives: presence detection in the image, for lines without a trigger signal.

The detector compares each frame with a running estimate of the empty belt. It fires once
per cell, on the first frame where the cell lies wholly inside the region of interest (so
the frame sent for inspection shows all of it), and re-arms only once the belt has been
clear for a few frames, so a cell that lingers, jitters or is partly hidden never counts
twice. It works on a small grayscale copy: a fraction of a millisecond per frame.

The background follows the light, but never learns a cell standing still (a line stop), and
a sudden change of the light disarms the detector until the background has caught up, so
neither leaves a ghost that fires or blocks it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class PresenceConfig(BaseModel):
    """Where to look for cells and how different from the empty belt a cell must be."""

    model_config = ConfigDict(extra="forbid")

    roi: tuple[float, float, float, float] = Field(
        (0.0, 0.0, 1.0, 1.0), description="Region of interest: left, top, right, bottom as fractions of the frame."
    )
    threshold: float = Field(
        10.0, gt=0, le=255, description="Grey-level difference from the empty belt that counts as cell."
    )
    min_fill: float = Field(
        0.02, gt=0, le=1, description="Share of the region that must differ for a cell to be present; a column "
        "counts as occupied when this share of it differs."
    )
    margin: float = Field(
        0.02, ge=0, lt=0.5, description="The cell must keep this share of the region's width clear at its left and "
        "right borders to be fully in view."
    )
    rearm_frames: int = Field(3, ge=1, description="Frames of clear belt after a cell before the next can fire.")
    downscale: int = Field(2, ge=1, description="Work on the image shrunk by this factor (of the image passed in).")
    learn_frames: int = Field(
        10, ge=1, description="First frames, of empty belt, whose median is the first background."
    )
    adapt: float = Field(
        0.05, gt=0, le=1,
        description="Share of the way the background moves toward each frame's belt (illumination drift).",
    )

    @field_validator("roi")
    @classmethod
    def _roi(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        left, top, right, bottom = value
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise ValueError(f"roi {value} must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1")
        return value


class PresenceDetector:
    """Feed it every frame with `update`; True exactly once per passing cell."""

    def __init__(self, config: PresenceConfig) -> None:
        self.config = config
        self._learning: list[np.ndarray] = []
        self._background: np.ndarray | None = None
        self._armed = True
        self._clear_run = 0

    def update(self, image: np.ndarray) -> bool:
        """Whether a cell has just come fully into view in this frame (BGR or grayscale uint8)."""
        gray = self._prepare(image)
        if self._background is not None and self._background.shape != gray.shape:
            self._background = None  # the frame size changed: learn the belt again
        if self._background is None:
            self._learn(gray)
            return False
        config, background = self.config, self._background
        difference = gray - background
        foreground = np.abs(difference) > config.threshold
        occupied = foreground.mean(axis=0) >= config.min_fill
        border = max(1, round(config.margin * occupied.size))
        belt_gain = _belt_gain(gray, background, border)
        # The light changed by more than half the threshold: the background is stale.
        relit = abs(belt_gain - 1.0) * float(background.mean()) > config.threshold / 2
        fired = (
            self._armed and not relit and foreground.mean() >= config.min_fill
            and not occupied[:border].any() and not occupied[-border:].any()
        )
        if fired or relit:
            self._armed, self._clear_run = False, 0
        elif not occupied.any():
            self._clear_run += 1
            self._armed = self._armed or self._clear_run >= config.rearm_frames
        else:
            self._clear_run = 0
        # Belt pixels move toward what they show now. Pixels under a cell cannot be measured:
        # they follow the belt's change of brightness instead (a ratio: light scales what the
        # belt reflects), so a cell standing still is never learnt as belt, the belt it hides
        # keeps up with drifting light, and after a jump of the light everything moves to it.
        change = np.where(foreground, background * np.float32(belt_gain - 1.0), difference)
        background += np.float32(config.adapt) * change
        return fired

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        """The region of interest, grayscale, shrunk, as float32."""
        height, width = image.shape[:2]
        left, top, right, bottom = self.config.roi
        region = image[int(top * height) : math.ceil(bottom * height), int(left * width) : math.ceil(right * width)]
        gray = cv2.cvtColor(region, cv2.COLOR_BGR2GRAY) if region.ndim == 3 else region
        factor = self.config.downscale
        if factor > 1:
            size = (max(gray.shape[1] // factor, 1), max(gray.shape[0] // factor, 1))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        return gray.astype(np.float32)

    def _learn(self, gray: np.ndarray) -> None:
        """The first background: per-pixel median of the first frames (robust to a stray one)."""
        if self._learning and self._learning[0].shape != gray.shape:
            self._learning = []
        self._learning.append(gray)
        if len(self._learning) == self.config.learn_frames:
            self._background = np.median(np.stack(self._learning), axis=0).astype(np.float32)
            self._learning = []


def _belt_gain(gray: np.ndarray, background: np.ndarray, border: int) -> float:
    """The belt's change of brightness since the background, measured in the left and right
    border strips, where a cell wholly in view never is: the strip that changed least,
    because a cell crossing a border may cover one strip, while a change of the light
    changes both."""
    gains = [
        float(np.median(gray[:, strip] / np.maximum(background[:, strip], 1.0)))
        for strip in (slice(0, border), slice(-border, None))
    ]
    return min(gains, key=lambda gain: abs(gain - 1.0))
