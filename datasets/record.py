"""`pouchline dataset record`: store a live station stream in the dataset format.

The recorder is a consumer like an inspection worker: it takes frames on credit and gives
the credit back only after the frame's image and manifest line are on disk, so a crash loses
at most the frames in its hands, and those go to another consumer (or are reported) by the
station's redelivery. Re-running into the same folder appends (the writer's crash-safe resume).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from pouchline.datasets.manifest import DatasetError, DatasetWriter
from pouchline.datasets.records import DatasetInfo
from pouchline.station.curve import CurveClientConfig
from pouchline.station.protocol import Frame
from pouchline.station.transport import FrameClient, TransportSettings

log = logging.getLogger(__name__)

#: Recorded frames without ground truth wait for a label from QA review.
UNLABELLED = "unlabelled"
CLASSES = ["ok", "swollen", "deformed", UNLABELLED]
_EXTENSIONS = {"jpeg": "jpg", "png": "png"}


@dataclass
class RecordResult:
    frames: int
    counts: dict[str, int]
    seconds: float


def _image_bytes(frame: Frame) -> tuple[bytes, str]:
    """The image as stored: captured JPEG/PNG bytes unchanged; raw pixels as lossless PNG."""
    header = frame.header
    if header.encoding in _EXTENSIONS:
        return bytes(frame.payload), _EXTENSIONS[header.encoding]
    ok, data = cv2.imencode(".png", frame.image())
    if not ok:
        raise DatasetError(f"{header.station}/{header.camera}", f"frame {header.seq}: cannot encode raw pixels as PNG")
    return data.tobytes(), "png"


def _fields(frame: Frame) -> dict[str, object]:
    header, truth = frame.header, frame.header.truth
    return {
        "id": f"{header.station}-{header.camera}-{header.seq}", "width": header.width, "height": header.height,
        "channels": header.channels, "view": header.view, "station": header.station, "camera": header.camera,
        "lot": header.lot, "cell": header.cell, "timestamp": header.t_wall,
        "labels": truth.labels if truth else [UNLABELLED], "severities": truth.severities if truth else {},
        "ground_truth": truth.ground_truth.model_dump() if truth and truth.ground_truth else None,
        "meta": {"exposure": header.exposure, "gain": header.gain, "trigger": header.trigger, "views": header.views,
                 "t_mono_ns": header.t_mono_ns},
    }


def record(connect: list[str], out: Path, *, count: int | None = None, duration_s: float | None = None,
           idle_s: float | None = None, curve: CurveClientConfig | None = None, settings: TransportSettings | None = None,
           progress: bool = True) -> RecordResult:
    """Record until ``count`` frames, ``duration_s`` seconds or ``idle_s`` without a frame (or Ctrl-C)."""
    info = DatasetInfo(name=out.name, classes=CLASSES, source={"kind": "record", "connect": connect})
    counts: Counter[str] = Counter()
    started = time.monotonic()
    # Credit no larger than what is left to record: frames taken beyond --count would go back
    # to the station for redelivery when the recorder stops.
    capacity = 8 if count is None else max(1, min(8, count))
    client = FrameClient(connect, name=f"recorder-{socket.gethostname()}", capacity=capacity, settings=settings, curve=curve)
    last_frame = time.monotonic()
    try:
        with DatasetWriter(out, info) as writer, Progress(SpinnerColumn(), TextColumn("[bold]record[/] {task.fields[n]} frames"),
                                                         TimeElapsedColumn(), disable=not progress) as bar:
            task = bar.add_task("record", n=0)
            while count is None or counts["stored"] < count:
                now = time.monotonic()
                if (duration_s is not None and now - started >= duration_s) or (idle_s is not None and now - last_frame >= idle_s):
                    break
                frame = client.receive(0.2)
                if frame is None:
                    continue
                last_frame = time.monotonic()
                _store(writer, frame, counts)
                client.done(frame.header.key)
                bar.update(task, n=counts["stored"])
    except KeyboardInterrupt:
        log.info("recording stopped by the user")
    finally:
        client.close()
        counts.update({f"malformed_{kind}": n for kind, n in client.rejected.counts.items()})
    return RecordResult(counts["stored"], dict(counts), time.monotonic() - started)


def _store(writer: DatasetWriter, frame: Frame, counts: Counter[str]) -> None:
    """One frame to disk; notices and duplicates are counted, never stored as images."""
    if frame.header.dropped is not None:
        counts[f"notices_{frame.header.dropped}"] += 1
        log.warning("station dropped frame %s of cell %s (%s): not in the recording", frame.header.key,
                    frame.header.cell, frame.header.dropped)
        return
    fields = _fields(frame)
    if fields["id"] in writer:
        counts["duplicates"] += 1  # redelivered after a consumer restart: already stored
        return
    data, ext = _image_bytes(frame)
    writer.add(image_bytes=data, image_ext=ext, **fields)
    counts["stored"] += 1
