"""`pouchline bench synth`: how fast the renderer makes frames, on one core and on all.

The headline is top-view 640x480 frames per second on one core, rendered and JPEG-encoded
(what a synthetic station sends). Side by side in the same run: render without encoding,
the side view, and a pool of worker processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import cv2

from pouchline.datasets.domain import load_domain
from pouchline.datasets.render import render_side, render_top
from pouchline.datasets.scene import CellScene, sample_scene
from pouchline.datasets.spec import CellSpec
from pouchline.datasets.synth import SynthConfig, render_cells
from pouchline.inspect.benchreport import BenchReport

_SIZE = (640, 480)


def _scenes(count: int, seed: int) -> list[CellScene]:
    spec, domain = CellSpec(), load_domain("default")
    return [sample_scene(seed, i, spec=spec, domain=domain, defect_rate=0.3) for i in range(count)]


def _rate(scenes: list[CellScene], work: Callable[[CellScene], object]) -> tuple[float, float]:
    """Frames per second and seconds for running ``work`` over every scene."""
    for scene in scenes[:10]:  # warm caches (compiled kernels, vignetting maps)
        work(scene)
    start = time.perf_counter()
    for scene in scenes:
        work(scene)
    seconds = time.perf_counter() - start
    return len(scenes) / seconds, seconds


def run(frames: int = 400, workers: int = 2) -> BenchReport:
    """Measure the renderer; one-core cases run pinned to a single CPU."""
    report = BenchReport("synth")
    allowed = os.sched_getaffinity(0)
    cv2.setNumThreads(1)
    scenes = _scenes(frames, seed=1234)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        cases = {
            "top 640x480 render+JPEG, 1 core": lambda s: render_top(s, _SIZE).jpeg,
            "top 640x480 render only, 1 core": lambda s: render_top(s, _SIZE).image,
            "side 640x480 render+JPEG, 1 core": lambda s: render_side(s, _SIZE).jpeg,
        }
        rates = {}
        for case, work in cases.items():
            rate, seconds = _rate(scenes, work)
            rates[case] = rate
            report.results.append({"case": case, "frames": frames, "seconds": seconds, "frames_per_s": rate})
    finally:
        os.sched_setaffinity(0, allowed)
    config = SynthConfig(count=frames, seed=1234, size=_SIZE)
    start = time.perf_counter()
    for _ in render_cells(config, list(range(frames)), workers):
        pass
    seconds = time.perf_counter() - start
    pool_rate = frames / seconds
    report.results.append({
        "case": f"top 640x480 render+JPEG+mask, {workers} worker processes (incl. start-up)",
        "frames": frames, "seconds": seconds, "frames_per_s": pool_rate,
    })
    one_core = rates["top 640x480 render+JPEG, 1 core"]
    report.figures["frames_per_s_1core"] = one_core
    report.figures[f"frames_per_s_{workers}workers"] = pool_rate
    report.ratios["jpeg_vs_render_only"] = one_core / rates["top 640x480 render only, 1 core"]
    report.ratios["side_vs_top"] = rates["side 640x480 render+JPEG, 1 core"] / one_core
    report.ratios[f"{workers}workers_vs_1core"] = pool_rate / one_core
    return report
