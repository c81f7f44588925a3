"""The collector: every worker's frame verdicts in, one verdict per cell out.

Views of one cell reach different workers (the transport balances frames, not cells), so
cells are put together here, in one place: `CellAggregator` decides them (worst view wins,
a missing view by the deadline rejects), and each decided cell goes to the sinks (the
controller link, a JSONL file, an in-process callback). Worker statistics arrive on the
same socket and are kept for `/status` and `/metrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from pouchline.inspect.aggregate import CellAggregator, Decided
from pouchline.inspect.metrics import LATENCY_BOUNDS_MS, Accumulator, PrometheusText, merge, quantile
from pouchline.inspect.verdicts import FrameVerdict, WorkerStats, decode
from pouchline.station.protocol import ProtocolError, RejectCounter

log = logging.getLogger(__name__)

_TICK_S = 0.02
_RATE_WINDOW_S = 5.0


class Sink(Protocol):
    """Somewhere decided cells go."""

    def send(self, decided: Decided) -> None: ...

    def tick(self) -> None:
        """Called every few ms: resends, flushes."""

    def close(self) -> None: ...


class Collector:
    """A thread that binds ``endpoint`` (PULL) and decides cells."""

    def __init__(self, endpoint: str, *, deadline_s: float, sinks: list[Sink] | None = None,
                 on_cell: Callable[[Decided], None] | None = None, context: zmq.Context | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.aggregator = CellAggregator(deadline_s)
        self.sinks = list(sinks or [])
        self.on_cell = on_cell
        self.rejected = RejectCounter()
        self.workers: dict[str, tuple[WorkerStats, float]] = {}
        self.cell_latency = Accumulator(LATENCY_BOUNDS_MS)
        self._recent: deque[float] = deque(maxlen=100_000)  # decision times, for cells/s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def start(self) -> Collector:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Decide what is still open (incomplete cells reject), flush the sinks, close."""
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            self._handle_waiting()
            for decided in self.aggregator.flush(time.time()):
                self._emit(decided)
        for sink in self.sinks:
            sink.close()
        self.socket.close(linger=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.socket.poll(_TICK_S * 1000)
            with self._lock:
                self._handle_waiting()
                for decided in self.aggregator.expire(time.time()):
                    self._emit(decided)
                for sink in self.sinks:
                    sink.tick()

    def _handle_waiting(self) -> None:
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                message, attachments = decode(parts, verify_hashes=False)  # the controller hashes what it stores
            except ProtocolError as error:
                self.rejected.record(error)
                continue
            if isinstance(message, FrameVerdict):
                decided = self.aggregator.add(message, [bytes(part) for part in attachments], time.time())
                if decided is not None:
                    self._emit(decided)
            elif isinstance(message, WorkerStats):
                self.workers[message.worker] = (message, time.time())
            else:
                self.rejected.record(ProtocolError("unexpected", f"a worker sent a {type(message).__name__}"))

    def _emit(self, decided: Decided) -> None:
        self._recent.append(decided.verdict.t_decided)
        self.cell_latency.observe((decided.verdict.t_decided - decided.verdict.t_capture) * 1000.0)
        for sink in self.sinks:
            try:
                sink.send(decided)
            except OSError as error:  # a full disk must not stop verdicts reaching the controller
                log.error("sink %s failed for %s: %s", type(sink).__name__, decided.verdict.cell_id, error)
        if self.on_cell is not None:
            self.on_cell(decided)

    # -- reporting ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Cells, reasons, latency, malformed messages and every worker's state, for /status."""
        with self._lock:
            now = time.time()
            latency = self.cell_latency.snapshot()
            recent = sum(1 for t in self._recent if now - t <= _RATE_WINDOW_S)
            return {
                "cells": dict(self.aggregator.counts),
                "cells_per_s": round(recent / _RATE_WINDOW_S, 2),
                "open_cells": self.aggregator.open_cells,
                "cell_latency_ms": {"p50": quantile(latency, 0.5), "p99": quantile(latency, 0.99)},
                "malformed": self.rejected.counts,
                "workers": {name: {"age_s": round(now - seen, 2), "pid": stats.pid, "held": stats.held,
                                   "model": None if stats.model is None else stats.model.version,
                                   "shadow": None if stats.shadow is None else stats.shadow.version,
                                   "counters": stats.counters}
                            for name, (stats, seen) in self.workers.items()},
            }

    def prometheus(self) -> str:
        """The service's metrics in Prometheus text format."""
        text = PrometheusText()
        with self._lock:
            workers = dict(self.workers)
            counts = dict(self.aggregator.counts)
            latency = self.cell_latency.snapshot()
            malformed = self.rejected.counts
        text.family("pouchline_cells_total", "counter", "Cells decided, by decision.")
        for decision in ("passed", "rejected"):
            text.sample("pouchline_cells_total", counts.get(f"cells_{decision}", 0), {"decision": decision})
        text.family("pouchline_cell_reject_reasons_total", "counter", "Rejected cells by reason.")
        for key, value in sorted(counts.items()):
            if key.startswith("reject_reason:"):
                text.sample("pouchline_cell_reject_reasons_total", value, {"reason": key.split(":", 1)[1]})
        text.family("pouchline_collector_events_total", "counter", "Duplicate and late views, deadline misses.")
        for key in ("duplicate_views", "late_views", "deadline_misses", "frame_verdicts"):
            text.sample("pouchline_collector_events_total", counts.get(key, 0), {"event": key})
        text.family("pouchline_malformed_messages_total", "counter", "Refused verdict messages by kind.")
        for kind, value in sorted(malformed.items()):
            text.sample("pouchline_malformed_messages_total", value, {"kind": kind})
        text.family("pouchline_cell_latency_ms", "histogram", "Capture to cell verdict.")
        text.histogram("pouchline_cell_latency_ms", latency)
        text.family("pouchline_worker_queue_depth", "gauge", "Frames a worker holds.")
        for name, (stats, _) in sorted(workers.items()):
            text.sample("pouchline_worker_queue_depth", stats.held, {"worker": name})
        text.family("pouchline_worker_events_total", "counter", "Worker counters (frames by status, drops, "
                                                                "shadow disagreements, model swaps, ...).")
        for name, (stats, _) in sorted(workers.items()):
            for key, value in sorted(stats.counters.items()):
                text.sample("pouchline_worker_events_total", value, {"worker": name, "event": key})
        names = sorted({key for stats, _ in workers.values() for key in stats.histograms})
        for key in names:
            merged = merge(stats.histograms[key] for stats, _ in workers.values() if key in stats.histograms)
            if merged is not None:
                metric = f"pouchline_worker_{key}"
                text.family(metric, "histogram", f"Workers' {key.replace('_', ' ')} (all workers).")
                text.histogram(metric, merged)
        return text.text()
