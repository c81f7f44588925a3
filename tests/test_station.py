"""The station service end to end: config, cells by source tag and by trigger, missed views,
a source failing mid-stream, the status endpoint, SIGTERM, and recording a live stream."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from pydantic import ValidationError

from pouchline.datasets.manifest import DatasetReader
from pouchline.datasets.record import record
from pouchline.datasets.validate import validate_dataset
from pouchline.station.config import ConfigError, StationConfig, load_config
from pouchline.station.protocol import Frame, Trigger, encode_control, frame_header
from pouchline.station.service import Station
from pouchline.station.sourcebase import encoded_frame
from pouchline.station.transport import FrameClient, TransportSettings
from test_presence import Conveyor, conveyor  # noqa: F401 - the rendered conveyor fixture

FAST = {"heartbeat_s": 0.05, "timeout_s": 0.5, "max_pending": 16, "shutdown_grace_s": 1.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def station_config(cameras: list[dict], **extra: object) -> StationConfig:
    return StationConfig.model_validate({"name": "st1", "bind": "tcp://127.0.0.1:0", "status": "127.0.0.1:0",
                                         "transport": FAST, "cameras": cameras, **extra})


def collect(station: Station, count: int, timeout_s: float = 20.0) -> list[Frame]:
    client = FrameClient([station.server.endpoint], name="t", settings=TransportSettings(**FAST))
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(frames) < count and time.monotonic() < deadline:
            frame = client.receive(0.1)
            if frame is not None:
                frames.append(frame)
                client.done(frame.header.key)
    finally:
        client.close()
    return frames


def synthetic(count: int, views: list[str] | None = None) -> dict:
    return {"kind": "synthetic", "seed": 5, "count": count, "cells_per_s": 0, "defect_rate": 0.5,
            "size": [320, 240], "views": views or ["top"]}


def folder_of_frames(path: Path, n: int = 3) -> Path:
    path.mkdir()
    for index in range(n):
        cv2.imwrite(str(path / f"{index}.jpg"), np.full((120, 160, 3), 40 * index, np.uint8))
    return path


def test_a_typo_in_the_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "station.toml"
    path.write_text(textwrap.dedent("""
        name = "st1"
        [[cameras]]
        name = "top"
        cells = "source"
        [cameras.source]
        kind = "synthetic"
        cels_per_s = 3
    """))
    with pytest.raises(ConfigError, match=r"station.toml: cameras\.0\.source\.synthetic\.cels_per_s"):
        load_config(path)
    path.write_text('name = "st1"\nbnd = "tcp://*:1"\n[[cameras]]\nname = "top"\nsource = {kind = "folder", path = "x"}\n')
    with pytest.raises(ConfigError, match="bnd"):
        load_config(path)


@pytest.mark.parametrize("example", sorted((Path(__file__).parent.parent / "station" / "examples").glob("*.toml")))
def test_the_example_configs_are_valid(example: Path) -> None:
    assert load_config(example).cameras


def test_source_tagged_cells_arrive_with_their_ground_truth() -> None:
    station = Station(station_config([{"name": "top", "cells": "source", "source": synthetic(6, ["top", "side"])}])).start()
    try:
        frames = collect(station, 12)
    finally:
        final = station.stop()
    assert len(frames) == 12
    cells = {frame.header.cell for frame in frames}
    assert len(cells) == 6 and all(frame.header.views == 2 for frame in frames)
    assert all(frame.header.truth is not None and frame.header.truth.labels for frame in frames)
    assert all(frame.image().shape == (240, 320, 3) for frame in frames)
    assert final["cameras"]["top"]["sent"] == 12 and final["transport"]["done"] == 12


def test_external_triggers_over_http_and_zeromq_make_cells(tmp_path: Path) -> None:
    frames_dir = folder_of_frames(tmp_path / "frames")
    camera = {"name": "top", "cells": "external", "source": {"kind": "folder", "path": str(frames_dir), "loop": True, "fps": 100}}
    config = station_config([camera], trigger=f"tcp://127.0.0.1:{free_port()}")
    station = Station(config).start()
    try:
        request = urllib.request.Request(f"http://{station.status_server.address}/trigger", method="POST",
                                         data=json.dumps({"lot": "LOT-7", "cell": "C-1"}).encode())
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 202 and json.loads(reply.read())["cell"] == "C-1"
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(config.trigger)
        push.send_multipart(encode_control(Trigger(type="trigger", lot="LOT-8", cell="C-2", station=None)))
        push.send_multipart([b"PLC1", b"not msgpack"])
        frames = collect(station, 2)
        push.close(linger=0)
        bad = urllib.request.Request(f"http://{station.status_server.address}/trigger", method="POST", data=b'{"lott": 1}')
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=5)
        assert refused.value.code == 422 and "lott" in refused.value.read().decode()
        status = station.status()
    finally:
        station.stop()
    assert [(f.header.cell, f.header.lot, f.header.trigger) for f in frames] == [("C-1", "LOT-7", "external"),
                                                                               ("C-2", "LOT-8", "external")]
    assert status["cameras"]["top"]["idle"] > 0, "frames between cells are not sent"
    assert sum(status["malformed_triggers"].values()) == 1


def test_a_view_that_never_comes_becomes_a_drop_notice(tmp_path: Path) -> None:
    frames_dir = folder_of_frames(tmp_path / "frames")
    cameras = [{"name": "top", "cells": "external", "source": {"kind": "folder", "path": str(frames_dir), "loop": True, "fps": 50}},
               {"name": "side", "view": "side", "cells": "external", "source": {"kind": "folder", "path": str(tmp_path / "missing")}}]
    station = Station(station_config(cameras, trigger_timeout_s=0.3)).start()
    try:
        station.trigger(cell="C-9")
        frames = collect(station, 2)
        alarms = station.status()["alarms"]["counts"]
    finally:
        station.stop()
    by_camera = {frame.header.camera: frame.header for frame in frames}
    assert by_camera["top"].dropped is None and by_camera["top"].views == 2
    assert by_camera["side"].dropped == "no_frame" and by_camera["side"].cell == "C-9"
    assert alarms["missed_view"] == 1 and alarms["source_failed"] >= 1


def test_a_source_failing_mid_stream_raises_an_alarm_and_is_reopened(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (160, 120))
    for index in range(60):
        writer.write(np.full((120, 160, 3), index * 4, np.uint8))
    writer.release()
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])  # the "camera" dies half way through
    camera = {"name": "top", "cells": "external", "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2,
              "source": {"kind": "video", "path": str(video)}}
    station = Station(station_config([camera])).start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and station.status()["cameras"]["top"].get("failures", 0) < 3:
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://{station.status_server.address}/status", timeout=5) as reply:
            status = json.loads(reply.read())
    finally:
        station.stop()
    top = status["cameras"]["top"]
    assert top["failures"] >= 3 and top["captured"] > 0, "it read frames, failed, and kept reopening"
    assert status["alarms"]["counts"]["source_failed"] >= 3
    assert "clip.avi" in status["alarms"]["recent"][-1]["message"]


def test_record_a_live_stream_into_a_valid_dataset(tmp_path: Path) -> None:
    station = Station(station_config([{"name": "top", "cells": "source", "source": synthetic(8)}])).start()
    try:
        result = record([station.server.endpoint], tmp_path / "rec", count=8, idle_s=10,
                        settings=TransportSettings(**FAST), progress=False)
    finally:
        station.stop()
    assert result.frames == 8
    report = validate_dataset(tmp_path / "rec")
    assert report.ok and report.records == 8
    records = list(DatasetReader(tmp_path / "rec"))
    assert {tuple(r.labels) for r in records} <= {("ok",), ("swollen",), ("deformed",), ("swollen", "deformed")}
    assert all(r.ground_truth is not None and r.station == "st1" for r in records)


def test_station_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "station.toml"
    config.write_text(textwrap.dedent(f"""
        name = "st1"
        bind = "tcp://127.0.0.1:0"
        status = "127.0.0.1:0"
        [[cameras]]
        name = "top"
        cells = "source"
        [cameras.source]
        kind = "synthetic"
        cells_per_s = 5
        size = [320, 240]
    """))
    command = [sys.executable, "-c", "from pouchline.inspect.cli import main; main()", "station", "run", "--config", str(config)]
    process = subprocess.Popen(command,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env={**os.environ, "COLUMNS": "200"})
    try:
        line = process.stdout.readline()
        assert "serving frames at tcp://127.0.0.1:" in line, line + process.stderr.read()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err
    final = json.loads(out[out.index("{"):])
    assert final["cameras"]["top"]["captured"] >= 2
    assert final["cameras"]["top"]["state"] == "stopped"


def test_cells_found_by_presence_detection_in_the_camera_stream(tmp_path: Path, conveyor: Conveyor) -> None:
    frames = tmp_path / "conveyor"
    frames.mkdir()
    for index, image in enumerate(conveyor.frames):
        cv2.imwrite(str(frames / f"{index:04d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    camera = {"name": "top", "cells": "presence", "source": {"kind": "folder", "path": str(frames)}}
    station = Station(station_config([camera], lot="LOT-P")).start()
    try:
        received = collect(station, 5, timeout_s=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not station.finished():
            time.sleep(0.05)
        status = station.status()
    finally:
        station.stop()
    headers = [frame.header for frame in received]
    assert len({h.cell for h in headers}) == 5 and all(h.trigger == "presence" and h.views == 1 for h in headers)
    assert all(h.lot == "LOT-P" for h in headers)
    passes = sum(1 for i, extent in enumerate(conveyor.extents) if extent is not None and conveyor.extents[i - 1] is None)
    assert passes == 5 and status["cameras"]["top"]["idle"] == len(conveyor.frames) - 5


def test_the_status_endpoint_serves_each_cameras_newest_frame() -> None:
    station = Station(station_config([{"name": "top", "cells": "source", "source": synthetic(3)}])).start()
    try:
        collect(station, 3)
        address = station.status_server.address
        with urllib.request.urlopen(f"http://{address}/live/top.jpg", timeout=5) as reply:
            assert reply.headers["Content-Type"] == "image/jpeg"
            image = cv2.imdecode(np.frombuffer(reply.read(), np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (240, 320, 3)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{address}/live/nope.jpg", timeout=5)
        assert missing.value.code == 404
    finally:
        station.stop()


def test_headers_from_stamps_are_the_headers_frame_header_makes(tmp_path: Path) -> None:
    """The station makes headers from a stamp per combination of what repeats; whatever changes
    between frames (lot, exposure, size, ground truth, a notice) gives the header `frame_header`
    would, and a bad value is still refused."""
    station = Station(station_config([{"name": "top", "cells": "external",
                                       "source": {"kind": "folder", "path": str(folder_of_frames(tmp_path / "f"))}}]))
    camera = station.config.cameras[0]
    small, large = (cv2.imencode(".jpg", np.zeros(shape, np.uint8))[1].tobytes() for shape in ((24, 32, 3), (48, 64, 3)))
    truth = {"labels": ["good"], "severities": {"swelling": 0.0}, "ground_truth": None}
    frames = [encoded_frame(small, exposure=8.0), encoded_frame(small, exposure=8.0), encoded_frame(small, exposure=9.5),
              encoded_frame(small, exposure=9.5), encoded_frame(large, exposure=9.5), encoded_frame(large, truth=truth), None]
    try:
        for seq, (frame, lot) in enumerate(zip(frames, ["L-1", "L-1", "L-1", "L-2", "L-2", "L-2", "L-2"], strict=True)):
            made = station.header(camera, seq, frame, cell=f"C-{seq}", lot=lot, views=2, trigger="external",
                                   dropped=None if frame else "no_frame")
            fields = made.model_dump()
            assert made == frame_header(**{**fields, "truth": made.truth})
            assert (made.lot, made.exposure, made.width, made.dropped) == (
                lot, frame.exposure if frame else None, frame.width if frame else 1, None if frame else "no_frame")
        assert made.t_mono_ns > frames[-2].t_mono_ns and frames[-2].truth is not None
        with pytest.raises(ValidationError, match="cell"):
            station.header(camera, 9, frames[0], cell="C 9", lot="L-1", views=2, trigger="external")
    finally:
        station.server.close()
