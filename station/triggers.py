"""Cells announced by the line: an external trigger (PLC over ZeroMQ, or HTTP) opens a cell and
the next frame of each triggered camera becomes one of its views.

A view that no camera delivers before the deadline is not forgotten: it comes back from
`overdue` so the station can send a drop notice for it, and the cell is rejected fail-safe.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from pouchline.datasets.records import check_identifier


@dataclass
class OpenCell:
    """A triggered cell waiting for its views."""

    cell: str
    lot: str
    t_mono_ns: int
    waiting: set[str] = field(default_factory=set)


class TriggerBook:
    """Thread-safe: triggers arrive on the trigger thread, frames claim cells on capture threads."""

    def __init__(self, station: str, cameras: list[str], lot: str, timeout_s: float) -> None:
        self.station = station
        self.cameras = list(cameras)
        self.lot = lot
        self.timeout_ns = int(timeout_s * 1e9)
        self._open: list[OpenCell] = []
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._run = time.strftime("%Y%m%dT%H%M%S")

    @property
    def views(self) -> int:
        return len(self.cameras)

    def trigger(self, lot: str | None = None, cell: str | None = None) -> OpenCell:
        """Open a cell now; ``lot`` (if given) becomes the current lot for later triggers too."""
        if not self.cameras:
            raise ValueError(f"station {self.station} has no externally triggered camera")
        with self._lock:
            if lot is not None:
                self.lot = check_identifier(lot, "lot")
            name = check_identifier(cell, "cell") if cell else f"{self.station}-{self._run}-{next(self._counter):06d}"
            opened = OpenCell(name, self.lot, time.monotonic_ns(), set(self.cameras))
            self._open.append(opened)
            return opened

    def claim(self, camera: str, t_mono_ns: int) -> OpenCell | None:
        """The oldest open cell this camera still owes a view, triggered before the frame was taken."""
        with self._lock:
            for opened in self._open:
                if camera in opened.waiting and opened.t_mono_ns <= t_mono_ns:
                    opened.waiting.discard(camera)
                    self._prune()
                    return opened
        return None

    def overdue(self, now_ns: int | None = None) -> list[tuple[OpenCell, str]]:
        """Views past their deadline, each returned once (the cell is then closed for them)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        late = []
        with self._lock:
            for opened in self._open:
                if now_ns - opened.t_mono_ns > self.timeout_ns:
                    late.extend((opened, camera) for camera in sorted(opened.waiting))
                    opened.waiting.clear()
            self._prune()
        return late

    def _prune(self) -> None:
        self._open = [opened for opened in self._open if opened.waiting]
