"""Presence detection on a rendered conveyor: one event per passing cell, when it is wholly in
view; none on an empty belt with sensor noise and slowly drifting light."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from pouchline.datasets.domain import load_domain
from pouchline.datasets.render import render_top
from pouchline.datasets.scene import CellScene, Pose, sample_scene
from pouchline.datasets.spec import CellSpec
from pouchline.station.presence import PresenceConfig, PresenceDetector

W, H = 320, 240
#: The camera twice as high as the renderer's default: a cell spans ~120 of the 320 columns,
#: so it is wholly in view for a good part of its pass.
CAMERA_HEIGHT_MM = 600.0
PPM = 1200.0 * (W / 640) / CAMERA_HEIGHT_MM
STEP_PX = 12  # belt travel per frame


@dataclass
class Conveyor:
    frames: list[np.ndarray]
    extents: list[tuple[float, float] | None]  # x range of the cell's outline per frame, None on empty belt

    def fully_in_view(self, index: int) -> bool:
        extent = self.extents[index]
        return extent is not None and extent[0] > 0 and extent[1] < W - 1  # a cut outline runs along the border


def line_scene(index: int, base: CellScene) -> CellScene:
    """Cell ``index`` (its defects, film and label) under the line's one camera and light.

    Seed and index are those of ``base`` too: the renderer draws the belt and sensor noise
    from them, and on a real line the belt does not change from one cell to the next.
    """
    cell = sample_scene(8, index, spec=CellSpec(), domain=load_domain("default"), defect_rate=0.5)
    appearance = dataclasses.replace(base.appearance, film=cell.appearance.film, label=cell.appearance.label)
    return dataclasses.replace(cell, appearance=appearance, seed=base.seed, index=base.index)


def at(scene: CellScene, x_px: float) -> tuple[np.ndarray, tuple[float, float]]:
    frame = render_top(dataclasses.replace(scene, pose=Pose((x_px - W / 2) / PPM, 0.0, 0.0)), (W, H))
    xs = [x for x, _ in frame.polygon]
    return frame.image, (min(xs), max(xs))


@pytest.fixture(scope="module")
def conveyor() -> Conveyor:
    """Five cells carried left to right across the view, empty belt before, between and after."""
    drawn = sample_scene(8, 0, spec=CellSpec(), domain=load_domain("default"), defect_rate=0.5)
    high = dataclasses.replace(drawn.appearance, camera_height_mm=CAMERA_HEIGHT_MM)
    base = dataclasses.replace(drawn, appearance=high)
    # Empty belt: the same camera with the cell far left, and far right, one half of each.
    left, _ = at(base, 0)
    right, _ = at(base, W)
    belt = np.concatenate([right[:, : W // 2], left[:, W // 2 :]], axis=1)
    frames: list[np.ndarray] = []
    extents: list[tuple[float, float] | None] = []
    frames += [belt] * 12
    extents += [None] * 12
    for index in range(5):
        scene = line_scene(index, base)
        _, (x0, x1) = at(scene, W / 2)
        half_left, half_right = W / 2 - x0, x1 - W / 2
        for x in np.arange(-half_right + 4 + 3 * index, W + half_left - 4, STEP_PX):
            image, extent = at(scene, x)
            frames.append(image)
            extents.append(extent)
        frames += [belt] * 5
        extents += [None] * 5
    return Conveyor(frames, extents)


def with_noise_and_drift(frames: list[np.ndarray], seed: int, drift: float) -> list[np.ndarray]:
    """Fresh sensor noise in every frame and light that brightens by ``drift`` over the run."""
    rng = np.random.default_rng(seed)
    out = []
    for index, frame in enumerate(frames):
        gain = 1.0 + drift * index / max(len(frames) - 1, 1)
        noisy = frame.astype(np.float32) * gain + rng.normal(0.0, 4.0, frame.shape)
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def events(detector: PresenceDetector, frames: list[np.ndarray]) -> list[int]:
    return [index for index, frame in enumerate(frames) if detector.update(frame)]


def check_events(conveyor: Conveyor, fired: list[int]) -> None:
    """One event per cell, on a frame showing all of it, at most two frames after the first such."""
    passes: list[list[int]] = []
    for index, extent in enumerate(conveyor.extents):
        if extent is not None and (not passes or conveyor.extents[index - 1] is None):
            passes.append([])
        if extent is not None:
            passes[-1].append(index)
    assert len(passes) == 5 and len(fired) == 5, f"events at frames {fired}"
    for cell, (frames, event) in enumerate(zip(passes, fired, strict=True)):
        first_inside = next(i for i in frames if conveyor.fully_in_view(i))
        assert event in frames and conveyor.fully_in_view(event), f"cell {cell}: fired at {event}, not wholly in view"
        assert first_inside <= event <= first_inside + 2, f"cell {cell}: fired at {event}, in view from {first_inside}"


@pytest.mark.parametrize("roi", [(0.0, 0.0, 1.0, 1.0), (0.0, 0.42, 1.0, 0.58)], ids=["frame", "lane"])
def test_each_passing_cell_fires_once_when_wholly_in_view(conveyor: Conveyor, roi: tuple[float, ...]) -> None:
    # "lane": a region no taller than the cell, which then covers a border strip's full height.
    frames = with_noise_and_drift(conveyor.frames, seed=1, drift=0.15)
    check_events(conveyor, events(PresenceDetector(PresenceConfig(roi=roi)), frames))


def test_quarter_size_grayscale_frames_as_the_station_passes_them(conveyor: Conveyor) -> None:
    frames = [
        cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (W // 4, H // 4), interpolation=cv2.INTER_AREA)
        for frame in with_noise_and_drift(conveyor.frames, seed=2, drift=-0.1)
    ]
    check_events(conveyor, events(PresenceDetector(PresenceConfig(downscale=1)), frames))


def test_a_cell_stopping_in_view_still_counts_once(conveyor: Conveyor) -> None:
    frames = list(conveyor.frames)
    stop = next(i for i in range(len(frames)) if conveyor.fully_in_view(i)) + 3
    stalled = frames[:stop] + [frames[stop]] * 40 + frames[stop:]
    extents = conveyor.extents[:stop] + [conveyor.extents[stop]] * 40 + conveyor.extents[stop:]
    fired = events(PresenceDetector(PresenceConfig()), with_noise_and_drift(stalled, seed=3, drift=0.0))
    check_events(Conveyor(stalled, extents), fired)


def test_an_empty_belt_with_noise_and_drifting_light_never_fires(conveyor: Conveyor) -> None:
    belt = conveyor.frames[0]
    detector = PresenceDetector(PresenceConfig())
    assert events(detector, with_noise_and_drift([belt] * 400, seed=4, drift=0.4)) == []
    # The background followed the light: a cell under the brighter light is still seen, once.
    brighter = [np.clip(frame.astype(np.float32) * 1.4, 0, 255).astype(np.uint8) for frame in conveyor.frames]
    fired = events(detector, with_noise_and_drift(brighter, seed=5, drift=0.0))
    check_events(conveyor, fired)


def test_a_sudden_change_of_light_is_learnt_and_cells_are_seen_again(conveyor: Conveyor) -> None:
    detector = PresenceDetector(PresenceConfig())
    belt = conveyor.frames[0]
    assert events(detector, with_noise_and_drift([belt] * 20, seed=6, drift=0.0)) == []
    brighter = [belt] * 40 + conveyor.frames
    relit = [np.clip(frame.astype(np.float32) * 1.5, 0, 255).astype(np.uint8) for frame in brighter]
    fired = events(detector, with_noise_and_drift(relit, seed=7, drift=0.0))
    check_events(conveyor, [index - 40 for index in fired])


def test_a_cell_larger_than_the_region_never_counts_as_in_view(conveyor: Conveyor) -> None:
    narrow = PresenceConfig(roi=(0.4, 0.0, 0.6, 1.0))  # 64 columns, the cell ~120: never wholly inside
    assert events(PresenceDetector(narrow), conveyor.frames) == []


def test_update_is_cheap_on_a_vga_frame(conveyor: Conveyor) -> None:
    detector = PresenceDetector(PresenceConfig())
    frames = [cv2.resize(frame, (640, 480)) for frame in conveyor.frames[:60]]
    durations = []
    for frame in frames:
        started = time.perf_counter()
        detector.update(frame)
        durations.append(time.perf_counter() - started)
    assert np.median(durations) < 2e-3, f"median {np.median(durations) * 1e3:.2f} ms"


def test_presence_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="roi"):
        PresenceConfig(roi=(0.6, 0.0, 0.4, 1.0))
    with pytest.raises(ValidationError, match="treshold"):
        PresenceConfig.model_validate({"treshold": 20})
