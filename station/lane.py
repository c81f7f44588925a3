"""Local lane: frames by reference go from a station to a worker on its host without ZeroMQ.

A ZeroMQ message crosses four threads: the sender's I/O thread writes it to TCP, the
receiver's I/O thread reads it and wakes the receiving thread. For a frame whose bytes already
wait in the shared-memory arena (`pouchline.station.arena`) the message is only a header and a
24-byte reference, and those hand-offs are most of its cost: measured on the project's 2-core
machine, one small message at 60 per second took ~500 µs over ZeroMQ against ~220 µs over a
Unix socket written by one thread and read by the other.

So a station with an arena also listens on a Unix ``SOCK_SEQPACKET`` socket in Linux's
abstract namespace and names it in its heartbeats (``lane``). A worker that mapped the arena
connects to it and sends its ZeroMQ routing identity as the first packet; from then on the
station sends that worker's frames by reference as lane packets, and the worker its ``done``;
each packet holds the parts of one ZeroMQ message (a frame, a batch, a ``done``) framed by
`pack_parts`. Everything else -- hello, heartbeats, inline frames, drop notices -- stays on
ZeroMQ, and each end validates lane messages exactly as ZeroMQ ones.

Abstract sockets have no file permissions, so both ends check the peer's user id
(``SO_PEERCRED``): only processes of the station's own user, which could map the arena
anyway, may use a lane. Like the arena it is a fast path, never a requirement: a lane that
cannot be opened, or has no room for a packet, leaves the frames on ZeroMQ; one that breaks
under a live worker makes the station treat that worker as gone (see
`pouchline.station.transport`).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

from pouchline.station.protocol import ProtocolError

#: Length prefix of each part in a lane packet.
_PART = struct.Struct("<I")
#: Largest packet either end sends or accepts, well within a Unix socket's default buffer
#: (208 kB on Linux): a batch of frames by reference is a few kB (headers with ground truth
#: are the largest); anything bigger goes over ZeroMQ.
MAX_PACKET = 64 * 1024
#: A worker's first packet: its ZeroMQ routing identity (ZeroMQ allows 1-255 bytes).
MAX_IDENTITY = 255
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def lane_name(session: str) -> str:
    """The abstract socket name of a station process's lane (unique per session and process)."""
    return f"pouchline-lane-{session}-{os.getpid()}"


def _address(name: str) -> str:
    return "\0" + name


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end (``SO_PEERCRED``)."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[1]


def listen_lane(name: str) -> socket.socket:
    """The station's listening lane socket (non-blocking); OSError where Unix sockets or the
    abstract namespace are missing, and the station then sends every frame over ZeroMQ."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        server.bind(_address(name))
        server.listen(64)
        server.setblocking(False)
    except OSError:
        server.close()
        raise
    return server


def accept_lane(server: socket.socket) -> socket.socket | None:
    """A new lane connection (non-blocking); None when none waits. PermissionError when the
    peer runs as another user: it is closed at once."""
    try:
        conn, _ = server.accept()
    except (BlockingIOError, InterruptedError):
        return None
    uid = peer_uid(conn)
    if uid != os.getuid():
        conn.close()
        raise PermissionError(f"a process of user id {uid} asked for a lane; only user id {os.getuid()} may")
    conn.setblocking(False)
    return conn


def connect_lane(name: str, identity: bytes) -> socket.socket:
    """A worker's lane to the station listening as ``name``: checks that the station runs as
    this user and introduces the worker by its ZeroMQ routing identity; OSError otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(1.0)
        sock.connect(_address(name))
        if peer_uid(sock) != os.getuid():
            raise PermissionError(f"lane {name} belongs to another user")
        sock.send(identity)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def pack_parts(parts: Sequence[bytes | memoryview]) -> bytes:
    """One lane packet: each part as its 4-byte little-endian length and its bytes."""
    out = bytearray()
    for part in parts:
        out += _PART.pack(len(part))
        out += part
    return bytes(out)


def unpack_parts(packet: bytes) -> list[memoryview]:
    """The parts of a lane packet (views, no copies); ``ProtocolError('parts')`` when the
    lengths do not add up to the packet exactly."""
    view = memoryview(packet)
    parts: list[memoryview] = []
    offset, size = 0, len(view)
    while offset < size:
        if offset + _PART.size > size:
            raise ProtocolError("parts", f"lane packet of {size} bytes ends inside a part length at {offset}")
        (length,) = _PART.unpack_from(view, offset)
        offset += _PART.size
        if offset + length > size:
            raise ProtocolError("parts", f"lane packet of {size} bytes: a part of {length} bytes at {offset} "
                                         "runs past its end")
        parts.append(view[offset : offset + length])
        offset += length
    if not parts:
        raise ProtocolError("parts", "lane packet is empty")
    return parts


def receive_packet(sock: socket.socket) -> bytes | None:
    """The next packet (non-blocking); None when none waits. An empty result means the peer
    closed the lane; OSError when it broke. A packet larger than `MAX_PACKET` is cut short,
    so its parts do not add up and it is refused."""
    try:
        return sock.recv(MAX_PACKET, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
