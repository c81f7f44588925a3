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

import errno
import logging
import os
import select
import socket
import struct
from collections import Counter
from collections.abc import Sequence

from pouchline.station.protocol import ProtocolError

log = logging.getLogger(__name__)

#: Length prefix of each part in a lane packet.
_PART = struct.Struct("<I")
#: Largest packet either end sends or accepts, well within a Unix socket's default buffer
#: (208 kB on Linux): a batch of frames by reference is a few kB (headers with ground truth
#: are the largest); anything bigger goes over ZeroMQ.
MAX_PACKET = 64 * 1024
#: A worker's first packet: its ZeroMQ routing identity (ZeroMQ allows 1-255 bytes).
MAX_IDENTITY = 255
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
#: One end of a lane: a connected ``SOCK_SEQPACKET`` Unix socket.
Lane = socket.socket


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


def accept_lane(server: socket.socket) -> Lane | None:
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


def connect_lane(name: str, identity: bytes) -> Lane:
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


def send_packet(sock: Lane, packet: bytes) -> str | None:
    """Send one packet (non-blocking): None when sent, else why not: ``"full"`` (no room now,
    or larger than this host allows: send it another way) or the error that broke the lane."""
    try:
        sock.send(packet)
    except (BlockingIOError, InterruptedError):
        return "full"
    except OSError as error:
        return "full" if error.errno in (errno.EMSGSIZE, errno.ENOBUFS) else f"broke ({error})"
    return None


def receive_packet(sock: Lane) -> bytes | None:
    """The next packet (non-blocking); None when none waits. An empty result means the peer
    closed the lane; OSError when it broke. A packet larger than `MAX_PACKET` is cut short,
    so its parts do not add up and it is refused."""
    try:
        return sock.recv(MAX_PACKET, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None


class LaneHub:
    """A station's side of its lanes: the listener, lanes waiting for their first packet, and
    named lanes by worker identity. Only sockets and bookkeeping: what a lane event means for
    the frames (credit, redelivery) is the transport's. Not thread-safe; the station calls it
    under its lock.

    Raises OSError where Unix sockets or the abstract namespace are missing.
    """

    #: Lanes kept at most, named or waiting for a name.
    MOST = 256

    def __init__(self, name: str) -> None:
        self.name = name
        self._server = listen_lane(name)
        self._named: dict[bytes, Lane] = {}  # worker identity -> its lane
        self._owners: dict[int, bytes] = {}  # lane descriptor -> worker identity
        self._poll = select.poll()  # the named lanes
        self._unnamed: list[Lane] = []  # lanes that have not said whose they are yet

    def has(self, identity: bytes) -> bool:
        return identity in self._named

    def descriptors(self, named: bool) -> list[int]:
        """What to wait on: the listener, lanes not yet named and, with ``named``, the named ones."""
        waiting = [self._server.fileno(), *(conn.fileno() for conn in self._unnamed)]
        return waiting + list(self._owners) if named else waiting

    def serve(self, readable: set[int]) -> Counter[str]:
        """Accept new lanes and name those whose first packet came (``readable``: descriptors
        found readable); returns what happened (``lanes_joined``, ``lanes_refused``).

        A lane is refused when its peer runs as another user, its name is not a routing
        identity, or its worker already has one: a worker joins one lane per session, so a
        second one under its name is not its own."""
        events: Counter[str] = Counter()
        if self._server.fileno() in readable:
            while True:
                try:
                    conn = accept_lane(self._server)
                except PermissionError as error:
                    events["lanes_refused"] += 1
                    log.warning("lane %s: %s", self.name, error)
                    continue
                if conn is None:
                    break
                self._unnamed.append(conn)
                if len(self._unnamed) > self.MOST:
                    self._unnamed.pop(0).close()
        for conn in [conn for conn in self._unnamed if conn.fileno() in readable]:
            self._unnamed.remove(conn)
            try:
                identity = receive_packet(conn)
            except OSError:
                identity = b""
            if identity is None:
                self._unnamed.append(conn)  # woken for nothing: wait for its first packet
            elif not 0 < len(identity) <= MAX_IDENTITY or identity in self._named or len(self._named) >= self.MOST:
                conn.close()
                events["lanes_refused"] += 1
            else:
                self._named[identity] = conn
                self._owners[conn.fileno()] = identity
                self._poll.register(conn, select.POLLIN)
                events["lanes_joined"] += 1
        return events

    def send(self, identity: bytes, packet: bytes) -> str | None:
        """`send_packet` on the worker's lane (a lane that broke stays open for `close`)."""
        return send_packet(self._named[identity], packet)

    def ready(self) -> list[bytes]:
        """The workers whose lanes have something to read (or hung up), without waiting."""
        return [self._owners[descriptor] for descriptor, _ in self._poll.poll(0)] if self._owners else []

    def receive(self, identity: bytes) -> tuple[list[bytes], str | None]:
        """Every packet waiting on the worker's lane, and why it ended if it did (the peer
        hung up or the lane broke; it stays open for `close`)."""
        conn, packets = self._named[identity], []
        while True:
            try:
                packet = receive_packet(conn)
            except OSError as error:
                return packets, f"broke ({error})"
            if packet is None:
                return packets, None
            if not packet:
                return packets, "was closed by the worker"
            packets.append(packet)

    def close(self, identity: bytes) -> bool:
        """Close the worker's lane; False if it had none."""
        conn = self._named.pop(identity, None)
        if conn is None:
            return False
        del self._owners[conn.fileno()]
        self._poll.unregister(conn)
        conn.close()
        return True

    def close_all(self) -> None:
        for identity in list(self._named):
            self.close(identity)
        for conn in [*self._unnamed, self._server]:
            conn.close()
        self._unnamed.clear()
