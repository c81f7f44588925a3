"""`pouchline bench pipeline`: station -> transport -> workers -> verdicts, against the floor.

All on this machine, side by side in one run, on the same rendered 1280x960 JPEG cells:

* ``floor``: decode-to-model-size + locate + inference (+ post-processing) alone, in
  process, no transport: one process per worker, each judging the frames in batches, for
  the same wall time; frames/s summed.
* ``pipeline_saturation``: a station process offers frames as fast as the workers take them
  (credit flow control) through the real transport to the real inspection service (worker
  processes, collector); frames/s from the first to the last cell verdict.
* ``pipeline_paced``: the same at a fixed 60 frames/s; capture-to-cell-verdict latency p50/p99.

Ratio ``throughput_vs_floor``; figures ``p99_latency_ms_at_60fps`` and ``frames_without_verdict``
(frames offered whose cell never got a verdict, or got one only as a fail-safe for a missing view).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from pouchline.inspect.aggregate import Decided
from pouchline.inspect.benchreport import BenchReport
from pouchline.inspect.config import SHIPPED_MODEL, BatchSettings, InspectConfig
from pouchline.inspect.service import InspectService
from pouchline.station.bench import submit_encoded
from pouchline.station.protocol import FrameHeader, HeaderStamp
from pouchline.station.transport import FrameServer, TransportSettings

SIZE = (1280, 960)
_STATION = "bench"


def render_frames(folder: Path, count: int) -> list[Path]:
    """``count`` synthetic top-view cells at 1280x960 as JPEG files (30 % defective)."""
    from pouchline.datasets.synth import SynthConfig, render_cell

    config = SynthConfig(count=count, seed=11, views=("top",), size=SIZE, defect_rate=0.3)
    paths = []
    for index in range(count):
        path = folder / f"{index:04d}.jpg"
        path.write_bytes(render_cell(config, index)[0]["image_bytes"])
        paths.append(path)
    return paths


def _floor_process(model: str, folder: str, seconds: float, max_batch: int, start_at: float,
                   results: Any) -> None:
    """Judge the frames over and over for ``seconds`` from ``start_at``: decode, locate, infer, post."""
    import cv2

    from pouchline.inspect.imagedecode import decode_for_model
    from pouchline.inspect.worker import working_size
    from pouchline.models.inference import Inferencer
    from pouchline.station.protocol import Frame

    cv2.setNumThreads(1)
    model_ = Inferencer(Path(model), threads=1)
    size = working_size(model_.meta)
    frames = []
    for index, path in enumerate(sorted(Path(folder).glob("*.jpg"))):
        data = path.read_bytes()
        header = FrameHeader(v=1, station=_STATION, camera="top", lot="L", cell=f"c{index}", view="top", views=1,
                             seq=index, t_mono_ns=0, t_wall=0.0, exposure=None, gain=None, trigger="source",
                             encoding="jpeg", width=SIZE[0], height=SIZE[1], channels=3, dtype="uint8",
                             nbytes=len(data), dropped=None, truth=None)
        frames.append(Frame(header, memoryview(data)))
    time.sleep(max(0.0, start_at - time.time()))
    done, end = 0, time.time() + seconds
    while time.time() < end:
        for start in range(0, len(frames), max_batch):
            tensors, located = [], []
            for frame in frames[start : start + max_batch]:
                decoded = decode_for_model(frame, size, 40_000_000)
                tensor, where = model_.pre_process(decoded.image)
                if tensor is not None:
                    tensors.append(tensor)
                    located.append(where)
            if tensors:
                outputs = model_.forward(np.stack(tensors))
                for row, where in enumerate(located):
                    model_.post_process(outputs, row, where)
            done += len(frames[start : start + max_batch])
    results.put(done)


def floor(model: Path, folder: Path, processes: int, seconds: float, max_batch: int) -> float:
    """Frames/s of the judging work alone, ``processes`` processes at once."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 6.0  # every process has loaded its model and frames by then
    workers = [context.Process(target=_floor_process, args=(str(model), str(folder), seconds, max_batch, start_at,
                                                            results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    total = sum(results.get(timeout=120 + seconds) for _ in workers)
    for worker in workers:
        worker.join()
    return total / seconds


def _station_process(endpoint: str, folder: str, count: int, rate: float, workers: int) -> None:
    """A station offering ``count`` frames (cycling through the files), paced at ``rate`` (0: saturate),
    once ``workers`` workers have joined and mapped its arena (as on a line, where stations run first)."""
    payloads = [path.read_bytes() for path in sorted(Path(folder).glob("*.jpg"))]
    server = FrameServer(endpoint, station=_STATION, settings=TransportSettings(max_pending=64, shutdown_grace_s=30))
    deadline = time.monotonic() + 60
    while sum(w["local"] for w in server.stats()["workers"]) < workers and time.monotonic() < deadline:
        time.sleep(0.05)
    stamp = HeaderStamp(v=1, station=_STATION, camera="top", lot="BENCH", view="top", views=1, exposure=None, gain=None,
                        trigger="source", encoding="jpeg", width=SIZE[0], height=SIZE[1], channels=3, dtype="uint8",
                        dropped=None, truth=None)
    begin = time.monotonic()
    for seq in range(count):
        if rate:
            time.sleep(max(0.0, begin + seq / rate - time.monotonic()))
        submit_encoded(server, stamp, f"c{seq:06d}", seq, payloads[seq % len(payloads)])
    server.close()


class _Tally:
    """Cell verdicts as the collector decides them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cells: dict[str, tuple[float, float, list[str]]] = {}

    def __call__(self, decided: Decided) -> None:
        verdict = decided.verdict
        with self.lock:
            self.cells[verdict.cell] = (verdict.t_decided, (verdict.t_decided - verdict.t_capture) * 1000.0,
                                        verdict.reasons)


def pipeline(folder: Path, config: InspectConfig, count: int, rate: float, progress: Progress) -> dict[str, Any]:
    """Run the real service and a station process; what the collector decided."""
    from pouchline.station.bench import free_port

    tally = _Tally()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = multiprocessing.get_context("spawn")
    station = context.Process(target=_station_process, args=(endpoint, str(folder), count, rate, config.workers))
    station.start()
    service = InspectService(config.model_copy(update={"stations": [endpoint]}))
    assert service.collector is not None
    service.collector.on_cell = tally
    service.start()
    task = progress.add_task(f"pipeline {'saturation' if not rate else f'{rate:g} fps'}", total=count)
    try:
        last, idle_since = 0, time.monotonic() + 60  # start-up: workers load their models
        while time.monotonic() - idle_since < 10.0 and last < count:
            time.sleep(0.2)
            with tally.lock:
                seen = len(tally.cells)
            if seen != last:
                last, idle_since = seen, time.monotonic()
            progress.update(task, completed=seen)
        station.join(timeout=30)
    finally:
        service.stop()
        if station.is_alive():
            station.terminate()
    with tally.lock:
        cells = dict(tally.cells)
    decided = sorted(t for t, _, _ in cells.values())
    latencies = np.array([latency for _, latency, _ in cells.values()])
    fail_safe = sum("missing_view" in reasons for _, _, reasons in cells.values())
    span = decided[-1] - decided[0] if len(decided) > 1 else float("nan")
    return {
        "frames": count, "verdicts": len(cells), "fps": (len(decided) - 1) / span if span else float("nan"),
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        "without_verdict": count - len(cells) + fail_safe,
    }


def run(*, frames: int, paced_frames: int, rate: float, workers: int, floor_s: float, model: Path = SHIPPED_MODEL,
        batching: BatchSettings | None = None) -> BenchReport:
    report = BenchReport("pipeline")
    batching = batching or BatchSettings()
    config = InspectConfig(stations=["tcp://127.0.0.1:1"], collect="tcp://127.0.0.1:0", http=None, model=model,
                           workers=workers, batching=batching, audit_rate=0.0, watch_model=False, cell_deadline_s=5.0)
    with tempfile.TemporaryDirectory(prefix="pouchline-bench-") as tmp, Progress() as progress:
        folder = Path(tmp)
        task = progress.add_task("render 1280x960 cells", total=None)
        render_frames(folder, 48)
        progress.update(task, total=1, completed=1)
        task = progress.add_task(f"floor ({workers} processes, {floor_s:g} s)", total=None)
        floor_fps = floor(model, folder, workers, floor_s, batching.max_batch)
        progress.update(task, total=1, completed=1)
        saturated = pipeline(folder, config, frames, 0.0, progress)
        paced = pipeline(folder, config, paced_frames, rate, progress)
    report.results = [
        {"case": "floor", "frames_per_s": floor_fps},
        {"case": "pipeline", "frames_per_s": saturated["fps"], "p50_ms": saturated["p50_ms"],
         "p99_ms": saturated["p99_ms"], "frames": saturated["frames"], "no_verdict": saturated["without_verdict"]},
        {"case": f"at {rate:g} fps", "frames_per_s": paced["fps"], "p50_ms": paced["p50_ms"],
         "p99_ms": paced["p99_ms"], "frames": paced["frames"], "no_verdict": paced["without_verdict"]},
    ]
    report.figures = {
        "floor_fps": floor_fps,
        "pipeline_fps": saturated["fps"],
        "p50_latency_ms_at_60fps": paced["p50_ms"],
        "p99_latency_ms_at_60fps": paced["p99_ms"],
        "frames_without_verdict": saturated["without_verdict"] + paced["without_verdict"],
        "workers": workers,
        "max_batch": batching.max_batch,
        "max_wait_ms": batching.max_wait_ms,
    }
    report.ratios = {"throughput_vs_floor": saturated["fps"] / floor_fps}
    return report
