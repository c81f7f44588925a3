"""An inspection worker: frames in from stations, one verdict per frame out to the collector.

The loop: take frames as they arrive and decode and locate each at once (so the batching
wait is not idle), run one forward pass for the batch when it is full or its first frame
has waited ``max_wait_ms``, post-process, send the verdicts, then hand the frames' credit
back to their stations. Credit goes back only after the verdict is sent: a worker that dies
mid-batch leaves its frames with the stations, which deliver them again.

Every frame gets a verdict, whatever happens to it: a drop notice, a malformed message
that still names its frame, bytes that do not decode, no cell in view, a view without a
model, an inference error. All of those reject (fail-safe); only an inspected cell passes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pouchline.inspect.aggregate import audit_sampled
from pouchline.inspect.config import InspectConfig
from pouchline.inspect.imagedecode import DecodeError, Decoded, decode_for_model
from pouchline.inspect.metrics import BATCH_BOUNDS, LATENCY_BOUNDS_MS, Accumulator
from pouchline.inspect.modelslot import ModelSlot, model_ref, one_model_per_view
from pouchline.inspect.overlay import overlay_layer
from pouchline.inspect.verdicts import MAX_OUTLINE_POINTS, FrameVerdict, ShadowResult, WorkerStats, attachment, encode
from pouchline.models.inference import Inferencer, Prediction
from pouchline.models.locate import Located
from pouchline.models.metadata import ModelError, ModelMetadata, load_metadata
from pouchline.station.protocol import Frame, ProtocolError
from pouchline.station.transport import FrameClient

log = logging.getLogger(__name__)

#: Class name that means "good" for multi-class models (anything else flagged rejects).
GOOD_CLASS = "ok"
_STATS_INTERVAL_S = 1.0


class ControlMessage(BaseModel):
    """From the service to its workers: reload the model (optionally another file) or stop."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["reload", "stop"] = Field(description="What to do.")
    model: str | None = Field(None, max_length=4096, description="Model file to load instead of the current one.")


@dataclass
class _Pending:
    """A received frame on its way to a verdict."""

    frame: Frame
    t_received: float  # time.time()
    timings: dict[str, float] = field(default_factory=dict)
    decoded: Decoded | None = None
    located: Located | None = None
    tensor: np.ndarray | None = None  # model input; None once a verdict is settled without the model
    verdict: FrameVerdict | None = None
    heat: np.ndarray | None = None  # crop-space heat map, for the overlay


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _decision(prediction: Prediction) -> tuple[str, list[str]]:
    reasons = [flag for flag in prediction.flagged if flag != GOOD_CLASS]
    return ("reject" if reasons else "pass"), reasons


def working_size(meta: ModelMetadata) -> tuple[int, int]:
    """Smallest frame size worth decoding: the frames the model was trained on (aligned crops: the crop)."""
    size = meta.training.get("source", {}).get("size")
    if meta.input.aligned_crops or not size:
        return meta.input.width, meta.input.height
    return int(size[0]), int(size[1])


def _boxes(regions: list[list[list[float]]]) -> list[list[float]]:
    boxes = []
    for outline in regions:
        xs, ys = [p[0] for p in outline], [p[1] for p in outline]
        boxes.append([min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)])
    return boxes


class InspectionWorker:
    """One worker: a frame client, a model slot (and a shadow), a PUSH socket to the collector."""

    def __init__(self, config: InspectConfig, name: str, *, collector: str, control: str | None = None) -> None:
        cv2.setNumThreads(1)  # one process per core: OpenCV's own pool would oversubscribe the machine
        self.config = config
        self.name = name
        slots = [ModelSlot(path, threads=config.threads, watch=config.watch_model) for path in (config.model, *config.more_models)]
        one_model_per_view((slot.model.meta.input.view, slot.path) for slot in slots)
        self.slots = {slot.model.meta.input.view: slot for slot in slots}  # the first is the primary model
        self.shadow = Inferencer(config.shadow, threads=config.threads) if config.shadow else None
        self.client = FrameClient(config.stations, name=name, capacity=config.capacity, settings=config.transport,
                                  curve=config.curve, zero_copy=True)
        self.counts: Counter[str] = Counter()
        self.histograms = {name: Accumulator(LATENCY_BOUNDS_MS) for name in
                           ("latency_ms", "queue_ms", "decode_ms", "locate_ms", "infer_ms")}
        self.histograms["batch_size"] = Accumulator(BATCH_BOUNDS)
        self._context = zmq.Context()
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 2000)
        self._push.setsockopt(zmq.SNDHWM, 10_000)
        self._push.connect(collector)
        self._control = None
        if control is not None:
            self._control = self._context.socket(zmq.SUB)
            self._control.setsockopt(zmq.SUBSCRIBE, b"")
            self._control.connect(control)
        self._next_stats = 0.0
        self.stopping = threading.Event()

    # -- the loop -----------------------------------------------------------------------

    def run(self, max_frames: int | None = None) -> None:
        """Judge frames until stopped (a control message, `stopping`, or ``max_frames`` verdicts)."""
        try:
            while not self.stopping.is_set() and (max_frames is None or self.counts["verdicts"] < max_frames):
                self.step()
        finally:
            self.close()

    def step(self, timeout_s: float = 0.1) -> int:
        """Gather one batch (waiting up to ``timeout_s`` for its first frame) and judge it."""
        self._listen()
        for slot in self.slots.values():
            if slot.poll():
                self.counts["model_swaps"] += 1
        batch = self._gather(timeout_s)
        self._answer_refused()
        if batch:
            self._judge(batch)
        if time.monotonic() >= self._next_stats:
            self._send_stats()
        return len(batch)

    def _listen(self) -> None:
        while self._control is not None:
            try:
                data = self._control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = ControlMessage.model_validate_json(data)
            except ValidationError as error:
                self.counts["control_refused"] += 1
                log.warning("worker %s: refused a control message: %s", self.name, error)
                continue
            if message.type == "stop":
                self.stopping.set()
            else:
                self._reload(None if message.model is None else Path(message.model))

    def _reload(self, path: Path | None) -> None:
        """Reload every model, or load ``path`` into the slot of the view it judges."""
        if path is None:
            for slot in self.slots.values():
                slot.request()
            return
        try:
            view = load_metadata(path, verify_hash=False).input.view
        except ModelError as error:
            self.counts["model_reload_failures"] += 1
            log.error("worker %s: cannot reload %s: %s", self.name, path, error)
            return
        if view not in self.slots:
            self.counts["model_reload_failures"] += 1
            log.error("worker %s: %s judges '%s' frames; no model of this service does", self.name, path, view)
            return
        self.slots[view].request(path)

    def _gather(self, timeout_s: float) -> list[_Pending]:
        first = self.client.receive(timeout_s)
        if first is None:
            return []
        batch = [self._prepare(first)]
        until = time.monotonic() + self.config.batching.max_wait_ms / 1000.0
        while len(batch) < self.config.batching.max_batch:
            frame = self.client.receive(max(0.0, until - time.monotonic()))
            if frame is None:
                break
            batch.append(self._prepare(frame))
        return batch

    # -- before the model -----------------------------------------------------------------

    def _prepare(self, frame: Frame) -> _Pending:
        """Decode and locate at once; frames that need no model get their verdict here."""
        pending = _Pending(frame, time.time())
        header = frame.header
        pending.timings["queue"] = max(0.0, (pending.t_received - header.t_wall) * 1000.0)
        if header.dropped is not None:
            return self._settle(pending, "dropped", f"dropped:{header.dropped}", f"the station dropped it ({header.dropped})")
        if header.view in self.config.skip_views:
            return self._settle(pending, "skipped", None, "view not judged by this service")
        slot = self.slots.get(header.view)
        if slot is None:
            return self._settle(pending, "unsupported_view", "unsupported_view",
                                f"view {header.view!r}: no model judges it (models judge {', '.join(map(repr, self.slots))})")
        start = time.perf_counter()
        try:
            pending.decoded = decode_for_model(frame, working_size(slot.model.meta), self.config.max_pixels)
        except DecodeError as error:
            return self._settle(pending, error.status, error.status, error.message)
        except ProtocolError as error:  # arena_stale: the station reused the bytes; it delivers the frame again
            return self._settle(pending, "undecodable", "undecodable", str(error))
        pending.timings["decode"] = _ms(start)
        start = time.perf_counter()
        try:
            tensor, located = slot.model.pre_process(pending.decoded.image)
        except (ValueError, cv2.error) as error:
            return self._settle(pending, "undecodable", "undecodable", f"cannot locate in this image: {error}")
        pending.timings["locate"] = _ms(start)
        pending.located = located
        if tensor is None:
            return self._settle(pending, located.status, located.status,
                                "no cell in view" if located.status == "no_cell" else "the cell touches the image border")
        pending.tensor = tensor
        return pending

    def _settle(self, pending: _Pending, status: str, reason: str | None, detail: str) -> _Pending:
        pending.verdict = self._verdict(pending, status=status, decision="pass" if reason is None else "reject",
                                        reasons=[] if reason is None else [reason], detail=detail)
        self.counts[f"status:{status}"] += 1
        return pending

    def _verdict(self, pending: _Pending, **fields: Any) -> FrameVerdict:
        header = pending.frame.header
        return FrameVerdict(
            station=header.station, camera=header.camera, lot=header.lot, cell=header.cell, view=header.view,
            views=header.views, seq=header.seq, t_capture=header.t_wall, worker=self.name, truth=header.truth,
            timings_ms={**{key: round(value, 3) for key, value in pending.timings.items()},
                        "total": round(max(0.0, time.time() - header.t_wall) * 1000.0, 3)}, **fields,
        )

    # -- the model and after ----------------------------------------------------------------

    def _judge(self, batch: list[_Pending]) -> None:
        ready = [pending for pending in batch if pending.tensor is not None]
        self.histograms["batch_size"].observe(len(ready))
        for view, slot in self.slots.items():
            judged = [pending for pending in ready if pending.frame.header.view == view]
            if judged:
                self._infer(slot, judged)
        messages = [self._message(pending) for pending in batch]
        for parts in messages:
            self._push.send_multipart(parts, copy=False)
        now = time.time()
        for pending in batch:
            verdict = pending.verdict
            assert verdict is not None
            self.histograms["latency_ms"].observe((now - verdict.t_capture) * 1000.0)
            for stage in ("queue", "decode", "locate", "infer"):
                if stage in pending.timings:
                    self.histograms[f"{stage}_ms"].observe(pending.timings[stage])
        self.client.done(*(pending.frame.header.key for pending in batch))
        self.counts["verdicts"] += len(batch)
        self.counts["frames_rejected"] += sum(pending.verdict.decision == "reject" for pending in batch)  # type: ignore[union-attr]

    def _infer(self, slot: ModelSlot, ready: list[_Pending]) -> None:
        model = slot.model
        shadow = self.shadow if self.shadow is not None and self.shadow.meta.input.view == model.meta.input.view else None
        tensors = np.stack([pending.tensor for pending in ready])  # type: ignore[misc]
        start = time.perf_counter()
        try:
            outputs = model.forward(tensors)
            shadow_outputs = None if shadow is None else shadow.forward(tensors)
        except Exception as error:  # onnxruntime raises its own types; every frame still gets a verdict
            log.exception("worker %s: inference failed for a batch of %d", self.name, len(ready))
            for pending in ready:
                self._settle(pending, "error", "inference_error", f"inference failed: {error}")
            return
        infer_ms = _ms(start) / len(ready)
        for row, pending in enumerate(ready):
            pending.timings["infer"] = infer_ms
            start = time.perf_counter()
            prediction = model.post_process(outputs, row, pending.located)  # type: ignore[arg-type]
            decision, reasons = _decision(prediction)
            disagreement = None if shadow_outputs is None else self._shadow(shadow_outputs, row, pending, decision)
            scale = pending.decoded.scale  # type: ignore[union-attr]
            regions = [[[x * scale, y * scale] for x, y in outline[:: len(outline) // MAX_OUTLINE_POINTS + 1]]
                       for outline in prediction.regions[:64]]
            pending.timings["post"] = _ms(start)
            pending.verdict = self._verdict(
                pending, status="ok", decision=decision, reasons=reasons, probs=prediction.probs,
                anomaly=prediction.anomaly, swelling_mm=_finite(prediction.swelling_mm),
                swelling_pct=_finite(prediction.swelling_pct), regions=regions, boxes=_boxes(regions),
                cell_corners=_corners(pending.located, scale), model=slot.ref, shadow=disagreement,
            )
            pending.tensor = None
            pending.heat = prediction.heatmap
            self.counts["status:ok"] += 1

    def _shadow(self, outputs: dict[str, np.ndarray], row: int, pending: _Pending, live: str) -> ShadowResult:
        assert self.shadow is not None
        prediction = self.shadow.post_process(outputs, row, pending.located)  # type: ignore[arg-type]
        decision, reasons = _decision(prediction)
        if decision != live:
            self.counts["shadow_disagreements"] += 1
            header = pending.frame.header
            log.info("shadow %s disagrees on %s/%s/%s (%s): live %s, shadow %s %s", self.shadow.meta.version,
                     header.station, header.lot, header.cell, header.camera, live, decision, reasons)
        self.counts["shadow_judged"] += 1
        return ShadowResult(model=model_ref(self.shadow), decision=decision, reasons=reasons, probs=prediction.probs)  # type: ignore[arg-type]

    def _message(self, pending: _Pending) -> list[Any]:
        """The verdict message; flagged and audit-sampled frames carry their image and overlay."""
        verdict = pending.verdict
        assert verdict is not None
        keep = verdict.decision == "reject" or audit_sampled(verdict.cell_id, self.config.audit_rate)
        frame = pending.frame
        if not keep or frame.header.dropped is not None or len(frame.payload) == 0:
            return encode(verdict)
        parts = [bytes(frame.payload)]
        try:
            frame.verify()
        except ProtocolError:  # reused under us: the station delivers the frame again, the copy is not this frame
            return encode(verdict)
        if pending.decoded is not None and pending.located is not None and pending.heat is not None:
            image = pending.decoded.image
            parts.append(overlay_layer((image.shape[1], image.shape[0]), pending.located, pending.heat))
        listed = [attachment("image" if i == 0 else "overlay", verdict.camera, data, i) for i, data in enumerate(parts)]
        pending.verdict = verdict.model_copy(update={"attachments": listed})
        return encode(pending.verdict, parts)

    def _answer_refused(self) -> None:
        """Malformed frames that named their cell: a fail-safe reject verdict for each."""
        while self.client.refused:
            error = self.client.refused.popleft()
            fields = error.salvage or {}
            if not {"lot", "cell"} <= fields.keys():
                self.counts["refused_unattributed"] += 1
                continue
            verdict = FrameVerdict(
                station=fields["station"], camera=fields["camera"], seq=fields["seq"], lot=fields["lot"],
                cell=fields["cell"], view=fields.get("view", "unknown"), views=fields.get("views", 1),
                t_capture=fields.get("t_wall", time.time()), status="refused", decision="reject",
                reasons=[f"refused:{error.kind}"], detail=str(error)[:2000], worker=self.name,
            )
            self._push.send_multipart(encode(verdict))
            self.counts["status:refused"] += 1
            self.counts["verdicts"] += 1

    def _send_stats(self) -> None:
        self._next_stats = time.monotonic() + _STATS_INTERVAL_S
        counters = {**self.counts, **{f"transport:{k}": v for k, v in self.client.stats.items()},
                    **{f"malformed:{k}": v for k, v in self.client.rejected.counts.items()},
                    "model_reload_failures": self.counts["model_reload_failures"]
                    + sum(slot.failures for slot in self.slots.values())}
        stats = WorkerStats(worker=self.name, pid=os.getpid(), counters=counters,
                            histograms={name: acc.snapshot() for name, acc in self.histograms.items()},
                            held=self.client.held, model=next(iter(self.slots.values())).ref,
                            more_models=[slot.ref for slot in list(self.slots.values())[1:]],
                            shadow=None if self.shadow is None else model_ref(self.shadow))
        self._push.send_multipart(encode(stats))

    def close(self) -> None:
        self._send_stats()
        self.client.close()
        for slot in self.slots.values():
            slot.close()
        self._push.close()
        if self._control is not None:
            self._control.close(linger=0)
        self._context.term()


def _corners(located: Located | None, scale: float) -> list[list[float]] | None:
    if located is None or located.corners is None:
        return None
    return [[float(x) * scale, float(y) * scale] for x, y in located.corners]


def _finite(value: float) -> float | None:
    return None if value != value or value in (float("inf"), float("-inf")) else float(value)


def run_worker(config_json: str, name: str, collector: str, control: str | None) -> None:
    """Process entry point (spawned by the service): config as JSON, nothing pickled."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {name}: %(message)s")
    config = InspectConfig.model_validate_json(config_json)
    worker = InspectionWorker(config, name, collector=collector, control=control)
    worker.run()

