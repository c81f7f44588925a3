"""Frame transport: a station hands frames to inspection workers on credit, over ZeroMQ.

Sockets: the station binds a ROUTER; every worker (on this machine or another) connects a
DEALER to each station it serves. Messages are those of `pouchline.station.protocol`.

Flow control is explicit credit. A worker announces how many frames it may hold at once
(`capacity`); the station sends a frame only to a worker with free credit (the least loaded
one) and the credit comes back with the worker's `done`. So no frame ever waits in a ZeroMQ
queue where it could be lost unseen: it waits in the station's pending queue, where it is
counted, or sits in one worker's hands, where it is tracked until done.

When workers fall behind, frames pile up in the station's pending queue, bounded per camera
(`max_pending`). What happens at the bound is the camera's buffer policy:

* ``every`` (files, replay, synthetic): the producer blocks; nothing is dropped.
* ``newest`` (live cameras): the oldest pending frame of that camera is dropped. The drop is
  counted, logged and turned into a *drop notice* -- the frame's header with ``dropped`` set
  and no image -- which is delivered to a worker like a frame, so the cell it belonged to
  becomes a fail-safe reject downstream. Drops are never silent.

Frames travel several per message when several wait for the same worker (a burst, or a queue
that built up while workers had no credit), which spares both sides a send, a receive and the
ZeroMQ I/O threads' hand-offs per frame: in a burst (a frame within 0.5 ms of both the previous
frame and the last send) a frame waits for others, at most 8 going together and none waiting
more than 2.5 ms; a frame after a quiet spell goes at once.

Same host: a station keeps a shared-memory arena (`pouchline.station.arena`) and names it in
its heartbeats. A worker that can map it says so in its hello, and from then on gets each
frame as header plus a 24-byte reference instead of the bytes, which skips two kernel copies
and both ZeroMQ I/O threads per frame. Workers on other hosts, and frames the arena has no
room for, get the bytes inline; nothing else changes (credit, redelivery, drop notices). Such a
worker also connects to the station's local lane (`pouchline.station.lane`), and its frames by
reference then skip ZeroMQ altogether: a Unix socket packet written by the station's sending
thread and read by the worker's, with no I/O thread in between.

Liveness: both sides send heartbeats every ``heartbeat_s``; a peer silent for ``timeout_s``
is gone. The frames a gone worker held go back to the front of the pending queue and are
delivered again (at most ``max_redeliveries`` times, then they become drop notices); a
worker that restarts says hello with a new session and gets frames at once. A worker whose
station goes silent rebuilds its socket and says hello again, so a restarted station is
served without restarting anything else.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field

from pouchline.station.arena import ArenaReader, ArenaWriter, Region
from pouchline.station.curve import CurveClientConfig, CurveServerConfig, secure_client, secure_server
from pouchline.station.lane import (
    MAX_PACKET,
    Lane,
    LaneHub,
    connect_lane,
    lane_name,
    pack_parts,
    receive_packet,
    send_packet,
    unpack_parts,
)
from pouchline.station.protocol import (
    MAX_DONE_KEYS,
    Done,
    REFERENCE_MAGIC,
    Frame,
    FrameHeader,
    FrameRef,
    Heartbeat,
    Hello,
    ProtocolError,
    RejectCounter,
    decode,
    done_message,
    encode_control,
    encode_frame,
    split_batch,
)

log = logging.getLogger(__name__)

Key = tuple[str, str, int]
Policy = Literal["every", "newest"]
#: Payloads at least this large are sent without a copy (smaller ones are cheaper to copy
#: than to track until ZeroMQ lets go of them).
_ZERO_COPY_BYTES = 64 * 1024
#: Frames sent to one worker in one message when several wait (see `FrameServer._dispatch`).
_BATCH = 8
#: A batch stops growing once its inline payloads reach this: large frames over the socket
#: gain nothing from sharing a message, and a worker would wait for the whole message.
_BATCH_BYTES = 1 << 20
#: A frame submitted this soon after both the last send and the previous submit (a burst)
#: waits for more (up to `_BATCH`), so that bursts travel as batches; a frame after a quiet
#: spell goes at once.
_COALESCE_S = 0.0005
#: Plain-int flags: pyzmq's multipart helpers combine enum flags per part, which costs more
#: than the send itself for a batch's small parts.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
#: While capture threads submitted this recently and nothing waits for credit, they read the
#: socket themselves and the I/O thread leaves it alone (see `FrameServer._run`), looking in
#: every `_FLUSH_S` only to send the end of a burst that no further frame came to take along.
_SUBMITTERS_ACTIVE_S = 0.005
_FLUSH_S = 0.002


class TransportSettings(BaseModel):
    """Timing and bounds shared by stations and workers."""

    model_config = ConfigDict(extra="forbid")

    heartbeat_s: float = Field(0.5, gt=0, le=60, description="Interval between heartbeats, both ways.")
    timeout_s: float = Field(3.0, gt=0, le=600, description="A peer silent this long is gone.")
    max_pending: int = Field(64, ge=1, le=100_000, description="Frames per camera that may wait for a free worker.")
    max_redeliveries: int = Field(2, ge=0, le=100, description="Deliveries after the first before a frame is given up (and reported).")
    shutdown_grace_s: float = Field(2.0, ge=0, le=600, description="How long a closing station keeps delivering what it holds.")
    arena_mb: int = Field(
        128, ge=0, le=65536,
        description="Shared-memory arena (MiB) through which workers on the station's host get frame bytes "
        "without the socket; 0 sends every frame over the socket.",
    )


def _send_parts(socket: zmq.Socket, parts: list[Any], copy: bool = True) -> None:
    """``socket.send_multipart(parts, NOBLOCK, copy=copy)``, at half its cost for many parts."""
    send = socket.send
    for part in parts[:-1]:
        send(part, _MORE, copy=copy)
    send(parts[-1], _NOBLOCK, copy=copy)


def _recv_parts(socket: zmq.Socket) -> list[zmq.Frame]:
    """``socket.recv_multipart(NOBLOCK, copy=False)``, likewise; `zmq.Again` if nothing waits."""
    recv = socket.recv
    parts = [recv(_NOBLOCK, copy=False)]
    while parts[-1].more:
        parts.append(recv(_NOBLOCK, copy=False))
    return parts


@dataclass(slots=True)
class _Item:
    """A frame (or drop notice) the station is responsible for until a worker is done with it."""

    header: FrameHeader
    parts: list[Any]
    policy: Policy
    deliveries: int = 0
    region: Region | None = None  # the bytes' copy in the arena, for workers on this host

    @property
    def notice(self) -> bool:
        return self.header.dropped is not None

    def by_reference(self, tag: bytes) -> list[Any]:
        assert self.region is not None
        return [REFERENCE_MAGIC, self.parts[1], self.region.reference(tag)]


@dataclass
class _Worker:
    identity: bytes
    name: str
    session: str
    capacity: int
    last_seen: float
    local: bool = False  # has mapped the station's arena
    held: dict[Key, _Item] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.capacity - len(self.held)


class FrameServer:
    """The station's end: accepts frames from capture threads, deals them to workers."""

    def __init__(self, endpoint: str, *, station: str, settings: TransportSettings | None = None,
                 curve: CurveServerConfig | None = None) -> None:
        self.station = station
        self.settings = settings or TransportSettings()
        self.session = secrets.token_hex(4)
        self.rejected = RejectCounter()
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.SNDHWM, 100_000)  # credit bounds what is queued; never hit the HWM
        self._authenticator = secure_server(self._router, curve) if curve is not None else None
        self._router.bind(endpoint)
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._arena = self._open_arena()
        self._lanes = self._open_lanes()
        self._gone: deque[bytes] = deque(maxlen=LaneHub.MOST)  # workers whose lane broke: their late words are ignored
        self._lanes_readable: set[int] = set()  # lane descriptors the I/O thread's last wait saw readable
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pending: deque[_Item] = deque()
        self._workers: dict[bytes, _Worker] = {}
        self._closing = threading.Event()
        self._accepting = True
        self._stats: Counter[str] = Counter()
        self._per_camera: dict[str, Counter[str]] = {}
        # One lock over the socket and every table: a capture thread that finds a worker with
        # credit sends the frame itself (no hand-off to another thread on the hot path); the
        # I/O thread takes the lock for incoming messages, heartbeats and frames left waiting.
        self._lock = threading.RLock()
        # ``every`` frames of each camera submitted and not yet dealt (the pending bound), and
        # the producers waiting for room under it.
        self._undealt: Counter[str] = Counter()
        self._room = threading.Condition(self._lock)
        self._waiting_for_room = 0
        self._last_submit = 0.0
        self._last_send = 0.0
        self._io_wakes_at = 0.0  # when the I/O thread looks in next, at the latest
        self._thread = threading.Thread(target=self._run, name=f"frame-server-{station}", daemon=True)
        self._thread.start()

    def _open_arena(self) -> ArenaWriter | None:
        if not self.settings.arena_mb:
            return None
        try:
            return ArenaWriter(self.station, self.session, self.settings.arena_mb << 20)
        except OSError as error:
            log.warning("station %s: no shared-memory arena (%s); every frame goes over the socket", self.station, error)
            return None

    def _open_lanes(self) -> LaneHub | None:
        if self._arena is None:
            return None
        try:
            return LaneHub(lane_name(self.session))
        except OSError as error:
            log.info("station %s: no local lane (%s); frames by reference go over ZeroMQ", self.station, error)
            return None

    # -- capture side (any thread) ---------------------------------------------------------
    def submit(self, header: FrameHeader, payload: bytes | memoryview | np.ndarray, *, policy: Policy = "every",
               timeout_s: float | None = None, checked: bool = False) -> bool:
        """Hand one frame over. ``every``: blocks while the camera's pending queue is full
        (returns False only when ``timeout_s`` passes or the server closes); ``newest``: never
        blocks, the server drops (and reports) the camera's oldest pending frame instead.
        ``checked``: see `encode_frame`."""
        if not self._accepting:
            raise RuntimeError(f"frame server of station {self.station!r} is closed")
        item = _Item(header, encode_frame(header, payload, checked=checked), policy)
        with self._lock:
            if policy == "every" and not self._wait_for_room(header.camera, timeout_s):
                return False
            now = time.monotonic()
            burst = now - self._last_submit < _COALESCE_S and now - self._last_send < _COALESCE_S
            self._last_submit = now
            self._accept(item)
            if not burst or len(self._pending) >= _BATCH:
                # The socket's FD is edge-triggered: a send on it may have taken the I/O
                # thread's wake-up for a `done`, so after one this thread reads the socket
                # (lanes it reads always), and credit that comes back is used here (else
                # frames could wait for it until the next heartbeat).
                if self._receive(socket=self._dispatch()) and self._pending:
                    self._dispatch()
            elif self._io_wakes_at > now + _FLUSH_S:  # held back, and the I/O thread sleeps long: wake it
                os.write(self._wake_w, b"\0")
        return True

    def _wait_for_room(self, camera: str, timeout_s: float | None) -> bool:
        """Under the lock: take a place in the camera's pending bound, waiting while it is full;
        False when ``timeout_s`` passes or the server closes first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._undealt[camera] >= self.settings.max_pending:
            if self._closing.is_set() or (deadline is not None and time.monotonic() > deadline):
                return False
            self._waiting_for_room += 1
            try:
                self._room.wait(0.1)
            finally:
                self._waiting_for_room -= 1
        self._undealt[camera] += 1
        return True

    def stats(self) -> dict[str, Any]:
        """A snapshot for the status endpoint: counts, queues, workers, malformed messages."""
        now = time.monotonic()
        with self._lock:
            counts = dict(self._stats)
            cameras = {camera: dict(counts) for camera, counts in self._per_camera.items()}
            workers = [{"name": w.name, "session": w.session, "capacity": w.capacity, "held": len(w.held), "local": w.local,
                        "silent_s": round(now - w.last_seen, 3)} for w in self._workers.values()]
            pending = len(self._pending)
        return {
            "station": self.station, "session": self.session, "endpoint": self.endpoint,
            **counts, "pending": pending,
            "in_flight": sum(w["held"] for w in workers), "workers": workers, "cameras": cameras,
            "malformed": self.rejected.counts,
        }

    def close(self, grace_s: float | None = None) -> dict[str, Any]:
        """Stop accepting frames, deliver what is held for up to ``grace_s``, then report
        (and log) anything still undelivered; returns the final stats."""
        self._accepting = False
        self._grace_until = time.monotonic() + (self.settings.shutdown_grace_s if grace_s is None else grace_s)
        self._closing.set()
        os.write(self._wake_w, b"\0")
        self._thread.join()
        if self._authenticator is not None:
            self._authenticator.stop()
        self._router.close(linger=0)
        self._context.term()
        if self._lanes is not None:
            self._lanes.close_all()
        if self._arena is not None:
            self._arena.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        return self.stats()

    # -- the I/O thread: incoming messages, heartbeats, frames that waited for credit ---------
    def _run(self) -> None:
        # Waits on the socket's file descriptor outside the lock (a zmq poll would touch the
        # socket while a capture thread sends on it); the descriptor is edge-triggered, so
        # every turn drains the socket completely under the lock.
        #
        # While capture threads are submitting and no frame waits for credit, they drain the
        # socket on every submit; waking here for each incoming `done` would only make this
        # thread fight them for the GIL and the lock (measured: half the station's CPU per
        # frame at saturation). The thread then only looks in every 2 ms, for the end of a
        # burst held back for a batch (and is woken if it sleeps longer when one is held back).
        descriptor = self._router.getsockopt(zmq.FD)
        next_beat = time.monotonic()
        while True:
            with self._lock:
                now = time.monotonic()
                if self._closing.is_set() and (now > self._grace_until or self._idle()):
                    break
                self._receive()
                self._serve_lanes()
                if now >= next_beat:
                    self._expire(now)
                    self._beat()
                    next_beat = now + self.settings.heartbeat_s
                self._dispatch()
                self._receive()
                wait = max(0.0, min(next_beat - now, 0.1))
                watch = [self._wake_r]
                # Named lanes bring `done` packets, which capture threads read while they submit.
                watching = bool(self._pending) or now - self._last_submit > _SUBMITTERS_ACTIVE_S
                watch += [descriptor] if watching else []
                watch += [] if self._lanes is None else self._lanes.descriptors(named=watching)
                if not watching:
                    wait = min(wait, _FLUSH_S)
                if self._pending and self._pick(self._pending[0].notice) is not None:  # held back for a batch
                    wait = min(wait, _COALESCE_S)
                self._io_wakes_at = now + wait
            readable = select.select(watch, [], [], wait)[0]
            self._lanes_readable = set(readable) - {self._wake_r, descriptor}
            self._drain_wake()
        with self._lock:
            self._report_undelivered()

    def _idle(self) -> bool:
        return not self._pending and not any(w.held for w in self._workers.values())

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _count(self, name: str, camera: str | None = None, n: int = 1) -> None:
        self._stats[name] += n
        if camera is not None:
            counts = self._per_camera.get(camera)
            if counts is None:
                counts = self._per_camera[camera] = Counter()
            counts[name] += n

    def _accept(self, item: _Item) -> None:
        self._pending.append(item)
        self._count("submitted", item.header.camera)
        if item.policy == "newest":
            self._bound(item.header.camera)

    def _bound(self, camera: str) -> None:
        """Newest policy: past the bound, the camera's oldest waiting frame becomes a notice."""
        if len(self._pending) <= self.settings.max_pending:
            return  # the usual case: no camera can be over its bound, so no scan
        waiting = [i for i, item in enumerate(self._pending) if item.header.camera == camera and not item.notice]
        if len(waiting) > self.settings.max_pending:
            index = waiting[0]
            item = self._pending[index]
            self._pending[index] = self._drop_notice(item, "queue_full")
            self._count("dropped_queue_full", camera)
            if self._stats["dropped_queue_full"] == 1:
                log.warning("station %s: workers are behind; dropping the oldest frames of camera %s "
                            "(each becomes a fail-safe reject)", self.station, camera)

    def _receive(self, socket: bool = True) -> bool:
        """Handle every message waiting on the lanes and (with ``socket``) the socket; True if there were any."""
        took = False
        for identity in [] if self._lanes is None else self._lanes.ready():
            took = True
            self._drain_lane(identity)
        while socket and self._router.getsockopt(_EVENTS) & _POLLIN:  # cheaper than raising zmq.Again at the end
            try:
                identity, *parts = _recv_parts(self._router)
            except zmq.Again:
                break
            took = True
            try:
                message = decode(parts)
            except ProtocolError as error:
                self.rejected.record(error)
                continue
            self._handle(identity.bytes, message)
        return took

    def _handle(self, identity: bytes, message: object) -> None:
        now = time.monotonic()
        if isinstance(message, Hello | Heartbeat) and identity in self._gone:
            self._count("heard_from_gone")  # sent before its lane broke: it must not bring the worker back
        elif isinstance(message, Hello | Heartbeat):
            name = message.worker if isinstance(message, Hello) else message.sender
            worker = self._workers.get(identity)
            if worker is None or worker.session != message.session:
                worker = self._register(identity, name, message.session, message.capacity, now)
            worker.last_seen = now
            if isinstance(message, Hello):
                self._set_local(worker, self._arena is not None and message.arena == self._arena.name)
        elif isinstance(message, Done):
            worker = self._workers.get(identity)
            if worker is not None:
                worker.last_seen = now
            self._finish(message.keys, worker)  # type: ignore[arg-type]
        else:
            self.rejected.record(ProtocolError("unexpected", f"a worker sent a {type(message).__name__} message"))

    def _register(self, identity: bytes, name: str, session: str, capacity: int, now: float) -> _Worker:
        """A new worker, or one that restarted: whatever an earlier session held is lost with it."""
        for old_identity, old in list(self._workers.items()):
            if old_identity == identity or (old.name == name and old.session != session):
                self._forget(old_identity, "restarted")
        worker = self._workers[identity] = _Worker(identity, name, session, capacity, now)
        self._count("workers_joined")
        log.info("station %s: worker %s (session %s) joined with capacity %d", self.station, name, session, capacity)
        self._send(identity, self._heartbeat())  # at once, so it learns about the arena without waiting a beat
        return worker

    def _set_local(self, worker: _Worker, local: bool) -> None:
        if worker.local != local:
            worker.local = local
            log.info("station %s: worker %s %s the shared-memory arena", self.station, worker.name,
                     "maps" if local else "does not map")

    def _heartbeat(self) -> list[Any]:
        arena = None if self._arena is None else self._arena.name
        lane = None if self._lanes is None else self._lanes.name
        return encode_control(Heartbeat(type="heartbeat", sender=self.station, session=self.session, busy=0,
                                        capacity=0, arena=arena, lane=lane))

    def _release(self, *items: _Item) -> None:
        """The station is done with the frames' bytes in the arena (freed under one lock)."""
        regions = [item.region for item in items if item.region is not None]
        if regions and self._arena is not None:
            self._arena.free(*regions)
            for item in items:
                item.region = None

    def _drop_notice(self, item: _Item, reason: str) -> _Item:
        self._release(item)
        header = item.header.model_copy(update={"dropped": reason, "nbytes": 0})
        return _Item(header, encode_frame(header, b""), item.policy, item.deliveries)

    def _finish(self, keys: Sequence[Key], sender: _Worker | None) -> None:
        """A worker is done with these frames: their credit and arena space come back."""
        finished = []
        for key in keys:
            # The sender holds it, unless it reconnected under a new identity since it took it.
            item = None if sender is None else sender.held.pop(key, None)
            for worker in () if item is not None else self._workers.values():
                item = worker.held.pop(key, None)
                if item is not None:
                    break
            if item is None:
                self._count("done_unknown")  # from before a restart, or a duplicate after redelivery
                continue
            finished.append(item)
            self._count("notices_done" if item.notice else "done", key[1])
        self._release(*finished)

    def _forget(self, identity: bytes, why: str) -> None:
        worker = self._workers.pop(identity)
        self._set_local(worker, False)
        self._close_lane(identity, f"closed with its worker ({why})")
        if worker.held:
            log.warning("station %s: worker %s %s holding %d frames; delivering them again",
                        self.station, worker.name, why, len(worker.held))
        for item in reversed(list(worker.held.values())):
            if item.deliveries > self.settings.max_redeliveries and not item.notice:
                item = self._drop_notice(item, "redelivery_limit")
                self._count("dropped_redelivery_limit", item.header.camera)
            self._pending.appendleft(item)
            self._count("redelivered", item.header.camera)
        self._count(f"workers_{why}")

    def _expire(self, now: float) -> None:
        for identity, worker in list(self._workers.items()):
            if now - worker.last_seen > self.settings.timeout_s:
                self._forget(identity, "timed_out")

    def _beat(self) -> None:
        beat = self._heartbeat()
        for identity in list(self._workers):
            self._send(identity, beat)

    def _send(self, identity: bytes, parts: list[Any], copy: bool = True) -> bool:
        """``copy=False`` for messages carrying large payloads (see `_ZERO_COPY_BYTES`)."""
        try:
            _send_parts(self._router, [identity, *parts], copy=copy)
            return True
        except zmq.ZMQError as error:  # EHOSTUNREACH (gone) or EAGAIN (its pipe is full)
            if identity in self._workers:
                self._forget(identity, "unreachable")
            log.debug("send to %r failed: %s", identity, error)
            return False

    def _pick(self, notice: bool) -> _Worker | None:
        """The least loaded worker with free credit (notices need no credit, just a worker)."""
        best = max(self._workers.values(), key=lambda w: w.free, default=None)
        if best is None or (best.free <= 0 and not notice):
            return None
        return best

    def _dispatch(self) -> bool:
        """Deal waiting frames to the least loaded workers with credit, up to `_BATCH` per
        message: one message per frame would cost both sides a send, a receive and two
        ZeroMQ I/O-thread hand-offs per frame, which at saturation is most of their CPU.
        Frames by reference to a worker with a lane go as one lane packet instead.
        True if anything went over the socket."""
        over_socket = False
        while self._pending:
            worker = self._pick(self._pending[0].notice)
            if worker is None:
                break
            lane = worker.local and self._lanes is not None and self._lanes.has(worker.identity)
            room, inline, big, batch, parts, lane_parts = worker.free, 0, False, [], [], []
            while self._pending and len(batch) < _BATCH and (room > 0 or self._pending[0].notice) and inline < _BATCH_BYTES:
                item = self._pending.popleft()
                room -= not item.notice
                if item.deliveries == 0 and item.policy == "every":
                    self._undealt[item.header.camera] -= 1  # its place in the pending bound is free
                    if self._waiting_for_room:
                        self._room.notify_all()
                item.deliveries += 1
                worker.held[item.header.key] = item
                if worker.local and self._by_reference(item):
                    (lane_parts if lane else parts).extend(item.by_reference(self._arena.tag))
                else:
                    parts += item.parts
                    inline += item.header.nbytes
                    big = big or item.header.nbytes >= _ZERO_COPY_BYTES
                batch.append(item)
            self._last_send = time.monotonic()
            if lane_parts and not self._send_lane(worker.identity, lane_parts):
                if worker.identity not in self._workers:
                    continue  # the lane broke and took the worker with it: these frames wait in the queue again
                parts = lane_parts + parts  # the lane could not take them: ZeroMQ does
            over_socket = over_socket or bool(parts)
            if not parts or self._send(worker.identity, parts, copy=not big):
                for item in batch:
                    self._count("notices_sent" if item.notice else "sent", item.header.camera)
        return over_socket

    def _by_reference(self, item: _Item) -> bool:
        """Whether the frame can go by reference, copying it into the arena on its first
        delivery to a worker on this host. The copy waits until then (not at submit), so the
        arena holds only frames in workers' hands: few enough to stay in the CPU's caches
        while the ring turns, and raw frames that pile up in the queue never fill it."""
        if item.region is None and self._arena is not None and not item.notice:
            item.region = self._arena.put(item.parts[2])  # None when full: the frame goes inline
        return item.region is not None

    # -- local lanes (see `pouchline.station.lane`) ------------------------------------------
    def _send_lane(self, identity: bytes, parts: list[Any]) -> bool:
        """One lane packet to the worker; False when the frames must go another way: over
        ZeroMQ, or back to the queue if the lane broke (its worker is then gone, `_lose_lane`)."""
        assert self._lanes is not None
        packet = pack_parts(parts)
        why = "full" if len(packet) > MAX_PACKET else self._lanes.send(identity, packet)
        if why is None:
            self._count("sent_by_lane", n=len(parts) // 3)
            return True
        if why != "full":
            self._lose_lane(identity, why)
        return False

    def _serve_lanes(self) -> None:
        """Accept lanes and learn whose each is, for descriptors the I/O thread's last wait found readable."""
        readable, self._lanes_readable = self._lanes_readable, set()
        if readable and self._lanes is not None:
            for event, count in self._lanes.serve(readable).items():
                self._count(event, n=count)

    def _drain_lane(self, identity: bytes) -> None:
        """The worker's `done` packets; anything else is refused and counted like a malformed
        message. A lane that ended (the worker hung up, or it broke) is lost."""
        assert self._lanes is not None
        packets, ended = self._lanes.receive(identity)
        for packet in packets:
            try:
                message = decode(unpack_parts(packet))
            except ProtocolError as error:
                self.rejected.record(error)
                continue
            if isinstance(message, Done):
                self._count("done_by_lane", n=len(message.keys))
                self._handle(identity, message)
            else:
                self.rejected.record(ProtocolError("unexpected", f"worker {identity!r} sent a {type(message).__name__} "
                                                                 "message on its lane"))
        if ended is not None:
            self._lose_lane(identity, ended)

    def _lose_lane(self, identity: bytes, why: str) -> None:
        """A lane broke: its worker died, or frames in it may have been lost unseen. Either way
        the worker is gone (what it held is delivered again; a frame it did take becomes a
        duplicate, which downstream counts), and words it sent before are ignored. A live worker
        whose lane broke joins again under a new session, as after a restart."""
        self._close_lane(identity, why)
        self._gone.append(identity)
        if identity in self._workers:
            self._forget(identity, "lost_lane")

    def _close_lane(self, identity: bytes, why: str) -> None:
        if self._lanes is not None and self._lanes.close(identity):
            self._count("lanes_closed")
            log.info("station %s: lane of worker %r %s", self.station, identity, why)

    def _report_undelivered(self) -> None:
        left = len(self._pending) + sum(len(w.held) for w in self._workers.values())
        if left:
            self._count("undelivered_at_shutdown", n=left)
            log.error("station %s closed with %d frames undelivered (no worker took them in time)", self.station, left)


@dataclass
class _Link:
    """One worker-side connection to one station."""

    endpoint: str
    socket: zmq.Socket
    session: str
    station_session: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    next_beat: float = 0.0
    arena: ArenaReader | None = None  # the station's shared memory, when it is on this host
    arena_tried: str | None = None  # the arena name last tried (not retried every heartbeat)
    lane: Lane | None = None  # the station's local lane, once the arena is mapped

    @property
    def identity(self) -> bytes:
        """This connection's ZeroMQ routing identity, which also names its lane."""
        return self.socket.getsockopt(zmq.ROUTING_ID)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.drop_lane()
        if self.arena is not None:
            self.arena.close()

    def drop_lane(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None

    def has_input(self) -> bool:
        """Whether something waits unread on the socket or the lane (a closed lane reads as
        input: its end). A link with unread input is not silent, however long since it was
        last read: reading it tells why (a heartbeat, or the station's lane closing as it
        exited), which a reconnect for silence would hide."""
        if self.socket.getsockopt(_EVENTS) & _POLLIN:
            return True
        return self.lane is not None and bool(select.select([self.lane], [], [], 0)[0])


class FrameClient:
    """The worker's end: connects to stations, receives validated frames, returns credit.

    Single-threaded: the worker loop calls `receive` and `done`; heartbeats and reconnects
    happen inside `receive`, so a worker must call it at least every ``heartbeat_s``.

    ``shared_memory``: map the arena of a station on this host (frames skip the socket).
    ``zero_copy``: frames from the arena are not copied out; their payload is valid only until
    `done` for them (`Frame.image` and `Frame.verify` refuse bytes the station reused). For
    workers that finish with a frame before they say done, as inspection workers do.
    """

    def __init__(self, endpoints: list[str], *, name: str, capacity: int = 4, settings: TransportSettings | None = None,
                 curve: CurveClientConfig | None = None, shared_memory: bool = True, zero_copy: bool = False) -> None:
        if not endpoints:
            raise ValueError("a frame client needs at least one station endpoint")
        self.name = name
        self.capacity = capacity
        self.shared_memory = shared_memory
        self.zero_copy = zero_copy
        self.settings = settings or TransportSettings()
        self.curve = curve
        self.rejected = RejectCounter()
        #: Refused frames that named themselves (answered with done); the worker drains this.
        self.refused: deque[ProtocolError] = deque(maxlen=4096)
        self.stats: Counter[str] = Counter()
        self._context = zmq.Context()
        self._links = [self._connect(endpoint) for endpoint in endpoints]
        self._origin: dict[Key, _Link] = {}
        self._ready: deque[Frame] = deque()  # received and valid, not yet handed out
        self._poller = self._make_poller()

    def _connect(self, endpoint: str) -> _Link:
        session = secrets.token_hex(4)
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        socket.setsockopt(zmq.ROUTING_ID, f"{self.name}.{session}".encode())
        if self.curve is not None:
            secure_client(socket, self.curve)
        socket.connect(endpoint)
        link = _Link(endpoint, socket, session)
        self._hello(link)
        return link

    def _hello(self, link: _Link) -> None:
        arena = None if link.arena is None else link.arena.name
        self._say(link, Hello(type="hello", worker=self.name, session=link.session, capacity=self.capacity, arena=arena))

    def _attach(self, link: _Link, beat: Heartbeat) -> bool:
        """Map the station's arena if it is on this host (a new station session brings a new one);
        True when a new arena was mapped, which the station must hear about."""
        if link.arena is not None and link.arena.name != beat.arena:
            link.arena.close()
            link.arena = None
            link.drop_lane()
        if not self.shared_memory or beat.arena is None or beat.arena == link.arena_tried:
            return False
        link.arena_tried = beat.arena
        try:
            link.arena = ArenaReader(beat.arena, beat.session)
        except (OSError, ValueError) as error:  # another host (or another /dev/shm): frames come inline
            log.info("worker %s: station arena %s not mapped (%s); frames come over the socket", self.name,
                     beat.arena, error)
            return False
        self.stats["arena_attached"] += 1
        if beat.lane is not None:
            self._join_lane(link, beat.lane)
        return True

    def _join_lane(self, link: _Link, name: str) -> None:
        """Connect to the station's local lane (before saying hello with the arena, so the
        station knows the lane by the time it sends frames by reference)."""
        try:
            link.lane = connect_lane(name, link.identity)
        except OSError as error:
            log.info("worker %s: station lane %s not joined (%s); frames come over ZeroMQ", self.name, name, error)
            return
        self.stats["lane_joined"] += 1
        self._poller = self._make_poller()

    def _make_poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for link in self._links:
            poller.register(link.socket, zmq.POLLIN)
            if link.lane is not None:
                poller.register(link.lane, zmq.POLLIN)
        return poller

    def _say(self, link: _Link, message: Hello | Heartbeat | Done) -> None:
        parts = encode_control(message)
        if link.lane is not None and isinstance(message, Done):
            if self._send_lane(link, parts):
                return
            if link not in self._links:
                return  # the lane broke and the link started over: this credit is moot
        try:
            _send_parts(link.socket, parts)
        except zmq.Again:
            self.stats["control_not_sent"] += 1  # the station is unreachable; the next beat retries

    def _send_lane(self, link: _Link, parts: list[bytes]) -> bool:
        """A `done` as a lane packet; False when it must go another way: over ZeroMQ, or
        nowhere if the lane broke (the link then starts over, `_lose_lane`)."""
        assert link.lane is not None
        why = send_packet(link.lane, pack_parts(parts))
        if why is not None and why != "full":
            self._lose_lane(link)
        return why is None

    def _lose_lane(self, link: _Link) -> None:
        """The lane closed: the station exited, or the lane broke and frames in it may be lost.
        In the second case the station, which cannot tell it from this worker's death, delivers
        again what this link held; in both the link starts over as a new session, so the
        station (the same or a new one) sees a restarted worker and not a ghost."""
        log.warning("worker %s: lane to the station at %s closed (the station exited, or the lane broke); "
                    "joining again under a new session", self.name, link.endpoint)
        self.stats["lane_closed"] += 1
        self._start_over(link)

    def _start_over(self, link: _Link) -> None:
        """Close the link and connect again under a new session."""
        link.close()
        self._links[self._links.index(link)] = self._connect(link.endpoint)
        self._poller = self._make_poller()

    def receive(self, timeout_s: float) -> Frame | None:
        """The next valid frame (or drop notice) from any station, or None after ``timeout_s``."""
        if self._ready:
            return self._ready.popleft()
        deadline = time.monotonic() + timeout_s
        woken = False
        while True:
            if not woken:  # after a wake-up by a message, read it first: housekeeping can wait a turn
                self._housekeep()
            if self._read_any():
                return self._ready.popleft()
            now = time.monotonic()
            if now >= deadline:
                return None
            woken = bool(self._poller.poll(max(0.0, min(deadline - now, self.settings.heartbeat_s)) * 1000))

    def receive_batch(self, max_frames: int, timeout_s: float) -> list[Frame]:
        """Up to ``max_frames`` frames: waits up to ``timeout_s`` for the first, then takes
        only what has already arrived (a micro-batching worker's read)."""
        first = self.receive(timeout_s)
        if first is None:
            return []
        batch = [first]
        while len(batch) < max_frames and (self._ready or self._read_any()):
            batch.append(self._ready.popleft())
        return batch

    def _read_any(self) -> bool:
        """Read the links until frames are ready; False if none came."""
        return any(self._read(link) for link in self._links)

    def _read(self, link: _Link) -> bool:
        """Take what waits on the link's lane, then messages from its socket until one brings
        frames (into `_ready`); True if any did."""
        if link.lane is not None:
            if not self._read_lane(link):  # the lane broke and the link started over
                return bool(self._ready)
            if self._ready:
                return True
        while link.socket.getsockopt(_EVENTS) & _POLLIN:
            try:
                parts = _recv_parts(link.socket)
            except zmq.Again:
                return False
            for message_parts in split_batch(parts):
                self._take(link, message_parts)
            if self._ready:
                return True
        return False

    def _read_lane(self, link: _Link) -> bool:
        """Packets waiting on the link's lane until one brings frames (into `_ready`): frames
        by reference, refused and counted like any malformed message if they are anything
        else; False if the lane broke."""
        assert link.lane is not None
        while True:
            try:
                packet = receive_packet(link.lane)
            except OSError:
                packet = b""
            if packet is None:
                return True
            if not packet:
                self._lose_lane(link)
                return False
            try:
                messages = split_batch(unpack_parts(packet))
            except ProtocolError as error:
                self.rejected.record(error)
                continue
            for parts in messages:
                if parts[0] == REFERENCE_MAGIC:
                    self._take(link, parts)
                else:
                    self.rejected.record(ProtocolError("unexpected", "a lane packet held a message that is not a "
                                                                     "frame by reference"))
            if self._ready:
                return True

    def _take(self, link: _Link, parts: Sequence[object]) -> None:
        """Decode one message (or one frame of a batch) and act on it."""
        try:
            message = decode(parts)
            if isinstance(message, FrameRef):
                message = self._resolve(link, message)
        except ProtocolError as error:
            self.rejected.record(error)
            self._answer(link, error)
            return
        link.last_seen = time.monotonic()
        if isinstance(message, Frame):
            self._origin[message.header.key] = link
            self.stats["notices" if message.header.dropped else "frames"] += 1
            self._ready.append(message)
        elif isinstance(message, Heartbeat):
            restarted = link.station_session not in (None, message.session)
            link.station_session = message.session
            if restarted:
                self.stats["station_restarts"] += 1  # a new station process: say hello again
            if self._attach(link, message) or restarted:
                self._hello(link)
        else:
            self.rejected.record(ProtocolError("unexpected", f"a station sent a {type(message).__name__} message"))

    def _resolve(self, link: _Link, ref: FrameRef) -> Frame:
        if link.arena is None:
            raise ProtocolError("arena_invalid", f"frame {ref.header.key} came by reference, but no arena of its "
                                                 "station is mapped here", ref.salvage())
        return ref.resolve(link.arena, zero_copy=self.zero_copy)

    def _answer(self, link: _Link, error: ProtocolError) -> None:
        """A refused frame that still names itself is answered: its credit goes back at once and
        it waits in `refused` for the worker to turn its cell into a fail-safe reject. (A stale
        arena frame is not: the station already counts it as lost with a dead worker and redelivers it.)"""
        fields = error.salvage or {}
        if error.kind == "arena_stale" or not {"station", "camera", "seq"} <= fields.keys():
            return
        self._say(link, done_message([(fields["station"], fields["camera"], fields["seq"])]))
        self.refused.append(error)
        self.stats["refused_answered"] += 1

    def _housekeep(self) -> None:
        now = time.monotonic()
        for index, link in enumerate(self._links):
            if now - link.last_seen > self.settings.timeout_s and not link.has_input():
                log.warning("worker %s: station at %s silent for %.1f s; reconnecting", self.name, link.endpoint,
                            now - link.last_seen)
                self.stats["reconnects"] += 1
                self._start_over(link)
                link = self._links[index]
            if now >= link.next_beat:
                busy = sum(1 for origin in self._origin.values() if origin is link)
                self._say(link, Heartbeat(type="heartbeat", sender=self.name, session=link.session, busy=busy,
                                          capacity=self.capacity))
                link.next_beat = now + self.settings.heartbeat_s

    @property
    def held(self) -> int:
        """Frames received and not yet done."""
        return len(self._origin)

    def done(self, *keys: Key) -> None:
        """These frames are handled (verdicts sent, or recorded): their credit goes back to
        their stations, in one message per station."""
        by_link: dict[int, tuple[_Link, list[Key]]] = {}
        for key in keys:
            link = self._origin.pop(key, None)
            if link is None:
                raise KeyError(f"frame {key} was not received by this client or is already done")
            by_link.setdefault(id(link), (link, []))[1].append(key)
        for link, done in by_link.values():
            if link in self._links:
                for start in range(0, len(done), MAX_DONE_KEYS):
                    self._say(link, done_message(done[start : start + MAX_DONE_KEYS]))
        self.stats["done"] += len(keys)

    def close(self) -> None:
        for link in self._links:
            link.close()
        self._context.term()

