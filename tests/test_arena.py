"""The shared-memory arena: ring allocation, stale-region detection, references that lie, and
frames by reference through the real transport on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from pouchline.station import arena as arena_module
from pouchline.station.arena import REFERENCE, ArenaReader, ArenaWriter, arena_dir, remove_stale
from pouchline.station.protocol import REFERENCE_MAGIC, FrameRef, ProtocolError, decode, encode_frame
from pouchline.station.transport import FrameClient, FrameServer
from tests.test_transport import FAST, JPEG, free_port, header, wait_for

KB = 1024


@pytest.fixture
def arena():
    writer = ArenaWriter("unit", "abcd1234", 64 * KB)
    yield writer
    writer.close()


def test_regions_are_allocated_as_a_ring_and_freed_in_any_order(arena: ArenaWriter) -> None:
    payload = memoryview(bytes(range(256)) * 48)  # 12 KiB: five fit in 64 KiB with headers, not six
    regions = [arena.put(payload) for _ in range(6)]
    assert all(regions[:5]) and regions[5] is None  # full: the caller sends that frame inline
    arena.free(regions[2])
    assert arena.put(payload) is None  # a freed region in the middle is not reusable yet
    arena.free(regions[0])
    reused = arena.put(payload)
    assert reused is not None and reused.offset == regions[0].offset  # wrapped to the start
    arena.free(regions[1])
    arena.free(regions[1])  # freeing twice is harmless
    assert arena.put(payload) is not None
    offsets = sorted(r.offset for r in regions[:5])
    assert all(b - a >= len(payload) for a, b in zip(offsets, offsets[1:]))  # regions never overlap


def test_the_ring_turns_within_its_hot_part_while_that_suffices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames cycle through the first `_HOT_BYTES` (cached, cheap to copy into) and spill into
    the rest only while that part is full."""
    monkeypatch.setattr(arena_module, "_HOT_BYTES", 32 * KB)
    writer = ArenaWriter("hot", "abcd1234", 64 * KB)
    try:
        payload = memoryview(bytes(12 * KB))  # two fit in the hot part
        held = [writer.put(payload) for _ in range(2)]
        for _ in range(10):  # two in flight at a time: they never leave the hot part
            writer.free(held.pop(0))
            region = writer.put(payload)
            assert region is not None and region.end <= 32 * KB
            held.append(region)
        spilled = writer.put(payload)  # a third at once: the hot part is full, the rest takes it
        assert spilled is not None and spilled.end > 32 * KB
        writer.free(held.pop(0))
        assert writer.put(payload).end > 32 * KB  # the start's room is less than what is live: not yet
        writer.free(held.pop(0))
        back = writer.put(payload)
        assert back is not None and back.end <= 32 * KB  # back into the hot part once it has room to turn
    finally:
        writer.close()


def test_the_ring_turns_as_soon_as_its_start_holds_what_is_live() -> None:
    """With a few frames in flight the ring stays a few frames long (its lines stay in the CPU's
    caches, so the copy in is cheap) instead of sweeping the whole hot part before it turns."""
    writer = ArenaWriter("tight", "abcd1234", 1024 * KB)
    try:
        payload = memoryview(bytes(12 * KB))
        held = [writer.put(payload) for _ in range(2)]
        need = held[0].end - held[0].offset
        ends = []
        for _ in range(200):  # two in flight at a time
            writer.free(held.pop(0))
            region = writer.put(payload)
            assert region is not None
            ends.append(region.end)
            held.append(region)
        assert max(ends) <= 64 + 6 * need  # a sweep of 1 MiB would reach past 80 frames
        assert min(r.offset for r in held) >= 64
    finally:
        writer.close()


def test_a_reader_sees_the_bytes_in_place_and_notices_reuse(arena: ArenaWriter) -> None:
    reader = ArenaReader(arena.name, "abcd1234")
    try:
        data = os.urandom(3000)
        region = arena.put(memoryview(data))
        assert region is not None
        view, lease = reader.view(memoryview(region.reference(arena.tag)), len(data), "frame x")
        assert bytes(view) == data
        lease()  # still this frame's bytes
        arena.free(region)
        with pytest.raises(ProtocolError, match="was reused") as stale:
            lease()
        assert stale.value.kind == "arena_stale"
        with pytest.raises(ProtocolError, match="was reused"):
            reader.view(memoryview(region.reference(arena.tag)), len(data), "frame x")
        view.release()
    finally:
        reader.close()


@pytest.mark.parametrize(("reference", "nbytes", "message"), [
    (REFERENCE.pack(64, 1, b"other___"), 10, "reference to arena b'other___'"),
    (REFERENCE.pack(64, 1, b"abcd1234")[:-1], 10, "reference is 23 bytes"),
    (REFERENCE.pack(60 * KB, 1, b"abcd1234"), 8 * KB, "lies outside"),
    (REFERENCE.pack(65, 1, b"abcd1234"), 10, "lies outside"),  # not a region boundary
    (REFERENCE.pack(0, 1, b"abcd1234"), 10, "lies outside"),  # the file header
    (REFERENCE.pack(64, 0, b"abcd1234"), 10, "generation 0"),
])
def test_references_that_lie_are_refused(arena: ArenaWriter, reference: bytes, nbytes: int, message: str) -> None:
    arena.put(memoryview(b"x" * 100))
    reader = ArenaReader(arena.name, "abcd1234")
    try:
        with pytest.raises(ProtocolError, match=message) as refused:
            reader.view(memoryview(reference), nbytes, "frame x")
        assert refused.value.kind == "arena_invalid"
    finally:
        reader.close()


def test_a_reader_refuses_what_is_not_the_named_stations_arena(arena: ArenaWriter, tmp_path) -> None:
    with pytest.raises(ValueError, match="not the arena of station session 'ffff0000'"):
        ArenaReader(arena.name, "ffff0000")
    with pytest.raises(ValueError, match="not a pouchline arena"):
        ArenaReader("../etc/passwd", "abcd1234")
    with pytest.raises(FileNotFoundError):
        ArenaReader("pouchline-nobody-00000000-1", "00000000")


def test_arenas_of_killed_stations_are_removed_but_live_ones_kept() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = arena_dir() / f"pouchline-st-x-deadbeef-{dead.stdout.strip()}"
    similar = arena_dir() / f"pouchline-st-x-y-deadbeef-{dead.stdout.strip()}"  # station 'st-x-y', not ours
    stale.write_bytes(b"")
    similar.write_bytes(b"")
    try:
        live = ArenaWriter("st-x", "cafe0000", 64 * KB)
        assert not stale.exists() and similar.exists() and live.path.exists()
        assert remove_stale("st-x") == []  # the live one stays
        live.close()
        assert not live.path.exists()
    finally:
        similar.unlink(missing_ok=True)


def test_a_frame_by_reference_needs_a_payload_and_its_header_is_validated() -> None:
    parts = encode_frame(header(0), JPEG)
    ref = decode([REFERENCE_MAGIC, parts[1], REFERENCE.pack(64, 1, b"abcd1234")])
    assert isinstance(ref, FrameRef) and ref.header.key == ("st1", "top", 0)
    notice = header(0).model_copy(update={"dropped": "queue_full", "nbytes": 0})
    with pytest.raises(ProtocolError, match="a frame by reference needs 1 to") as refused:
        decode([REFERENCE_MAGIC, encode_frame(notice, b"")[1], REFERENCE.pack(64, 1, b"abcd1234")])
    assert refused.value.kind == "payload_mismatch"
    with pytest.raises(ProtocolError) as refused:
        decode([REFERENCE_MAGIC, parts[1]])
    assert refused.value.kind == "parts"


def test_a_payload_that_disagrees_with_its_header_is_refused_on_resolve(arena: ArenaWriter) -> None:
    png = cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))[1].tobytes()
    region = arena.put(memoryview(png))
    assert region is not None
    sent = header(0).model_copy(update={"nbytes": len(png)})  # says jpeg, carries a png
    ref = decode([REFERENCE_MAGIC, encode_frame(header(0), JPEG)[1], region.reference(arena.tag)])
    ref = FrameRef(sent, ref.reference)
    reader = ArenaReader(arena.name, "abcd1234")
    try:
        with pytest.raises(ProtocolError, match="header says jpeg but the payload is a png") as refused:
            ref.resolve(reader)
        assert refused.value.kind == "payload_mismatch"
    finally:
        reader.close()


def _collect(client: FrameClient, count: int, *, hold: bool = False) -> list:
    frames, deadline = [], time.monotonic() + 10
    while len(frames) < count and time.monotonic() < deadline:
        frame = client.receive(0.05)
        if frame is not None:
            frames.append(frame)
            if not hold:
                client.done(frame.header.key)
    return frames


def test_a_worker_on_the_stations_host_gets_frames_by_reference() -> None:
    server = FrameServer(f"tcp://127.0.0.1:{free_port()}", station="st1", settings=FAST)
    client = FrameClient([server.endpoint], name="local", capacity=4, settings=FAST)
    try:
        client.receive(0.3)  # hello, the station's welcome, mapping, hello again
        assert wait_for(lambda: server.stats()["workers"] and server.stats()["workers"][0]["local"])
        for seq in range(10):  # within credit (4) plus the pending bound (8): submit never blocks
            server.submit(header(seq), JPEG)
        frames = _collect(client, 10)
        assert [f.header.seq for f in frames] == list(range(10))
        assert all(bytes(f.payload) == JPEG and f.image().shape == (48, 64, 3) for f in frames)
        assert client.stats["arena_attached"] == 1 and not client.rejected.counts
    finally:
        client.close()
        stats = server.close()
    assert stats["done"] == 10 and not os.path.exists(server._arena.path)


def test_workers_that_cannot_map_the_arena_and_frames_it_cannot_hold_go_inline() -> None:
    big = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (600, 800, 3), np.uint8))[1].tobytes()
    settings = FAST.model_copy(update={"arena_mb": 1})  # room for about one such frame
    server = FrameServer(f"tcp://127.0.0.1:{free_port()}", station="st1", settings=settings)
    remote = FrameClient([server.endpoint], name="remote", capacity=4, settings=FAST, shared_memory=False)
    local = FrameClient([server.endpoint], name="local", capacity=4, settings=FAST)
    try:
        local.receive(0.3)
        remote.receive(0.3)
        assert wait_for(lambda: sorted(w["local"] for w in server.stats()["workers"]) == [False, True])
        tall = header(0).model_copy(update={"width": 800, "height": 600, "nbytes": len(big)})
        for seq in range(8):
            server.submit(tall.model_copy(update={"seq": seq}), big)
        frames = _collect(local, 4, hold=True) + _collect(remote, 4, hold=True)
        assert sorted(f.header.seq for f in frames) == list(range(8))
        assert all(bytes(f.payload) == big for f in frames)
        assert not local.rejected.counts and not remote.rejected.counts
    finally:
        local.close()
        remote.close()
        server.close()


def test_zero_copy_frames_are_refused_once_the_station_reused_their_bytes() -> None:
    server = FrameServer(f"tcp://127.0.0.1:{free_port()}", station="st1", settings=FAST)
    client = FrameClient([server.endpoint], name="fast", capacity=4, settings=FAST, zero_copy=True)
    try:
        client.receive(0.3)
        assert wait_for(lambda: server.stats()["workers"] and server.stats()["workers"][0]["local"])
        server.submit(header(0), JPEG)
        (frame,) = _collect(client, 1, hold=True)
        assert frame.image().shape == (48, 64, 3)  # valid while held
        client.done(frame.header.key)
        assert wait_for(lambda: server.stats().get("done") == 1)
        with pytest.raises(ProtocolError, match="was reused") as stale:
            frame.image()
        assert stale.value.kind == "arena_stale"
    finally:
        client.close()
        server.close()


def test_a_station_whose_arena_does_not_fit_in_shared_memory_sends_inline(caplog: pytest.LogCaptureFixture) -> None:
    free_mb = os.statvfs(arena_dir()).f_bavail * os.statvfs(arena_dir()).f_frsize >> 20
    too_big = FAST.model_copy(update={"arena_mb": min(free_mb + 1024, 65536)})
    if too_big.arena_mb <= free_mb:
        pytest.skip(f"{arena_dir()} has {free_mb} MiB free: more than the largest arena setting can exceed")
    server = FrameServer(f"tcp://127.0.0.1:{free_port()}", station="st1", settings=too_big)
    client = FrameClient([server.endpoint], name="local", capacity=4, settings=FAST)
    try:
        assert "no shared-memory arena" in caplog.text
        assert not list(arena_dir().glob(f"pouchline-st1-{server.session}-*"))  # nothing half-made left behind
        server.submit(header(0), JPEG)
        (frame,) = _collect(client, 1)
        assert bytes(frame.payload) == JPEG and client.stats["arena_attached"] == 0
    finally:
        client.close()
        server.close()


def test_after_a_station_restart_the_worker_maps_the_new_arena_and_frames_come_by_reference_again() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    station = FrameServer(endpoint, station="st1", settings=FAST)
    client = FrameClient([endpoint], name="w", capacity=4, settings=FAST)
    try:
        client.receive(0.3)
        assert wait_for(lambda: station.stats()["workers"] and station.stats()["workers"][0]["local"])
        station.submit(header(0), JPEG)
        assert len(_collect(client, 1)) == 1
        old_arena = station._arena.path
        station.close(grace_s=0.5)
        assert not old_arena.exists()
        # The worker reads nothing for longer than the timeout (as on a loaded machine): what it
        # then finds waiting, the lane's end, must count before the silence does.
        time.sleep(2 * FAST.timeout_s)
        restarted = FrameServer(endpoint, station="st1", settings=FAST)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (restarted.stats()["workers"]
                                                       and restarted.stats()["workers"][0]["local"]):
                client.receive(0.05)  # heartbeats: the new session, the new arena, hello again
            assert restarted.stats()["workers"][0]["local"], client.stats
            for seq in range(1, 4):
                restarted.submit(header(seq), JPEG)
            frames = _collect(client, 3)
            assert [f.header.seq for f in frames] == [1, 2, 3] and all(bytes(f.payload) == JPEG for f in frames)
            assert client.stats["arena_attached"] == 2 and client.stats["lane_joined"] == 2
            assert client.stats["lane_closed"] == 1  # the old station's lane closed as it exited: the worker joined anew
            assert not client.rejected.counts
        finally:
            restarted.close()
    finally:
        client.close()
