"""The frame transport over real ZeroMQ sockets on 127.0.0.1: delivery, credit, redelivery,
restarts, drop notices, CurveZMQ and malformed messages."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from pouchline.station.curve import CurveClientConfig, CurveServerConfig, create_keys
from pouchline.station.protocol import FrameHeader, Hello, decode, encode_control, encode_frame, split_batch
from pouchline.station.transport import FrameClient, FrameServer, TransportSettings

FAST = TransportSettings(heartbeat_s=0.05, timeout_s=0.5, max_pending=8, shutdown_grace_s=1.0)
JPEG = cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))[1].tobytes()


def header(seq: int, camera: str = "top", cell: str | None = None) -> FrameHeader:
    return FrameHeader(
        v=1, station="st1", camera=camera, lot="LOT-1", cell=cell or f"cell-{seq // 2}", view="top", views=2, seq=seq,
        t_mono_ns=time.monotonic_ns(), t_wall=time.time(), exposure=None, gain=None, trigger="source",
        encoding="jpeg", width=64, height=48, channels=3, dtype="uint8", nbytes=len(JPEG), dropped=None, truth=None,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Worker(threading.Thread):
    """A consumer thread: receives, records keys, acks (unless told to hold)."""

    def __init__(self, endpoint: str, name: str, *, capacity: int = 2, ack: bool = True, delay_s: float = 0.0,
                 curve: CurveClientConfig | None = None) -> None:
        super().__init__(daemon=True)
        self.client = FrameClient([endpoint], name=name, capacity=capacity, settings=FAST, curve=curve)
        self.ack, self.delay_s = ack, delay_s
        self.keys: list[tuple[str, str, int]] = []
        self.notices: list[FrameHeader] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                frame = self.client.receive(0.05)
                if frame is None:
                    continue
                if frame.header.dropped:
                    self.notices.append(frame.header)
                else:
                    assert frame.image().shape == (48, 64, 3)
                self.keys.append(frame.header.key)
                time.sleep(self.delay_s)
                if self.ack:
                    self.client.done(frame.header.key)
        finally:
            self.client.close()

    def halt(self) -> None:
        self.stop.set()
        self.join(timeout=5)


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def server():
    instance = FrameServer("tcp://127.0.0.1:0", station="st1", settings=FAST)
    yield instance
    instance.close(grace_s=0)


def test_every_frame_arrives_exactly_once_across_three_workers(server: FrameServer) -> None:
    workers = [Worker(server.endpoint, f"w{i}", delay_s=0.002) for i in range(3)]
    for worker in workers:
        worker.start()
    sent = [header(seq) for seq in range(300)]
    for item in sent:
        assert server.submit(item, JPEG, policy="every")
    assert wait_for(lambda: server.stats().get("done", 0) == len(sent))
    for worker in workers:
        worker.halt()
    received = Counter(key for worker in workers for key in worker.keys)
    assert set(received) == {item.key for item in sent}
    assert max(received.values()) == 1, "a frame arrived twice"
    assert all(len(worker.keys) > 30 for worker in workers), "load is not balanced"
    stats = server.stats()
    assert stats["sent"] == 300 and stats["in_flight"] == 0 and stats["pending"] == 0 and not stats.get("redelivered")


def test_frames_held_by_a_killed_worker_are_delivered_again(server: FrameServer) -> None:
    stuck = Worker(server.endpoint, "stuck", capacity=3, ack=False)
    stuck.start()
    assert wait_for(lambda: len(server.stats()["workers"]) == 1)
    for seq in range(3):
        server.submit(header(seq), JPEG)
    assert wait_for(lambda: len(stuck.keys) == 3)
    stuck.halt()  # dies holding three frames, without a word
    healthy = Worker(server.endpoint, "healthy")
    healthy.start()
    for seq in range(3, 10):
        server.submit(header(seq), JPEG)
    assert wait_for(lambda: server.stats().get("done", 0) == 10)
    stats = server.stats()  # before the healthy one goes too
    healthy.halt()
    assert sorted(healthy.keys) == sorted(header(seq).key for seq in range(10))
    assert stats["redelivered"] == 3
    gone = ("workers_timed_out", "workers_unreachable", "workers_lost_lane")
    assert sum(stats.get(why, 0) for why in gone) == 1  # gone, one way or the other (on this host: its lane closed)


def test_a_restarted_worker_resumes_without_restarting_the_station(server: FrameServer) -> None:
    first = Worker(server.endpoint, "w")
    first.start()
    for seq in range(20):
        server.submit(header(seq), JPEG)
    assert wait_for(lambda: len(first.keys) == 20)
    first.halt()
    second = Worker(server.endpoint, "w")  # same name, new process: a new session
    second.start()
    for seq in range(20, 40):
        server.submit(header(seq), JPEG)
    assert wait_for(lambda: len(second.keys) == 20)
    second.halt()
    assert server.stats()["done"] == 40


def test_a_worker_survives_a_station_restart() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    station = FrameServer(endpoint, station="st1", settings=FAST)
    worker = Worker(endpoint, "w")
    worker.start()
    for seq in range(5):
        station.submit(header(seq), JPEG)
    assert wait_for(lambda: len(worker.keys) == 5)
    station.close(grace_s=0.5)
    time.sleep(0.3)
    restarted = FrameServer(endpoint, station="st1", settings=FAST)
    try:
        for seq in range(5, 10):
            restarted.submit(header(seq), JPEG)
        assert wait_for(lambda: len(worker.keys) == 10), worker.client.stats
        assert wait_for(lambda: restarted.stats()["done"] == 5), restarted.stats()  # the last done may still be in flight
    finally:
        worker.halt()
        restarted.close(grace_s=0)


def test_live_frames_beyond_the_queue_become_drop_notices_not_silent_losses(server: FrameServer) -> None:
    sent = [header(seq) for seq in range(20)]
    for item in sent:
        assert server.submit(item, JPEG, policy="newest")  # no worker yet: the queue overflows
    assert wait_for(lambda: server.stats().get("dropped_queue_full", 0) == 12)
    worker = Worker(server.endpoint, "late")
    worker.start()
    assert wait_for(lambda: len(worker.keys) == 20)
    worker.halt()
    assert sorted(worker.keys) == sorted(item.key for item in sent)
    assert [notice.seq for notice in worker.notices] == list(range(12)), "the oldest frames are the ones dropped"
    assert {notice.dropped for notice in worker.notices} == {"queue_full"}
    assert server.stats()["cameras"]["top"]["dropped_queue_full"] == 12


def test_every_policy_blocks_the_producer_instead_of_dropping(server: FrameServer) -> None:
    for seq in range(FAST.max_pending):
        assert server.submit(header(seq), JPEG, policy="every")
    started = time.monotonic()
    assert not server.submit(header(99), JPEG, policy="every", timeout_s=0.3)
    assert time.monotonic() - started >= 0.3
    assert not server.stats().get("dropped_queue_full")


def test_a_blocked_producer_goes_on_once_a_worker_takes_frames_and_cameras_are_bounded_apart(server: FrameServer) -> None:
    for seq in range(FAST.max_pending):
        assert server.submit(header(seq), JPEG, policy="every")
    assert server.submit(header(0, camera="side"), JPEG, policy="every", timeout_s=0.1), "another camera's bound is its own"
    returned: list[bool] = []
    producer = threading.Thread(target=lambda: returned.append(server.submit(header(99), JPEG, policy="every")))
    producer.start()
    producer.join(timeout=0.3)
    assert producer.is_alive(), "the top camera's bound is full: its producer waits"
    worker = Worker(server.endpoint, "w")
    worker.start()
    producer.join(timeout=5)
    assert returned == [True]
    assert wait_for(lambda: len(worker.keys) == FAST.max_pending + 2)
    worker.halt()
    assert ("st1", "top", 99) in worker.keys and not server.stats().get("dropped_queue_full")


def test_curve_refuses_a_worker_with_an_unknown_key(tmp_path: Path) -> None:
    create_keys(tmp_path / "station", "station")
    create_keys(tmp_path / "clients", "good")
    create_keys(tmp_path / "rogue", "rogue")
    server = FrameServer("tcp://127.0.0.1:0", station="st1", settings=FAST, curve=CurveServerConfig(
        secret_key=tmp_path / "station" / "station.key_secret", clients=tmp_path / "clients"))
    station_key = tmp_path / "station" / "station.key"
    rogue = Worker(server.endpoint, "rogue", curve=CurveClientConfig(
        secret_key=tmp_path / "rogue" / "rogue.key_secret", server_key=station_key))
    good = Worker(server.endpoint, "good", curve=CurveClientConfig(
        secret_key=tmp_path / "clients" / "good.key_secret", server_key=station_key))
    try:
        rogue.start()
        good.start()
        for seq in range(10):
            server.submit(header(seq), JPEG)
        assert wait_for(lambda: len(good.keys) == 10)
        time.sleep(0.3)
        assert rogue.keys == []
        assert [worker["name"] for worker in server.stats()["workers"]] == ["good"]
    finally:
        rogue.halt()
        good.halt()
        server.close(grace_s=0)


def test_malformed_messages_are_counted_and_dropped(server: FrameServer) -> None:
    context = zmq.Context.instance()
    intruder = context.socket(zmq.DEALER)
    intruder.connect(server.endpoint)
    garbage = [[b"hello"], [b"PLC1", b"\xc1\xff"], [b"PLF1", b"x" * 10, b"y"], [b"PLC1", b"\x81\xa4type\xa4done"]]
    for parts in garbage:
        intruder.send_multipart(parts)
    assert wait_for(lambda: sum(server.stats()["malformed"].values()) == len(garbage))
    intruder.close(linger=0)
    worker = Worker(server.endpoint, "w")
    worker.start()
    server.submit(header(0), JPEG)
    assert wait_for(lambda: worker.keys == [header(0).key])
    worker.halt()


def test_a_worker_counts_malformed_messages_from_a_station_and_goes_on() -> None:
    context = zmq.Context.instance()
    fake = context.socket(zmq.ROUTER)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    client = FrameClient([f"tcp://127.0.0.1:{port}"], name="w", settings=FAST)
    try:
        identity = fake.recv_multipart()[0]  # its hello
        for parts in ([b"PLF1", b"\x80", b""], [b"junk"], [b"PLF1", b"\x80"]):
            fake.send_multipart([identity, *parts])
        assert client.receive(0.5) is None
        assert client.rejected.total == 3
    finally:
        client.close()
        fake.close(linger=0)


def test_frames_held_by_a_hung_worker_are_delivered_again_after_the_timeout(server: FrameServer) -> None:
    hung = FrameClient([server.endpoint], name="hung", capacity=2, settings=FAST)
    try:
        for seq in range(2):
            server.submit(header(seq), JPEG)
        held = [hung.receive(2.0) for _ in range(2)]
        assert all(frame is not None for frame in held)
        healthy = Worker(server.endpoint, "healthy")  # the hung one stays connected but silent
        healthy.start()
        started = time.monotonic()
        assert wait_for(lambda: len(healthy.keys) == 2)
        healthy.halt()
        assert time.monotonic() - started >= FAST.timeout_s * 0.8
        assert sorted(healthy.keys) == [header(0).key, header(1).key]
        assert server.stats()["workers_timed_out"] == 1
    finally:
        hung.close()


def test_frames_that_wait_for_a_worker_travel_in_batches() -> None:
    """Frames queued up go out several per message (each frame's parts as in a single-frame
    message); each arrives exactly once, in order."""
    station = FrameServer("tcp://127.0.0.1:0", station="st1", settings=FAST.model_copy(update={"max_pending": 32}))
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sent = [header(seq) for seq in range(20)]
        for item in sent:  # no worker yet: they wait in the station's queue
            assert station.submit(item, JPEG, policy="every", timeout_s=1)
        dealer.connect(station.endpoint)
        dealer.send_multipart(encode_control(Hello(type="hello", worker="raw", session="s1", capacity=32)))
        frames, sizes = [], []
        deadline = time.monotonic() + 10
        while len(frames) < len(sent) and time.monotonic() < deadline:
            if not dealer.poll(100):
                continue
            parts = dealer.recv_multipart()
            if len(parts) == 2:
                continue  # a heartbeat
            sizes.append(len(parts) // 3)
            frames += [decode(message) for message in split_batch(parts)]
        assert [frame.header for frame in frames] == sent
        assert max(sizes) > 1 and len(sizes) < len(sent), sizes
        assert station.stats()["sent"] == len(sent)
    finally:
        dealer.close(linger=0)
        station.close(grace_s=0)


def test_a_worker_takes_the_good_frames_of_a_batch_and_counts_the_bad_one() -> None:
    context = zmq.Context.instance()
    fake = context.socket(zmq.ROUTER)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    client = FrameClient([f"tcp://127.0.0.1:{port}"], name="w", capacity=8, settings=FAST)
    try:
        identity = fake.recv_multipart()[0]  # its hello
        good = [encode_frame(header(seq), JPEG) for seq in (0, 2)]
        bad = encode_frame(header(1), JPEG)
        bad[2] = JPEG[:-40]  # cut short, so the payload no longer matches its header
        fake.send_multipart([identity, *good[0], *bad, *good[1]])
        batch = client.receive_batch(8, 2.0)
        assert [frame.header.seq for frame in batch] == [0, 2]
        assert client.rejected.counts == {"payload_mismatch": 1}
        assert [error.salvage["seq"] for error in client.refused] == [1]  # answered: its cell is rejected
    finally:
        client.close()
        fake.close(linger=0)


def test_the_end_of_a_burst_is_not_held_back() -> None:
    """Frames held back to travel together still leave within milliseconds when no more come."""
    station = FrameServer("tcp://127.0.0.1:0", station="st1")  # default heartbeats: the I/O thread sleeps long
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        dealer.connect(station.endpoint)
        dealer.send_multipart(encode_control(Hello(type="hello", worker="raw", session="s1", capacity=32)))
        assert wait_for(lambda: len(station.stats()["workers"]) == 1)
        for burst in range(5):
            sent = time.monotonic()
            for seq in range(3 * burst, 3 * burst + 3):  # back to back: the later ones may wait for company
                assert station.submit(header(seq), JPEG, policy="every")
            got: list[int] = []
            while len(got) < 3 and time.monotonic() - sent < 2:
                if dealer.poll(10):
                    parts = dealer.recv_multipart()
                    got += [decode(message).header.seq for message in split_batch(parts) if len(parts) != 2]
            assert got == list(range(3 * burst, 3 * burst + 3))
            assert time.monotonic() - sent < 0.05, "the end of a burst waited"
            time.sleep(0.3)  # a quiet spell: the I/O thread goes back to long sleeps
    finally:
        dealer.close(linger=0)
        station.close(grace_s=0)
