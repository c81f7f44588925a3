"""`pouchline bench transport`: pouchline's transport against imagezmq, side by side on loopback.

Each case runs the sender in this process and the receiver in a fresh process, on the same
1920x1080 frame (a rendered cell as JPEG, and the same pixels raw). pouchline runs twice: as
configured by default (sender and receiver share a host, so frames go through the station's
shared-memory arena) and with the arena off (``pouchline_tcp``: every byte over the socket, as
for a worker on another machine).

* saturation: N frames as fast as the pair can go -> frames/s;
* paced: frames offered at a fixed rate -> p50/p99 capture-to-receive latency.

Latency is the receiver's CLOCK_MONOTONIC minus the sender's at capture (one clock on one
machine). Silent drops are frames sent but neither received nor reported: pouchline reports
every drop as a notice; imagezmq's PUB/SUB loses frames without a word when the subscriber lags.

The station's own CPU per frame in MJPEG passthrough (reading the JPEG's own header as a
camera source does, the frame header, the arena copy, send, credit) is measured against a
decode + encode of the same frame: the work passthrough saves.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import cv2
import numpy as np
from rich.progress import Progress

from pouchline.inspect.benchreport import BenchReport
from pouchline.station.protocol import HeaderStamp
from pouchline.station.sourcebase import encoded_frame
from pouchline.station.transport import FrameClient, FrameServer, TransportSettings

System = Literal["pouchline", "pouchline_tcp", "imagezmq_reqrep", "imagezmq_pubsub"]
#: ``pouchline`` is the default transport: same host, so frames go through the shared-memory
#: arena; ``pouchline_tcp`` has the arena turned off (what a worker on another host gets).
SYSTEMS: tuple[System, ...] = ("pouchline", "pouchline_tcp", "imagezmq_reqrep", "imagezmq_pubsub")
_OURS = ("pouchline", "pouchline_tcp")
_IDLE_S = 3.0  # a receiver that hears nothing this long has seen everything it will
_CAPACITY = 16  # frames a pouchline receiver may hold (its credit)


@dataclass(frozen=True)
class Case:
    system: System
    payload: Literal["jpeg", "raw"]
    mode: Literal["saturation", "paced"]
    frames: int
    rate: float = 0.0


def test_frame() -> tuple[np.ndarray, bytes]:
    """A rendered 1920x1080 cell and its JPEG (q90), as a camera in MJPEG mode would send it."""
    from pouchline.datasets.domain import load_domain
    from pouchline.datasets.render import render_top
    from pouchline.datasets.scene import sample_scene
    from pouchline.datasets.spec import CellSpec

    scene = sample_scene(7, 0, spec=CellSpec(), domain=load_domain("default"), defect_rate=0.0)
    # The renderer's noise bank stops short of 1080p: render 720p and scale up, then add sensor
    # noise back so the JPEG is as large as a real camera's.
    image = cv2.resize(render_top(scene, (1280, 720)).image, (1920, 1080), interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(0).normal(0.0, 3.0, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stamp(payload: bytes | np.ndarray) -> HeaderStamp:
    """The headers of the bench's frames: one fixed `HeaderStamp`. (`Station.header` looks its
    stamp up per frame, since lot or exposure may change: a few µs a frame more than here.)"""
    raw = isinstance(payload, np.ndarray)
    height, width = (payload.shape[:2] if raw else (1080, 1920))
    return HeaderStamp(v=1, station="bench", camera="cam0", lot="LOT-0", view="top", views=1, exposure=None, gain=None,
                       trigger="external", encoding="raw" if raw else "jpeg", width=width, height=height, channels=3,
                       dtype="uint8", dropped=None, truth=None)


def submit_encoded(server: FrameServer, stamp: HeaderStamp, cell: str, seq: int, data: bytes) -> bool:
    """One JPEG as a station's camera loop hands it over (shared by the benches): the source reads
    its own header (once: the transport then trusts it) and stamps the capture time; the frame
    header comes from the camera's stamp."""
    frame = encoded_frame(data)
    header = stamp.stamp(cell, seq, frame.t_mono_ns, frame.t_wall, len(frame.payload))
    return server.submit(header, frame.payload, checked=frame.checked)


def _submit(server: FrameServer, stamp: HeaderStamp, seq: int, payload: bytes | np.ndarray) -> bool:
    """One frame of the bench: a JPEG as `submit_encoded`; raw pixels as they are."""
    if isinstance(payload, np.ndarray):
        return server.submit(stamp.stamp(f"c{seq}", seq, time.monotonic_ns(), time.time(), payload.nbytes), payload)
    return submit_encoded(server, stamp, f"c{seq}", seq, payload)


# -- receivers (child processes) --------------------------------------------------------------
def _receive(system: System, endpoint: str, frames: int, raw: bool, conn: Connection) -> None:
    latencies: list[float] = []
    notices = 0
    first_sent = last = None
    cpu = time.process_time()
    if system in _OURS:
        # A micro-batching consumer, as an inspection worker is: take what has arrived, hand
        # the credit back for all of it at once.
        client = FrameClient([endpoint], name="bench", capacity=_CAPACITY, zero_copy=True)
        conn.send_bytes(b"ready")
        idle_since = time.monotonic()
        while len(latencies) + notices < frames and time.monotonic() - idle_since < _IDLE_S:
            batch = client.receive_batch(_CAPACITY, 0.1)
            if not batch:
                continue
            idle_since = last = time.monotonic()
            for frame in batch:
                if frame.header.dropped:
                    notices += 1
                else:
                    latencies.append((time.monotonic_ns() - frame.header.t_mono_ns) / 1e6)
                    first_sent = first_sent or frame.header.t_mono_ns
            client.done(*(frame.header.key for frame in batch))
        client.close()
    else:
        import imagezmq
        import zmq

        hub = imagezmq.ImageHub(endpoint, REQ_REP=system == "imagezmq_reqrep")
        hub.zmq_socket.setsockopt(zmq.RCVTIMEO, int(_IDLE_S * 1000))
        conn.send_bytes(b"ready")
        while len(latencies) < frames:
            try:
                message, _ = hub.recv_image() if raw else hub.recv_jpg()
            except zmq.Again:
                break
            now = time.monotonic_ns()
            sent = int(message)
            latencies.append((now - sent) / 1e6)
            first_sent, last = first_sent or sent, time.monotonic()
            if system == "imagezmq_reqrep":
                hub.send_reply(b"OK")
        hub.close()
    conn.send_bytes(json.dumps({"latencies": latencies, "notices": notices, "first_sent_ns": first_sent,
                                "last_received": last, "cpu_s": time.process_time() - cpu}).encode())


# -- senders (this process) ---------------------------------------------------------------------
def _offer(case: Case, send: Any, payload: bytes | np.ndarray) -> None:
    """Send ``case.frames`` frames (paced or flat out)."""
    start = time.monotonic()
    for seq in range(case.frames):
        if case.mode == "paced":
            delay = start + seq / case.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        send(seq, payload)


def _run_case(case: Case, image: np.ndarray, jpeg: bytes) -> dict[str, Any]:
    payload: bytes | np.ndarray = image if case.payload == "raw" else jpeg
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_receive, args=(case.system, endpoint, case.frames, case.payload == "raw", child), daemon=True)
    extra: dict[str, Any] = {}
    if case.system in _OURS:
        arena_mb = TransportSettings().arena_mb if case.system == "pouchline" else 0
        server = FrameServer(endpoint, station="bench", settings=TransportSettings(max_pending=64, arena_mb=arena_mb))
        process.start()
        parent.recv_bytes()
        while not server.stats()["workers"]:
            time.sleep(0.01)
        cpu = time.process_time()  # the sender's CPU until the receiver has everything, I/O thread included
        stamp = _stamp(payload)
        _offer(case, lambda seq, data: _submit(server, stamp, seq, data), payload)
        result = json.loads(parent.recv_bytes())
        cpu_s = time.process_time() - cpu
        stats = server.close(grace_s=1.0)
        extra = {"reported_drops": stats.get("dropped_queue_full", 0) + stats.get("dropped_redelivery_limit", 0)}
    else:
        import imagezmq

        reqrep = case.system == "imagezmq_reqrep"
        if reqrep:
            process.start()
            parent.recv_bytes()
            sender = imagezmq.ImageSender(endpoint, REQ_REP=True)
        else:
            sender = imagezmq.ImageSender(endpoint, REQ_REP=False)  # PUB binds; the hub subscribes
            process.start()
            parent.recv_bytes()
            time.sleep(0.5)  # PUB/SUB's slow joiner: frames sent before the subscription are lost
        method = sender.send_image if case.payload == "raw" else sender.send_jpg
        cpu = time.process_time()
        _offer(case, lambda seq, data: method(str(time.monotonic_ns()), data), payload)
        result = json.loads(parent.recv_bytes())
        cpu_s = time.process_time() - cpu
        sender.close()
    process.join(timeout=10)
    latencies = np.asarray(result["latencies"])
    received = len(latencies)
    span = (result["last_received"] - result["first_sent_ns"] / 1e9) if received else float("nan")
    silent = case.frames - received - result["notices"]
    return {
        "case": f"{case.system} {case.payload} {case.mode}", "system": case.system, "payload": case.payload,
        "mode": case.mode, "offered": case.frames, "received": received, "notices": result["notices"],
        "silent_drops": silent, "frames_per_s": received / span if received else 0.0,
        "p50_ms": float(np.percentile(latencies, 50)) if received else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if received else float("nan"),
        "sender_cpu_ms_per_frame": 1000 * cpu_s / case.frames,
        "receiver_cpu_ms_per_frame": 1000 * result["cpu_s"] / max(received, 1), **extra,
    }


def decode_encode_cpu_ms(jpeg: bytes, repeats: int = 20) -> float:
    """CPU per frame of what passthrough avoids: decoding the camera's JPEG and encoding it again."""
    cpu = time.process_time()
    for _ in range(repeats):
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return 1000 * (time.process_time() - cpu) / repeats


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run with every run's figure beside it: frames/s at saturation, p99 latency
    when paced (one 600-frame run's p99 is its 6th-slowest frame, so it moves a lot)."""
    key, label, digits = (("frames_per_s", "runs_frames_per_s", None) if runs[0]["mode"] == "saturation"
                          else ("p99_ms", "runs_p99_ms", 3))
    ordered = sorted(runs, key=lambda row: row[key])
    return {**ordered[len(ordered) // 2], label: [round(row[key], digits) for row in runs]}


def run(*, frames: int = 3000, raw_frames: int = 300, paced_frames: int = 600, rate: float = 60.0,
        repeats: int = 3) -> BenchReport:
    """Every system x payload x mode, then the passthrough CPU comparison.

    Every case runs ``repeats`` times, the systems taking turns in each round so that a slow
    spell of this shared machine hits them all alike; each reports its median run.
    """
    image, jpeg = test_frame()
    saturation = [Case(system, payload, "saturation", frames if payload == "jpeg" else raw_frames)
                  for payload in ("jpeg", "raw") for system in SYSTEMS]
    paced = [Case(system, "jpeg", "paced", paced_frames, rate) for system in SYSTEMS]
    report = BenchReport("transport")
    runs: dict[Case, list[dict[str, Any]]] = {case: [] for case in saturation + paced}
    with Progress() as bar:
        task = bar.add_task("transport cases", total=len(runs) * repeats)
        for _ in range(repeats):
            for case in runs:
                runs[case].append(_run_case(case, image, jpeg))
                bar.advance(task)
    report.results.extend(_median_run(case_runs) for case_runs in runs.values())
    rows = {row["case"]: row for row in report.results}
    ours, theirs = rows["pouchline jpeg saturation"], rows["imagezmq_reqrep jpeg saturation"]
    tcp = rows["pouchline_tcp jpeg saturation"]
    paced, paced_theirs = rows["pouchline jpeg paced"], rows["imagezmq_reqrep jpeg paced"]
    passthrough_ms = ours["sender_cpu_ms_per_frame"]
    decode_encode_ms = decode_encode_cpu_ms(jpeg)
    report.figures = {
        "silent_drops": sum(row["silent_drops"] for row in report.results if row["system"] in _OURS),
        "imagezmq_pubsub_silent_drops": sum(row["silent_drops"] for row in report.results if row["system"] == "imagezmq_pubsub"),
        "fps_jpeg_1080p": ours["frames_per_s"], "fps_raw_1080p": rows["pouchline raw saturation"]["frames_per_s"],
        "p99_ms_jpeg_paced": paced["p99_ms"], "jpeg_bytes": len(jpeg), "paced_rate_fps": rate,
        "passthrough_cpu_ms_per_frame": passthrough_ms, "decode_encode_cpu_ms_per_frame": decode_encode_ms,
    }
    report.ratios = {
        "fps_vs_imagezmq_reqrep_jpeg": ours["frames_per_s"] / theirs["frames_per_s"],
        "p99_vs_imagezmq_reqrep_jpeg": paced["p99_ms"] / paced_theirs["p99_ms"],
        "fps_vs_imagezmq_reqrep_raw": rows["pouchline raw saturation"]["frames_per_s"]
        / rows["imagezmq_reqrep raw saturation"]["frames_per_s"],
        "fps_vs_imagezmq_reqrep_jpeg_tcp": tcp["frames_per_s"] / theirs["frames_per_s"],
        "p99_vs_imagezmq_reqrep_jpeg_tcp": rows["pouchline_tcp jpeg paced"]["p99_ms"] / paced_theirs["p99_ms"],
        "passthrough_cpu_vs_decode_encode": passthrough_ms / decode_encode_ms,
    }
    return report
