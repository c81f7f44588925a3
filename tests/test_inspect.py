"""Inspection service: real stations, real sockets, real onnxruntime sessions on the shipped model.

Workers run as threads (`InspectionWorker.run`) where process boundaries do not matter, and
as the service's processes (`InspectService`) for what is about processes: a worker killed
mid-lot, a reload published to every worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pouchline.datasets.synth import SynthConfig, render_cell
from pouchline.inspect.aggregate import CellAggregator, Decided, audit_sampled
from pouchline.inspect.collector import Collector
from pouchline.inspect.config import SHIPPED_MODEL, InspectConfig
from pouchline.inspect.service import InspectService
from pouchline.inspect.sinks import ControllerLink, JsonlSink, VerdictReceiver, read_jsonl
from pouchline.inspect.verdicts import CellVerdict, FrameVerdict, attachment
from pouchline.inspect.verdicts import decode as verdicts_decode
from pouchline.inspect.worker import InspectionWorker
from pouchline.models.inference import Inferencer
from pouchline.models.metadata import metadata_path
from pouchline.station.protocol import (
    PROTOCOL_ERROR_KINDS,
    Done,
    FrameHeader,
    Heartbeat,
    ProtocolError,
    decode,
    encode_control,
    encode_frame,
)
from pouchline.station.service import Station
from pouchline.station.synthetic import SyntheticConfig
from pouchline.station.transport import FrameServer, TransportSettings

sys.path.insert(0, str(Path(__file__).parent))
from test_station import FAST, free_port, station_config  # noqa: E402

FP32_MODEL = SHIPPED_MODEL.with_name("pouchline-detector.onnx")
CLI = [sys.executable, "-c", "from pouchline.inspect.cli import main; main()"]


def synthetic(count: int, *, seed: int = 7, views: list[str] | None = None, rate: float = 0.0,
              defect_rate: float = 0.3) -> dict:
    return {"kind": "synthetic", "seed": seed, "count": count, "cells_per_s": rate, "defect_rate": defect_rate,
            "size": [640, 480], "views": views or ["top"], "lot_size": 100}


def inspect_config(endpoint: str, **overrides: object) -> InspectConfig:
    return InspectConfig.model_validate({"stations": [endpoint], "collect": "tcp://127.0.0.1:0", "http": None,
                                         "transport": FAST, "watch_model": False, "workers": 1, **overrides})


class Cells:
    """Cell verdicts as the collector decides them, with a wait."""

    def __init__(self) -> None:
        self.decided: dict[str, Decided] = {}
        self.lock = threading.Lock()

    def __call__(self, decided: Decided) -> None:
        with self.lock:
            self.decided[decided.verdict.cell_id] = decided

    def wait(self, count: int, timeout_s: float = 60.0) -> dict[str, CellVerdict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.decided) >= count:
                    break
            time.sleep(0.05)
        with self.lock:
            return {cell_id: item.verdict for cell_id, item in self.decided.items()}


@pytest.fixture
def collector() -> Iterator[tuple[Collector, Cells]]:
    cells = Cells()
    running = Collector("tcp://127.0.0.1:0", deadline_s=3.0, on_cell=cells).start()
    yield running, cells
    running.stop()


def worker_thread(config: InspectConfig, collector: Collector, name: str = "w0") -> tuple[InspectionWorker, threading.Thread]:
    worker = InspectionWorker(config, name, collector=collector.endpoint)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def stop_worker(worker: InspectionWorker, thread: threading.Thread) -> None:
    worker.stopping.set()
    thread.join(10)
    assert not thread.is_alive()


# -- a lot of a few hundred cells -----------------------------------------------------------


def test_a_synthetic_lot_gets_one_verdict_per_cell_with_the_models_detections(collector) -> None:
    running, cells = collector
    count = 240
    station = Station(station_config([{"name": "cam", "cells": "source", "source": synthetic(count)}])).start()
    worker, thread = worker_thread(inspect_config(station.server.endpoint, audit_rate=0.05), running)
    try:
        verdicts = cells.wait(count)
    finally:
        stop_worker(worker, thread)
        station.stop()
    assert len(verdicts) == count
    # The same frames judged offline by the same model: the live verdicts must be exactly these.
    model = Inferencer(SHIPPED_MODEL)
    source = SyntheticConfig.model_validate(synthetic(count)).synth_config()
    frames = [render_cell(source, index)[0] for index in range(count)]
    offline = model.predict([cv2.imdecode(np.frombuffer(f["image_bytes"], np.uint8), cv2.IMREAD_COLOR) for f in frames])
    defective = rejected_defective = good = rejected_good = 0
    for fields, prediction in zip(frames, offline):
        verdict = verdicts[f"st1/{fields['lot']}/{fields['cell']}"]
        frame = verdict.frames[0]
        assert frame.status == prediction.status
        assert frame.reasons == prediction.flagged, fields["cell"]
        assert verdict.decision == ("reject" if prediction.flagged or prediction.status != "ok" else "pass")
        assert frame.model is not None and frame.model.sha256 == model.meta.sha256
        assert frame.probs == pytest.approx(prediction.probs, abs=1e-5)
        assert frame.truth is not None and frame.truth.labels == fields["labels"]
        if fields["labels"] == ["ok"]:
            good += 1
            rejected_good += verdict.decision == "reject"
        else:
            defective += 1
            rejected_defective += verdict.decision == "reject"
        if verdict.decision == "reject":  # flagged cells carry the JPEG and the heat-map layer
            kinds = sorted(item.kind for item in frame.attachments)
            assert kinds == ["image", "overlay"]
        elif frame.attachments:
            assert verdict.audit and audit_sampled(verdict.cell_id, 0.05)
    assert rejected_defective / defective > 0.7 and rejected_good / good < 0.05
    assert any(verdict.audit for verdict in verdicts.values())  # 5 % of ~170 passed cells are sampled


def test_flagged_cells_carry_their_jpeg_and_a_heat_map_layer_that_lines_up(collector) -> None:
    running, cells = collector
    station = Station(station_config([{"name": "cam", "cells": "source",
                                       "source": synthetic(12, seed=3, defect_rate=1.0)}])).start()
    worker, thread = worker_thread(inspect_config(station.server.endpoint, audit_rate=0.0), running)
    try:
        cells.wait(12)
    finally:
        stop_worker(worker, thread)
        station.stop()
    swollen = [item for item in cells.decided.values() if "swollen" in item.verdict.reasons]
    assert swollen
    decided = swollen[0]
    frame = decided.verdict.frames[0]
    image = cv2.imdecode(np.frombuffer(decided.attachments[0], np.uint8), cv2.IMREAD_COLOR)
    layer = cv2.imdecode(np.frombuffer(decided.attachments[1], np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (480, 640, 3) and layer.shape[2] == 4
    assert layer.shape[1] / layer.shape[0] == pytest.approx(640 / 480, rel=0.02)
    # The layer's heat lies inside the located cell and over the outlined defect region.
    scale = image.shape[1] / layer.shape[1]
    hot = np.argwhere(layer[..., 3] > 80)
    assert len(hot) > 0
    y, x = hot.mean(axis=0) * scale
    corners = np.array(frame.cell_corners)
    assert cv2.pointPolygonTest(corners.astype(np.float32), (float(x), float(y)), False) >= 0
    x0, y0, w, h = frame.boxes[0]
    assert x0 - 40 <= x <= x0 + w + 40 and y0 - 40 <= y <= y0 + h + 40
    assert frame.swelling_mm is not None and frame.swelling_mm > 0.25


# -- several views --------------------------------------------------------------------------


def test_views_of_a_cell_are_judged_together_and_the_worst_view_wins(collector) -> None:
    running, cells = collector
    station = Station(station_config([{"name": "cam", "cells": "source",
                                       "source": synthetic(20, seed=5, views=["top", "side"])}])).start()
    config = inspect_config(station.server.endpoint, skip_views=["side"])
    worker, thread = worker_thread(config, running)
    second, second_thread = worker_thread(config, running, "w1")  # views of a cell reach different workers
    try:
        verdicts = cells.wait(20)
    finally:
        stop_worker(worker, thread)
        stop_worker(second, second_thread)
        station.stop()
    assert len(verdicts) == 20
    for verdict in verdicts.values():
        assert sorted(frame.view for frame in verdict.frames) == ["side", "top"]
        top = next(frame for frame in verdict.frames if frame.view == "top")
        assert verdict.decision == top.decision and "missing_view" not in verdict.reasons
    assert {frame.worker for v in verdicts.values() for frame in v.frames} == {"w0", "w1"}


def test_the_side_model_judges_side_views_beside_the_top_model(collector) -> None:
    """By default a service runs the shipped top and side models; each judges its own view's
    frames, and the side view's thickness gauge reads the renderer's swelling."""
    running, cells = collector
    station = Station(station_config([{"name": "cam", "cells": "source",
                                       "source": synthetic(16, seed=8, views=["top", "side"], defect_rate=0.6)}])).start()
    worker, thread = worker_thread(inspect_config(station.server.endpoint), running)
    try:
        verdicts = cells.wait(16)
    finally:
        stop_worker(worker, thread)
        station.stop()
    assert len(verdicts) == 16
    for verdict in verdicts.values():
        frames = {frame.view: frame for frame in verdict.frames}
        assert frames["top"].model.name == "pouchline-detector" and frames["side"].model.name == "pouchline-side"  # type: ignore[union-attr]
        side = frames["side"]
        assert side.status == "ok" and side.swelling_mm is not None and side.truth is not None
        assert abs(side.swelling_mm - side.truth.ground_truth.swelling_mm) < 0.3  # type: ignore[union-attr]
        rejected = any(frame.decision == "reject" for frame in verdict.frames)
        assert verdict.decision == ("reject" if rejected else "pass")


def test_two_models_for_one_view_are_refused(tmp_path: Path) -> None:
    from pouchline.models.metadata import ModelError

    config = inspect_config("tcp://127.0.0.1:5999", more_models=[FP32_MODEL])
    with pytest.raises(ModelError, match="both judge 'top' frames"):
        InspectService(config)


def test_a_model_calibrated_with_another_view_is_flagged_when_run_alone(caplog: pytest.LogCaptureFixture) -> None:
    from pouchline.inspect.service import model_views

    with caplog.at_level("WARNING", logger="pouchline.inspect.service"):
        model_views(inspect_config("tcp://127.0.0.1:5999"))  # the shipped pair, as calibrated
        assert not caplog.records
        assert set(model_views(inspect_config("tcp://127.0.0.1:5999", more_models=[]))) == {"top"}
    assert "set together with pouchline-side.int8.onnx" in caplog.text


def _copy_model(model: Path, to: Path) -> Path:
    """A model and its metadata under another file name."""
    shutil.copy(model, to)
    shutil.copy(metadata_path(model), metadata_path(to))
    return to


def test_calibration_partners_are_known_by_their_graph_not_their_file_name(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pouchline.inspect.config import SHIPPED_SIDE_MODEL
    from pouchline.inspect.service import model_views

    renamed = _copy_model(SHIPPED_SIDE_MODEL, tmp_path / "line3-side.onnx")
    # Another side model (the FP32 one) deployed under the partner's file name: not the partner.
    impostor_dir = tmp_path / "impostor"
    impostor_dir.mkdir()
    impostor = _copy_model(SHIPPED_SIDE_MODEL.with_name("pouchline-side.onnx"), impostor_dir / SHIPPED_SIDE_MODEL.name)
    with caplog.at_level("WARNING", logger="pouchline.inspect.service"):
        model_views(inspect_config("tcp://127.0.0.1:5999", more_models=[renamed]))
        assert not caplog.records
        assert set(model_views(inspect_config("tcp://127.0.0.1:5999", more_models=[impostor]))) == {"top", "side"}
    assert "set together with pouchline-side.int8.onnx (SHA-256" in caplog.text


def test_a_calibration_record_of_the_wrong_shape_names_its_file_and_field(tmp_path: Path) -> None:
    from pouchline.inspect.config import SHIPPED_SIDE_MODEL
    from pouchline.inspect.service import model_views
    from pouchline.models.metadata import ModelError

    side = _copy_model(SHIPPED_SIDE_MODEL, tmp_path / "side.onnx")
    meta = json.loads(metadata_path(side).read_text())
    meta["calibration"]["model_sha256"] = ["top", "side"]  # hand-edited into a list
    metadata_path(side).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"side\.json: field 'calibration\.model_sha256': Input should be a valid dictionary"):
        model_views(inspect_config("tcp://127.0.0.1:5999", more_models=[side]))


def _frame_verdict(camera: str, view: str, decision: str, reasons: list[str], seq: int, *, views: int = 2,
                   status: str = "ok") -> FrameVerdict:
    return FrameVerdict(station="st", camera=camera, lot="L1", cell="c1", view=view, views=views, seq=seq,
                        t_capture=100.0, status=status, decision=decision, reasons=reasons, worker="w")


def test_aggregation_rules() -> None:
    aggregator = CellAggregator(deadline_s=1.0)
    assert aggregator.add(_frame_verdict("a", "top", "pass", [], 1), [], 100.1) is None
    decided = aggregator.add(_frame_verdict("b", "side", "reject", ["swollen"], 1), [], 100.2)
    assert decided is not None and decided.verdict.decision == "reject" and decided.verdict.reasons == ["swollen"]
    # a redelivered view of a decided cell is a duplicate, not a new cell
    assert aggregator.add(_frame_verdict("a", "top", "pass", [], 1), [], 100.3) is None
    assert aggregator.counts["duplicate_views"] == 1 and aggregator.open_cells == 0
    # a missing view by the deadline: fail-safe reject, whatever the view that came said
    other = CellAggregator(deadline_s=1.0)
    assert other.add(_frame_verdict("a", "top", "pass", [], 7), [], 100.1) is None
    assert other.expire(100.9) == []
    expired = other.expire(101.05)
    assert len(expired) == 1 and expired[0].verdict.decision == "reject"
    assert expired[0].verdict.reasons == ["missing_view"] and len(expired[0].verdict.frames) == 1
    assert other.add(_frame_verdict("b", "side", "pass", [], 8), [], 101.2) is None  # too late: counted
    assert other.counts["late_views"] == 1
    # a cell whose only views were skipped was not inspected: reject
    skipped = CellAggregator(deadline_s=1.0).add(_frame_verdict("a", "side", "pass", [], 1, views=1, status="skipped"),
                                                  [], 100.0)
    assert skipped is not None and skipped.verdict.decision == "reject" and skipped.verdict.reasons == ["not_inspected"]


def _header(seq: int, data: bytes, *, cell: str, views: int = 1, station: str = "st9") -> FrameHeader:
    return FrameHeader(v=1, station=station, camera="top", lot="L1", cell=cell, view="top", views=views, seq=seq,
                       t_mono_ns=time.monotonic_ns(), t_wall=time.time(), exposure=None, gain=None, trigger="source",
                       encoding="jpeg", width=640, height=480, channels=3, dtype="uint8", nbytes=len(data),
                       dropped=None, truth=None)


def _jpeg(index: int = 0) -> bytes:
    config = SynthConfig(count=1, seed=2, views=("top",), size=(640, 480), defect_rate=0.0)
    return render_cell(config, index)[0]["image_bytes"]


def test_a_view_missing_past_the_deadline_rejects_the_cell(collector) -> None:
    running, cells = collector
    running.aggregator.deadline_s = 0.5
    server = FrameServer("tcp://127.0.0.1:0", station="st9", settings=TransportSettings(**FAST))
    worker, thread = worker_thread(inspect_config(server.endpoint), running)
    try:
        data = _jpeg()
        server.submit(_header(0, data, cell="two-views", views=2), data)  # the second view never comes
        server.submit(_header(1, data, cell="one-view"), data)
        verdicts = cells.wait(2, timeout_s=10)
    finally:
        stop_worker(worker, thread)
        server.close()
    missing = verdicts["st9/L1/two-views"]
    assert missing.decision == "reject" and "missing_view" in missing.reasons
    assert missing.frames[0].status == "ok" and missing.t_decided - missing.t_capture >= 0.5
    assert verdicts["st9/L1/one-view"].decision == "pass"


def test_a_frame_the_station_dropped_rejects_its_cell(collector) -> None:
    running, cells = collector
    server = FrameServer("tcp://127.0.0.1:0", station="st9", settings=TransportSettings(**FAST))
    worker, thread = worker_thread(inspect_config(server.endpoint), running)
    try:
        header = _header(0, b"", cell="dropped").model_copy(update={"dropped": "queue_full", "nbytes": 0})
        server.submit(header, b"")
        verdicts = cells.wait(1, timeout_s=10)
    finally:
        stop_worker(worker, thread)
        server.close()
    verdict = verdicts["st9/L1/dropped"]
    assert verdict.decision == "reject" and verdict.reasons == ["dropped:queue_full"]


# -- bad input ----------------------------------------------------------------------------------


class FakeStation:
    """A ROUTER that speaks just enough of the protocol to send a worker whatever it likes."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:0")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.identity: bytes | None = None
        self.done: list[tuple] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.socket.poll(20):
                identity, *parts = self.socket.recv_multipart()
                self.identity = identity
                message = decode(parts)
                if isinstance(message, Done):
                    self.done.extend(tuple(key) for key in message.keys)
            if self.identity is not None:
                self.socket.send_multipart([self.identity, *encode_control(
                    Heartbeat(type="heartbeat", sender="st9", session="fake", busy=0, capacity=0))])

    def send(self, parts: list[bytes]) -> None:
        assert self.identity is not None
        self.socket.send_multipart([self.identity, *parts])

    def close(self) -> None:
        self.socket.close()
        self.context.term()


@contextmanager
def worker_behind_fake_station(collector, **overrides: object) -> Iterator[tuple[FakeStation, InspectionWorker]]:
    """A worker thread taking frames from a `FakeStation` that has seen its hello."""
    running, _ = collector
    fake = FakeStation()
    worker, thread = worker_thread(inspect_config(fake.endpoint, **overrides), running)
    try:
        fake.pump(0.5)
        yield fake, worker
        assert thread.is_alive()  # whatever it was sent
    finally:
        stop_worker(worker, thread)
        fake.close()


def settled(fake: FakeStation, collector, count: int) -> dict[str, CellVerdict]:
    """The cell verdicts once the fake station has read the worker's answers."""
    fake.pump(2.0)
    return collector[1].wait(count, timeout_s=10)


def test_a_refused_frame_with_an_infinite_clock_is_answered_at_the_time_it_arrives(collector) -> None:
    """A refused header's own fields name the fail-safe reject; a capture time of infinity is
    not one of them (no verdict can carry it), so the worker's clock stands in."""
    with worker_behind_fake_station(collector) as (fake, _):
        good = _jpeg()
        body = msgpack.packb(_header(1, good, cell="c-infinite").model_dump() | {"v": 2, "t_wall": float("inf")})
        fake.send([b"PLF1", body, good])
        fake.send(encode_frame(_header(2, good, cell="c-good"), good))
        verdicts = settled(fake, collector, 2)
    refused = verdicts["st9/L1/c-infinite"]
    assert refused.reasons == ["refused:header_invalid"] and refused.decision == "reject"
    assert abs(refused.t_capture - time.time()) < 60
    assert sorted(seq for _, _, seq in fake.done) == [1, 2]


def test_malformed_frames_are_counted_answered_and_never_crash_the_worker(collector) -> None:
    with worker_behind_fake_station(collector, max_pixels=1_000_000) as (fake, worker):
        good = _jpeg()
        corrupt = good[:600] + bytes(len(good) - 602) + b"\xff\xd9"  # a JPEG header, zeros, an end marker
        body = msgpack.packb(_header(1, good, cell="c-wrong-version").model_dump() | {"v": 2})
        fake.send([b"PLF1", body, good])  # wrong header version
        body = msgpack.packb(_header(2, good, cell="c-zero-size").model_dump() | {"width": 0, "height": 0})
        fake.send([b"PLF1", body, good])  # zero-size image
        fake.send(encode_frame(_header(3, b"not a jpeg at all", cell="c-not-jpeg").model_copy(
            update={"encoding": "raw", "width": 17, "height": 1, "channels": 1}), b"not a jpeg at all")[:2]
            + [b"definitely not an image"])  # bytes that do not match their header
        fake.send(encode_frame(_header(4, corrupt, cell="c-corrupt"), corrupt))  # valid header, undecodable body
        huge = cv2.imencode(".jpg", np.zeros((1200, 1600, 3), np.uint8))[1].tobytes()
        fake.send(encode_frame(_header(5, huge, cell="c-huge").model_copy(update={"width": 1600, "height": 1200}),
                               huge))  # more pixels than this worker reads
        fake.send([b"PLF1", b"\xc1\xc1garbage", good])  # not msgpack at all: counted, nothing to answer
        fake.send([b"XXXX", b"", b""])  # not our protocol
        fake.send(encode_frame(_header(6, good, cell="c-good"), good))  # and the worker still works
        verdicts = settled(fake, collector, 6)
    reasons = {cell_id.split("/")[-1]: verdict.reasons for cell_id, verdict in verdicts.items()}
    assert reasons == {
        "c-wrong-version": ["refused:header_invalid"],
        "c-zero-size": ["refused:header_invalid"],
        "c-not-jpeg": ["refused:payload_mismatch"],
        "c-corrupt": ["undecodable"],
        "c-huge": ["too_large"],
        "c-good": [],
    }
    assert all(verdicts[f"st9/L1/{cell}"].decision == "reject" for cell in reasons if cell != "c-good")
    assert sorted(seq for _, _, seq in fake.done) == [1, 2, 3, 4, 5, 6]  # every frame that named itself was answered
    counts = worker.client.rejected.counts
    assert counts["header_invalid"] == 2 and counts["payload_mismatch"] == 1
    assert counts["header_undecodable"] == 1 and counts["magic"] == 1


def test_malformed_verdict_messages_are_counted_by_the_collector(collector) -> None:
    running, cells = collector
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.connect(running.endpoint)
    good = _frame_verdict("a", "top", "pass", [], 1, views=1).model_dump()
    push.send_multipart([b"PLV1", msgpack.packb(good | {"decision": "maybe"})])
    push.send_multipart([b"PLV1", msgpack.packb(good | {"attachments": [{"kind": "image", "camera": "a",
                         "media_type": "image/jpeg", "part": 0, "nbytes": 3, "sha256": "0" * 64}]})])  # part missing
    push.send_multipart([b"PLV1", b"\xff\xff"])
    push.send_multipart([b"PLV1", bytes(2 * 1024 * 1024)])
    push.send_multipart([b"????", b"x"])
    push.send_multipart([b"PLV1", msgpack.packb(good)])
    cells.wait(1, timeout_s=5)
    push.close()
    time.sleep(0.1)
    assert running.rejected.counts == {"verdict_invalid": 2, "verdict_undecodable": 1, "verdict_too_large": 1, "magic": 1}
    assert list(cells.decided) == ["st/L1/c1"]


# -- processes: a worker killed mid-lot, hot swap, shadow --------------------------------------


def _service(endpoint: str, cells: Cells, **overrides: object) -> InspectService:
    config = inspect_config(endpoint, **overrides)
    service = InspectService(config)
    assert service.collector is not None
    service.collector.on_cell = cells
    return service.start()


def _wait_for_workers(service: InspectService, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(service.collector.workers) < count and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.1)
    assert len(service.collector.workers) >= count  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_worker_killed_mid_lot_loses_no_cell() -> None:
    cells = Cells()
    count = 300
    station = Station(station_config([{"name": "cam", "cells": "source", "source": synthetic(count)}],
                                     transport={**FAST, "timeout_s": 1.0})).start()
    service = _service(station.server.endpoint, cells, workers=2, cell_deadline_s=10.0,
                       transport={**FAST, "timeout_s": 1.0})
    try:
        _wait_for_workers(service, 2)
        deadline = time.monotonic() + 30
        while len(cells.decided) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        deadline = time.monotonic() + 10  # its own wait: a slow start must not use it up
        while time.monotonic() < deadline and not any(  # killed while it holds frames (it keeps each a few ms)
                worker["name"] == "inspect-0" and worker["held"] for worker in station.server.stats()["workers"]):
            time.sleep(0.0005)
        os.kill(service.processes["inspect-0"].pid, signal.SIGKILL)
        verdicts = cells.wait(count, timeout_s=60)
        restarted = service.restarts["inspect-0"]
    finally:
        final = service.stop()
        transport = station.stop()["transport"]
    assert len(verdicts) == count
    assert not any("missing_view" in verdict.reasons for verdict in verdicts.values())
    assert transport.get("redelivered", 0) >= 1  # the dead worker's frames went to the living one
    assert restarted == 1 and final["workers"]["inspect-0"]["restarts"] == 1


@pytest.mark.slow
def test_hot_swap_under_load_drops_no_frame_and_the_file_watch_swaps_too(tmp_path: Path) -> None:
    live = _copy_model(SHIPPED_MODEL, tmp_path / "live.onnx")
    int8_sha = json.loads(metadata_path(SHIPPED_MODEL).read_text())["sha256"]
    fp32_sha = json.loads(metadata_path(FP32_MODEL).read_text())["sha256"]
    cells = Cells()
    count = 400
    station = Station(station_config([{"name": "cam", "cells": "source", "source": synthetic(count, rate=50)}])).start()
    service = _service(station.server.endpoint, cells, workers=2, model=str(live), watch_model=True)
    try:
        _wait_for_workers(service, 2)
        while len(cells.decided) < 60:
            time.sleep(0.02)
        service.reload(FP32_MODEL)  # `pouchline inspect reload --model`: every worker, between batches
        while not any(v.frames[0].model.sha256 == fp32_sha for v in cells.wait(0).values() if v.frames[0].model):
            time.sleep(0.05)
        service.reload(live)  # back to the watched file...
        time.sleep(1.5)
        staged = _copy_model(FP32_MODEL, tmp_path / "staged.onnx")  # ...which is then replaced on disk (atomic renames, json first)
        os.replace(metadata_path(staged), metadata_path(live))
        os.replace(staged, live)
        verdicts = cells.wait(count, timeout_s=90)
        deadline = time.monotonic() + 30  # the file watch: every worker reports the new model (stats, once a second)
        while time.monotonic() < deadline and not all(
                stats.model is not None and stats.model.sha256 == fp32_sha
                for stats, _ in service.collector.workers.values()):  # type: ignore[union-attr]
            time.sleep(0.2)
        live_models = {name: stats.model.sha256 for name, (stats, _) in service.collector.workers.items()}  # type: ignore[union-attr]
    finally:
        final = service.stop()
        station.stop()
    assert len(verdicts) == count  # no gap: every cell judged while models were swapped under load
    assert not any(set(v.reasons) & {"missing_view", "inference_error"} for v in verdicts.values())
    order = sorted(verdicts.values(), key=lambda v: v.frames[0].seq)
    shas = [v.frames[0].model.sha256 for v in order]  # type: ignore[union-attr]
    first_fp32 = shas.index(fp32_sha)
    assert shas[0] == int8_sha and int8_sha in shas[first_fp32:]  # int8, the reload to fp32, the reload back
    assert live_models == {"inspect-0": fp32_sha, "inspect-1": fp32_sha}, live_models  # the replaced file is live
    for name, worker in final["collector"]["workers"].items():
        assert worker["counters"].get("model_swaps", 0) >= 2, name  # a request during a load: the newest wins


def test_a_model_slot_keeps_its_view() -> None:
    """A file of another view (say the side model copied over the top model's file) never
    replaces a slot's model: the old one stays live and the failure is reported."""
    from pouchline.inspect.config import SHIPPED_SIDE_MODEL
    from pouchline.inspect.modelslot import ModelSlot

    slot = ModelSlot(SHIPPED_MODEL, threads=1, watch=False)
    try:
        slot.request(SHIPPED_SIDE_MODEL)
        deadline = time.monotonic() + 30
        while slot.failures == 0 and time.monotonic() < deadline:
            assert not slot.poll()
            time.sleep(0.05)
        assert slot.failures == 1 and "judges 'side' frames; this slot judges 'top' frames" in (slot.last_error or "")
        assert slot.model.meta.input.view == "top" and slot.swaps == 0
    finally:
        slot.close()


def test_a_shadow_model_is_counted_never_obeyed(tmp_path: Path, collector) -> None:
    running, cells = collector
    shadow = tmp_path / "strict.onnx"  # the same graph with thresholds at 0: it flags every cell
    shutil.copy(SHIPPED_MODEL, shadow)
    meta = json.loads(metadata_path(SHIPPED_MODEL).read_text())
    meta["thresholds"] = {name: 0.0 for name in meta["thresholds"]}
    meta["version"] = "strict"
    metadata_path(shadow).write_text(json.dumps(meta))
    station = Station(station_config([{"name": "cam", "cells": "source", "source": synthetic(30, seed=9)}])).start()
    worker, thread = worker_thread(inspect_config(station.server.endpoint, shadow=str(shadow)), running)
    try:
        verdicts = cells.wait(30)
    finally:
        stop_worker(worker, thread)
        station.stop()
    passed = [v for v in verdicts.values() if v.decision == "pass"]
    assert passed  # the live model's decisions stand
    assert all(v.frames[0].shadow is not None and v.frames[0].shadow.decision == "reject" for v in verdicts.values())
    assert all(v.frames[0].shadow.model.version == "strict" for v in verdicts.values())  # type: ignore[union-attr]
    disagreements = sum(v.frames[0].shadow.decision != v.frames[0].decision for v in verdicts.values())  # type: ignore[union-attr]
    assert worker.counts["shadow_disagreements"] == disagreements == len(passed)
    assert worker.counts["shadow_judged"] == 30


# -- sinks ----------------------------------------------------------------------------------------


def test_cell_verdicts_reach_the_controller_at_least_once_and_files_keep_them(tmp_path: Path) -> None:
    stored: list[CellVerdict] = []
    fail_first = {"left": 1}

    def store(verdict: CellVerdict, attachments: list[memoryview]) -> None:
        if fail_first["left"]:
            fail_first["left"] -= 1
            raise RuntimeError("disk full")  # not stored: no ack, so it must come again
        stored.append(verdict)

    receiver = VerdictReceiver("tcp://127.0.0.1:0", store)
    context = zmq.Context()
    link = ControllerLink(context, receiver.endpoint, ack_timeout_s=0.3)
    sink = JsonlSink(tmp_path / "verdicts.jsonl")
    aggregator = CellAggregator(deadline_s=1.0)
    data = _jpeg()
    verdict = _frame_verdict("a", "top", "reject", ["swollen"], 1, views=1)
    decided = aggregator.add(verdict.model_copy(update={"attachments": [attachment("image", "a", data, 0)]}), [data], 1.0)
    assert decided is not None
    link.send(decided)
    sink.send(decided)
    sink.close()
    deadline = time.monotonic() + 5
    while not stored and time.monotonic() < deadline:
        try:
            receiver.poll(0.05)
        except RuntimeError:
            pass
        link.tick()
    for _ in range(5):
        link.tick()
        time.sleep(0.02)
    assert [v.cell_id for v in stored] == ["st/L1/c1"] and not link.unacked and link.counts["resent"] >= 1
    link.close()
    receiver.close()
    context.term()
    (back,) = read_jsonl(tmp_path / "verdicts.jsonl")
    assert back == decided.verdict
    item = back.frames[0].attachments[0]
    assert (tmp_path / "verdicts.jsonl.images" / f"{item.sha256}.jpg").read_bytes() == data


# -- the command line -------------------------------------------------------------------------------


def test_inspect_run_reload_status_and_metrics_from_the_command_line(tmp_path: Path) -> None:
    station = Station(station_config([{"name": "cam", "cells": "source", "source": synthetic(40, rate=20)}])).start()
    http = f"127.0.0.1:{free_port()}"
    config = tmp_path / "inspect.toml"
    config.write_text(f'stations = ["{station.server.endpoint}"]\ncollect = "tcp://127.0.0.1:{free_port()}"\n'
                      f'http = "{http}"\nout = "{tmp_path / "v.jsonl"}"\nworkers = 1\n[transport]\nheartbeat_s = 0.05\n'
                      f'timeout_s = 0.5\n')
    process = subprocess.Popen(CLI + ["inspect", "run", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        lines = 0
        while time.monotonic() < deadline:
            lines = len((tmp_path / "v.jsonl").read_text().splitlines()) if (tmp_path / "v.jsonl").exists() else 0
            if lines >= 40:
                break
            time.sleep(0.2)
        metrics = urllib.request.urlopen(f"http://{http}/metrics", timeout=5).read().decode()
        reload = subprocess.run(CLI + ["inspect", "reload", "--address", http,
                                 "--model", str(FP32_MODEL)], capture_output=True, text=True, timeout=60)
        bad = subprocess.run(CLI + ["inspect", "reload", "--address", http,
                              "--model", str(tmp_path / "missing.onnx")], capture_output=True, text=True, timeout=60)
        status = json.loads(urllib.request.urlopen(f"http://{http}/status", timeout=5).read())
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        station.stop()
    assert lines == 40, output
    assert 'pouchline_cells_total{decision="passed"}' in metrics and "pouchline_worker_batch_size_bucket" in metrics
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert bad.returncode != 0 and "missing.onnx" in bad.stdout + bad.stderr
    assert status["workers"]["inspect-0"]["alive"] and status["collector"]["cells"]["cells"] == 40
    assert process.returncode == 0, output


def test_a_typo_in_the_inspect_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "inspect.toml"
    config.write_text('stations = ["tcp://127.0.0.1:1"]\n[batching]\nmax_bach = 4\n')
    result = subprocess.run(CLI + ["inspect", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "batching.max_bach" in result.stdout + result.stderr


@pytest.mark.parametrize("example", sorted(p for p in (Path(__file__).parent.parent / "inspect" / "examples").glob("*.toml")
                                           if p.name != "controller.toml"))
def test_the_example_inspect_configs_are_valid(example: Path) -> None:
    from pouchline.inspect.config import load_inspect_config

    assert load_inspect_config(example).stations


def test_the_example_controller_config_is_valid_and_a_typo_names_the_key(tmp_path: Path) -> None:
    from pouchline.inspect.controller.settings import load_settings
    from pouchline.station.config import ConfigError

    settings = load_settings(Path(__file__).parent.parent / "inspect" / "examples" / "controller.toml")
    assert settings.deadline_s == 3.0 and settings.verdicts == "tcp://*:5580"
    bad = tmp_path / "controller.toml"
    bad.write_text('deadline_ss = 2\n')
    with pytest.raises(ConfigError, match="deadline_ss"):
        load_settings(bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5), st.sampled_from([b"PLV1", b"PLS1", b"PLK1", b"PLA1"]))
def test_verdict_decoding_refuses_garbage_with_a_counted_kind(parts: list[bytes], magic: bytes) -> None:
    for message in (parts, [magic, *parts]):
        try:
            verdicts_decode(message)
        except ProtocolError as error:
            assert error.kind in PROTOCOL_ERROR_KINDS


@pytest.mark.slow
def test_workers_on_another_machine_send_to_one_collector_and_every_cell_is_decided_once() -> None:
    cells = Cells()
    count = 120
    station = Station(station_config([{"name": "cam", "cells": "source", "source": synthetic(count, rate=60)}],
                                     transport={**FAST, "arena_mb": 0})).start()  # as for a remote host: over TCP
    first = _service(station.server.endpoint, cells, name="line-a")
    second = InspectService(inspect_config(station.server.endpoint, name="line-b",
                                           collector=first.collect_endpoint)).start()
    try:
        verdicts = cells.wait(count, timeout_s=60)
        snapshot = first.collector.snapshot()  # type: ignore[union-attr]
    finally:
        second.stop()
        first.stop()
        station.stop()
    assert len(verdicts) == count and snapshot["cells"]["cells"] == count
    workers = {verdict.frames[0].worker for verdict in verdicts.values()}
    assert workers == {"line-a-0", "line-b-0"}
    assert set(snapshot["workers"]) == {"line-a-0", "line-b-0"} and snapshot["cells_per_s"] > 0
