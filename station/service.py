"""`pouchline station run`: capture threads, cells, the frame server and the status endpoint.

One capture thread per camera reads its source and turns frames into cell views; the frame
server deals them to workers. A failing source (camera unplugged, file truncated) raises an
alarm and is reopened with exponential back-off; the station keeps serving its other cameras.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections import Counter, deque
from typing import Any

import cv2
import numpy as np
import zmq

from pouchline.station.config import CameraSettings, StationConfig
from pouchline.station.presence import PresenceDetector
from pouchline.station.protocol import (
    FrameHeader,
    HEADERS,
    FrameTruth,
    ProtocolError,
    RejectCounter,
    Trigger,
    decode,
    frame_header,
)
from pouchline.station.source import FrameSource, SourceError, SourceFrame, build_source
from pouchline.station.status import StatusServer
from pouchline.station.transport import FrameServer
from pouchline.station.triggers import OpenCell, TriggerBook

log = logging.getLogger(__name__)

_WINDOW = 1000  # latency samples kept per camera


def percentile(values: deque[float] | list[float], q: float) -> float | None:
    """``q``-th percentile of a window of samples (None when empty)."""
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


class Alarms:
    """Alarm events (source failures, reconnects): logged, counted and kept for the status page."""

    def __init__(self, keep: int = 200) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def raise_(self, camera: str, kind: str, message: str) -> None:
        log.warning("ALARM %s camera %s: %s", kind, camera, message)
        with self._lock:
            self.counts[kind] += 1
            self.recent.append({"t_wall": time.time(), "camera": camera, "kind": kind, "message": message})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self.counts), "recent": list(self.recent)}


class CameraRunner:
    """The capture loop of one camera."""

    def __init__(self, station: Station, settings: CameraSettings, source: FrameSource) -> None:
        self.station, self.settings, self.source = station, settings, source
        self.state = "starting"
        self.counts: Counter[str] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=_WINDOW)
        self.captured: deque[float] = deque(maxlen=_WINDOW)
        self._seq = itertools.count(time.time_ns() // 1_000)  # keys stay unique across station restarts
        self._presence = PresenceDetector(settings.presence) if settings.presence is not None else None
        self._cells = itertools.count(1)
        self.latest: SourceFrame | None = None
        self.thread = threading.Thread(target=self.run, name=f"camera-{settings.name}", daemon=True)

    def run(self) -> None:
        """Open, read, reopen with back-off on failure, until stopped or the source ends."""
        stop, wait = self.station.stopping, self.settings.reconnect_initial_s
        while not stop.is_set():
            try:
                self.source.open()
                if self.counts["failures"]:
                    self.station.alarms.raise_(self.settings.name, "reconnected", f"{self.source.name} is back")
                wait = self.settings.reconnect_initial_s
                self.state = "running"
                if self._read_until_end(stop):
                    break
            except SourceError as error:
                self.counts["failures"] += 1
                self.state = "reconnecting"
                self.station.alarms.raise_(self.settings.name, "source_failed", f"{error}; retrying in {wait:.1f} s")
                self.source.close()
                stop.wait(wait)
                wait = min(wait * 2, self.settings.reconnect_max_s)
        self.source.close()
        self.state = "finished" if not stop.is_set() else "stopped"

    def _read_until_end(self, stop: threading.Event) -> bool:
        """True when the source ended cleanly (files), False when asked to stop."""
        while not stop.is_set():
            frame = self.source.read()
            if frame is None:
                return True
            self.counts["captured"] += 1
            self.captured.append(time.monotonic())
            self.latest = frame  # a reference, no copy: the live view encodes it only when asked
            self._handle(frame)
        return False

    def _handle(self, frame: SourceFrame) -> None:
        cell = self._cell_of(frame)
        if cell is None:
            self.counts["idle"] += 1  # between cells: nothing to inspect
            return
        name, lot, views, trigger = cell
        view = frame.cell.view if trigger == "source" and frame.cell is not None else self.settings.view
        header = self.station.header(self.settings, next(self._seq), frame, cell=name, lot=lot, views=views,
                                     trigger=trigger, view=view)
        if self.station.server.submit(header, frame.payload, policy=self.source.policy, checked=frame.checked):
            self.counts["sent"] += 1
            self.latency_ms.append((time.monotonic_ns() - frame.t_mono_ns) / 1e6)

    def _cell_of(self, frame: SourceFrame) -> tuple[str, str, int, str] | None:
        mode = self.settings.cells
        if mode == "source":
            if frame.cell is None:
                raise SourceError(f"{self.source.name}: frame without a cell tag in cells = 'source' mode")
            return frame.cell.cell, frame.cell.lot, frame.cell.views, "source"
        if mode == "external":
            opened = self.station.book.claim(self.settings.name, frame.t_mono_ns)
            return None if opened is None else (opened.cell, opened.lot, self.station.book.views, "external")
        assert self._presence is not None
        if not self._presence.update(_small_gray(frame)):
            return None
        name = f"{self.station.config.name}-{self.settings.name}-{self.station.run_id}-{next(self._cells):06d}"
        return name, self.station.book.lot, 1, "presence"

    def live_jpeg(self) -> bytes | None:
        """The newest captured frame as JPEG (the camera's own bytes when it sends JPEG), for a live view."""
        frame = self.latest
        if frame is None:
            return None
        if frame.encoding == "jpeg":
            return bytes(frame.payload)
        image = frame.payload if isinstance(frame.payload, np.ndarray) else cv2.imdecode(
            np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_COLOR)
        if image.dtype != np.uint8:
            image = (image >> 8).astype(np.uint8)
        return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = [t for t in list(self.captured) if now - t <= 2.0]
        return {"state": self.state, "source": self.source.name, "policy": self.source.policy, **dict(self.counts),
                "fps": round(len(recent) / 2.0, 2), "latency_ms_p50": percentile(self.latency_ms, 50),
                "latency_ms_p99": percentile(self.latency_ms, 99)}


def _small_gray(frame: SourceFrame) -> np.ndarray:
    """A quarter-size grayscale copy for presence detection (JPEG decodes straight to it)."""
    if frame.encoding == "raw":
        image = np.asarray(frame.payload)
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        return cv2.resize(gray, (gray.shape[1] // 4, gray.shape[0] // 4), interpolation=cv2.INTER_AREA)
    gray = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_4)
    if gray is None:
        raise SourceError(f"frame {frame.width}x{frame.height} {frame.encoding}: cannot be decoded for presence detection")
    return gray


class Station:
    """A running station: start, status, trigger, stop."""

    def __init__(self, config: StationConfig, sources: dict[str, FrameSource] | None = None) -> None:
        self.config = config
        self.run_id = time.strftime("%Y%m%dT%H%M%S")
        self.stopping = threading.Event()
        self.alarms = Alarms()
        self.rejected_triggers = RejectCounter()
        self.book = TriggerBook(config.name, [c.name for c in config.cameras if c.cells == "external"], config.lot,
                                config.trigger_timeout_s)
        sources = sources or {}
        self.cameras = [CameraRunner(self, c, sources.get(c.name) or build_source(c.source)) for c in config.cameras]
        self.server = FrameServer(config.bind, station=config.name, settings=config.transport, curve=config.curve)
        self._notice_seq = itertools.count(time.time_ns() // 1_000)
        self._threads = [threading.Thread(target=self._watch_triggers, name="trigger-deadlines", daemon=True)]
        if config.trigger is not None:
            self._threads.append(threading.Thread(target=self._listen_triggers, name="trigger-listener", daemon=True))
        self.status_server = StatusServer(config.status, self) if config.status else None

    def header(self, camera: CameraSettings, seq: int, frame: SourceFrame | None, *, cell: str, lot: str, views: int,
               trigger: str, dropped: str | None = None, view: str | None = None) -> FrameHeader:
        """The wire header of one view (``frame`` None: a notice for a view never captured).
        ``view`` defaults to the camera's; a source that tags cells names each frame's own.

        Everything but the frame's own fields (cell, seq, clocks, size) nearly always repeats
        from frame to frame, so headers come from the `HeaderStamp` of their combination
        (`HeaderValidator.stamp`); frames with ground truth (it changes per frame) are validated whole."""
        if frame is None:
            clocks, nbytes = (time.monotonic_ns(), time.time()), 0
            taken: dict[str, Any] = dict(exposure=None, gain=None, encoding="jpeg", width=1, height=1, channels=3,
                                         dtype="uint8", truth=None)
        else:
            raw = isinstance(frame.payload, np.ndarray)
            clocks, nbytes = (frame.t_mono_ns, frame.t_wall), frame.payload.nbytes if raw else len(frame.payload)
            taken = dict(exposure=frame.exposure, gain=frame.gain, encoding=frame.encoding, width=frame.width,
                         height=frame.height, channels=frame.channels, dtype=str(frame.payload.dtype) if raw else "uint8",
                         truth=FrameTruth.model_validate(frame.truth) if frame.truth else None)
        repeating = dict(v=1, station=self.config.name, camera=camera.name, lot=lot, view=view or camera.view,
                         views=views, trigger=trigger, dropped=dropped, **taken)
        if taken["truth"] is not None:
            return frame_header(cell=cell, seq=seq, t_mono_ns=clocks[0], t_wall=clocks[1], nbytes=nbytes, **repeating)
        return HEADERS.stamp(repeating).stamp(cell, seq, clocks[0], clocks[1], nbytes)

    def trigger(self, lot: str | None = None, cell: str | None = None) -> OpenCell:
        """A cell arrived (from the PLC, HTTP or a test)."""
        return self.book.trigger(lot, cell)

    def start(self) -> Station:
        for camera in self.cameras:
            camera.thread.start()
        for thread in self._threads:
            thread.start()
        if self.status_server is not None:
            self.status_server.start()
        log.info("station %s serving frames at %s", self.config.name, self.server.endpoint)
        return self

    def finished(self) -> bool:
        return all(not camera.thread.is_alive() for camera in self.cameras)

    def wait(self, *, handle_signals: bool = True) -> None:
        """Block until SIGINT/SIGTERM (or, with ``exit_when_done``, until every source ended)."""
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.stopping.set())
        while not self.stopping.wait(0.2):
            if self.config.exit_when_done and self.finished():
                break

    def stop(self) -> dict[str, Any]:
        """Stop capturing, deliver what is held (grace period), report and close."""
        self.stopping.set()
        for camera in self.cameras:
            camera.thread.join(timeout=5)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=2)
        final = self.status()
        final["transport"] = self.server.close()
        if self.status_server is not None:
            self.status_server.stop()
        return final

    def status(self) -> dict[str, Any]:
        return {
            "station": self.config.name, "endpoint": self.server.endpoint, "lot": self.book.lot,
            "cameras": {camera.settings.name: camera.snapshot() for camera in self.cameras},
            "transport": self.server.stats(), "alarms": self.alarms.snapshot(),
            "malformed_triggers": self.rejected_triggers.counts,
        }

    def _watch_triggers(self) -> None:
        """Views a triggered camera never delivered become drop notices: the cell is rejected."""
        by_name = {camera.name: camera for camera in self.config.cameras}
        while not self.stopping.wait(0.05):
            for opened, camera in self.book.overdue():
                self.alarms.raise_(camera, "missed_view", f"cell {opened.cell}: no frame within the trigger deadline")
                header = self.header(by_name[camera], next(self._notice_seq), None, cell=opened.cell, lot=opened.lot,
                                     views=self.book.views, trigger="external", dropped="no_frame")
                self.server.submit(header, b"", policy="newest")

    def _listen_triggers(self) -> None:
        """Trigger messages from the line over ZeroMQ (PULL); malformed ones are counted and dropped."""
        assert self.config.trigger is not None
        context = zmq.Context()
        socket = context.socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self.config.trigger)
        try:
            while not self.stopping.is_set():
                if not socket.poll(100):
                    continue
                parts = socket.recv_multipart(copy=False)
                try:
                    message = decode(parts)
                    if not isinstance(message, Trigger):
                        raise ProtocolError("unexpected", f"the trigger socket got a {type(message).__name__} message")
                    if message.station not in (None, self.config.name):
                        raise ProtocolError("unexpected", f"trigger for station {message.station!r}")
                    self.trigger(message.lot, message.cell)
                except ProtocolError as error:
                    self.rejected_triggers.record(error)
                except ValueError as error:
                    self.rejected_triggers.record(ProtocolError("control_invalid", str(error)))
        finally:
            socket.close(linger=0)
            context.term()
