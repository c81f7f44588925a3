"""The local lane: frames by reference and their `done` on a Unix socket between a station and
a worker on its host, with the real transport on 127.0.0.1; packets that lie, lanes that
break, peers of another user, packets too large for it."""

from __future__ import annotations

import os
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pouchline.station import lane as lane_module
from pouchline.station import transport as transport_module
from pouchline.station.lane import pack_parts, unpack_parts
from pouchline.station.protocol import FrameTruth, ProtocolError
from pouchline.station.transport import FrameClient, FrameServer
from tests.test_arena import _collect
from tests.test_protocol import TRUTH
from tests.test_transport import FAST, JPEG, free_port, header, wait_for

#: No test here waits for a peer to fall silent: a 3 s timeout keeps a worker that the test
#: leaves unserviced for a moment (on a loaded machine) from being dropped mid-test.
PATIENT = FAST.model_copy(update={"timeout_s": 3.0})


@pytest.fixture
def pair():
    """A station and a worker on its host, the worker's lane joined and named."""
    server = FrameServer(f"tcp://127.0.0.1:{free_port()}", station="st1", settings=PATIENT)
    client = FrameClient([server.endpoint], name="local", capacity=4, settings=PATIENT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (server.stats()["workers"] and server.stats()["workers"][0]["local"]
                                               and server.stats().get("lanes_joined")):
        client.receive(0.05)  # hello, the station's heartbeat, mapping, lane, hello again
    yield server, client
    client.close()
    server.close()


def test_frames_by_reference_and_their_credit_travel_on_the_lane(pair: tuple[FrameServer, FrameClient]) -> None:
    server, client = pair
    assert client.stats["lane_joined"] == 1
    for seq in range(10):
        server.submit(header(seq), JPEG)
    frames = _collect(client, 10)
    assert [f.header.seq for f in frames] == list(range(10))
    assert all(bytes(f.payload) == JPEG for f in frames)
    assert wait_for(lambda: server.stats().get("done") == 10)
    stats = server.stats()
    assert stats["sent_by_lane"] == 10 and stats["done_by_lane"] == 10 and stats["lanes_joined"] == 1
    assert not client.rejected.counts and not stats["malformed"]


def test_a_batch_too_large_for_a_lane_packet_goes_over_zeromq(pair: tuple[FrameServer, FrameClient],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames whose headers carry ground truth are large; past the packet limit they take the
    socket, by reference all the same."""
    monkeypatch.setattr(transport_module, "MAX_PACKET", 1000)
    outline = [(float(i), float(i % 7)) for i in range(60)]  # a renderer's cell outline makes a header large
    truth = FrameTruth.model_validate({**TRUTH, "ground_truth": {**TRUTH["ground_truth"], "polygon": outline}})
    server, client = pair
    for seq in range(6):
        with_truth = header(seq).model_copy(update={"truth": truth if seq % 2 else None, "cell": f"c{seq}"})
        server.submit(with_truth, JPEG)
        (frame,) = _collect(client, 1)  # one at a time: each its own packet
        assert frame.header == with_truth and bytes(frame.payload) == JPEG
    assert wait_for(lambda: server.stats().get("done") == 6)
    assert server.stats()["sent_by_lane"] == 3  # the three without truth
    assert not client.rejected.counts


def test_when_a_lane_breaks_the_frames_it_may_have_lost_are_delivered_again(pair: tuple[FrameServer, FrameClient]) -> None:
    server, client = pair
    for seq in range(4):
        server.submit(header(seq), JPEG)
    held = _collect(client, 2, hold=True)
    client._links[0].lane.shutdown(socket.SHUT_RDWR)  # the lane breaks with frames still in it
    client.done(*(frame.header.key for frame in held))
    for seq in range(4, 8):
        server.submit(header(seq), JPEG)
    seen, deadline = {frame.header.seq for frame in held}, time.monotonic() + 10
    while seen != set(range(8)) and time.monotonic() < deadline:
        frame = client.receive(0.05)
        if frame is not None:
            seen.add(frame.header.seq)
            client.done(frame.header.key)
    assert seen == set(range(8))  # every frame arrived, a few of them twice
    assert wait_for(lambda: server.stats()["in_flight"] == 0 and not server.stats()["pending"])
    stats = server.stats()
    assert stats["workers_lost_lane"] == 1 and stats["redelivered"] >= 2 and stats["lanes_closed"] == 1
    assert client.stats["lane_closed"] == 1


def test_a_lane_asked_for_by_another_user_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Abstract sockets have no permissions: each end checks the other's user id. (Faked here
    by a different own uid, so that both ends see a stranger.)"""
    monkeypatch.setattr(lane_module.os, "getuid", lambda: os.geteuid() + 1)
    server = FrameServer(f"tcp://127.0.0.1:{free_port()}", station="st1", settings=PATIENT)
    client = FrameClient([server.endpoint], name="local", capacity=4, settings=PATIENT)
    try:
        assert wait_for(lambda: client.receive(0.05) is None and server.stats()["workers"]
                        and server.stats()["workers"][0]["local"])
        for seq in range(3):
            server.submit(header(seq), JPEG)
        assert [f.header.seq for f in _collect(client, 3)] == [0, 1, 2]  # by reference, over ZeroMQ
        stats = server.stats()
        assert stats["lanes_refused"] >= 1 and "lanes_joined" not in stats and "sent_by_lane" not in stats
        assert client.stats["lane_joined"] == 0
    finally:
        client.close()
        server.close()


def test_a_second_lane_under_a_workers_name_is_refused(pair: tuple[FrameServer, FrameClient]) -> None:
    """A worker joins one lane per session; a local process claiming its name cannot take its frames."""
    server, client = pair
    impostor = lane_module.connect_lane(server._lanes.name, client._links[0].identity)
    impostor.settimeout(5)
    assert impostor.recv(100) == b""  # closed by the station
    server.submit(header(0), JPEG)
    (frame,) = _collect(client, 1)
    assert frame.header.seq == 0
    stats = server.stats()
    assert stats["lanes_refused"] == 1 and stats["sent_by_lane"] == 1 and stats["lanes_joined"] == 1
    impostor.close()


def test_packets_that_lie_on_a_lane_are_counted_and_the_lane_goes_on(pair: tuple[FrameServer, FrameClient]) -> None:
    """A local process that names itself after a worker and sends garbage on the lane cannot
    stop the station; a worker's lane that delivers garbage cannot stop the worker."""
    server, client = pair
    rogue = lane_module.connect_lane(server._lanes.name, b"rogue.0001")
    for packet in (b"\x01", pack_parts([b"PLC1", b"\xc1"]), pack_parts([b"PLF1", b"x", b"y"])):
        rogue.send(packet)
    assert wait_for(lambda: sum(server.stats()["malformed"].values()) >= 3)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client._links[0].lane.close()
    client._links[0].lane = ours
    client._poller = client._make_poller()
    for packet in (b"\x05\x00\x00", pack_parts([b"PLR1", b"\x80", b"ref"]), pack_parts([b"PLC1", b"\x80"])):
        theirs.send(packet)
    server.submit(header(0), JPEG)
    (frame,) = _collect(client, 1)  # over ZeroMQ: the station's lane to this worker is gone
    assert frame.header.seq == 0
    assert sum(client.rejected.counts.values()) == 3
    rogue.close()
    theirs.close()


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(st.one_of(
    st.binary(max_size=64),
    st.lists(st.binary(max_size=40), min_size=1, max_size=6).map(pack_parts),
    st.tuples(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.integers(0, 200), st.binary(max_size=3))
    .map(lambda t: (lambda p: p[: t[1] % (len(p) + 1)] + t[2] + p[t[1] % (len(p) + 1) + len(t[2]):])(pack_parts(t[0]))),
))
def test_lane_packets_split_exactly_into_their_parts_or_are_refused(packet: bytes) -> None:
    try:
        parts = unpack_parts(packet)
    except ProtocolError as error:
        assert error.kind == "parts"
        return
    assert parts and pack_parts(parts) == packet
