"""Shared-memory arena: frame bytes for workers on the station's own host skip the socket.

Over TCP every frame is copied into the kernel by the station, out again by the worker and
handled by both sides' ZeroMQ I/O threads; on one 2-core machine that costs more than the
rest of the pipeline together. A station therefore writes each frame once into an arena (a
file in ``/dev/shm``, mapped by both processes) and sends a worker on the same host only a
24-byte reference next to the usual header. Workers elsewhere, and any frame the arena has
no room for, get the bytes inline as before: the arena is a fast path, never a requirement.

Safety, since a region is reused once its frame is done:

* the station frees a region only when a worker is done with its frame (or the frame turns
  into a drop notice), and stamps the region's generation to 0 *before* the space can be
  handed out again;
* a worker reads the bytes in place and checks the region's generation before and after
  using them (a sequence lock; `Frame.image` and `Frame.verify` do the second look): a region
  reused under a worker presumed dead is refused (``arena_stale``), never read as some other
  cell's image;
* a reference names the arena's tag, so a restarted station's references are never looked
  up in its predecessor's arena;
* the worker maps the file read-only and bounds-checks every reference.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pouchline.station.protocol import ProtocolError

#: Arena file header: magic, total size, tag (the station session, 8 ASCII bytes).
_FILE_HEADER = struct.Struct("<4sQ8s")
_FILE_MAGIC = b"PLA1"
_DATA_START = 64
#: Region header: generation (0 = free) and payload length.
_REGION = struct.Struct("<QQ")
_ALIGN = 64
#: The ring wraps within this many bytes while they suffice; the rest of the arena takes bursts
#: and large raw frames. Within it, the ring turns as soon as its start holds what is live, so
#: it spans about twice the frames in flight. Measured (one 400 kB JPEG per frame, `bench
#: transport` saturation): the copy costs ~47 µs when the ring sweeps the 32 MiB before turning,
#: ~26 µs when it turns early (a few MiB, still in the CPU's caches).
_HOT_BYTES = 32 << 20
#: A frame-by-reference message's part 2: offset, generation, arena tag.
REFERENCE = struct.Struct("<QQ8s")


def _tag(session: str) -> bytes:
    """An arena's tag: the station session's first 8 characters, in every reference."""
    return session.encode("ascii")[:8].ljust(8, b"_")


def arena_dir() -> Path:
    """Where arenas live: RAM-backed ``/dev/shm`` where it exists."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@dataclass(slots=True)
class Region:
    """One frame's bytes in the arena, from allocation until the frame is finished."""

    offset: int
    end: int
    generation: int
    nbytes: int
    freed: bool = False

    def reference(self, tag: bytes) -> bytes:
        """Part 2 of a frame-by-reference message."""
        return REFERENCE.pack(self.offset, self.generation, tag)


class ArenaWriter:
    """The station's arena: a ring of regions, allocated in order and freed in any order."""

    def __init__(self, station: str, session: str, size: int) -> None:
        if size < _DATA_START + 4 * _ALIGN:
            raise ValueError(f"arena of {size} bytes is too small")
        self.tag = _tag(session)
        self.name = f"pouchline-{station}-{session}-{os.getpid()}"
        self.path = arena_dir() / self.name
        remove_stale(station)
        self.size = size
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserved now, so a small /dev/shm (a container's 64 MiB) fails here, cleanly,
            # instead of a write past its end killing the station with SIGBUS later.
            os.posix_fallocate(fd, 0, size)
            # Populated now: a ring that first sweeps fresh pages pays a page fault per 4 KiB.
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        _FILE_HEADER.pack_into(self._map, 0, _FILE_MAGIC, size, self.tag)
        self._live: deque[Region] = deque()
        self._generation = 0
        self._lock = threading.Lock()

    def put(self, payload: memoryview) -> Region | None:
        """Copy a frame in; None when the arena has no room (the frame then travels inline)."""
        need = -(-(_REGION.size + len(payload)) // _ALIGN) * _ALIGN
        with self._lock:
            offset = self._free_offset(need)
            if offset is None:
                return None
            self._generation += 1
            region = Region(offset, offset + need, self._generation, len(payload))
            self._live.append(region)
        # The region is this thread's alone until it is freed: copy outside the lock.
        start = offset + _REGION.size
        self._map[start : start + len(payload)] = payload
        _REGION.pack_into(self._map, offset, region.generation, region.nbytes)
        return region

    def _free_offset(self, need: int) -> int | None:
        if not self._live:
            return _DATA_START if _DATA_START + need <= self.size else None
        oldest, newest = self._live[0], self._live[-1]
        if newest.offset >= oldest.offset:  # live regions do not wrap: room after newest, then before oldest
            room_before, live_span = oldest.offset - _DATA_START, newest.end - oldest.offset
            if need + live_span <= room_before:
                return _DATA_START  # turn early: the ring stays small and its lines cached
            if newest.end + need <= min(self.size, _HOT_BYTES):
                return newest.end
            # Wrap early only into room as large as what is live (else the ring would jam at
            # once and frames go inline); large frames spill past the hot part instead.
            if need <= room_before and (room_before >= live_span or newest.end + need > self.size):
                return _DATA_START
            return newest.end if newest.end + need <= self.size else None
        return newest.end if newest.end + need <= oldest.offset else None  # wrapped: room between them

    def free(self, *regions: Region) -> None:
        """The frames are finished: stamp their regions stale, give the space back once it is the oldest."""
        with self._lock:
            for region in regions:
                if not region.freed:
                    region.freed = True
                    _REGION.pack_into(self._map, region.offset, 0, 0)
            while self._live and self._live[0].freed:
                self._live.popleft()

    def close(self) -> None:
        """Unmap and remove the file (workers keep their mappings until they let go)."""
        self._map.close()
        self.path.unlink(missing_ok=True)


def remove_stale(station: str) -> list[Path]:
    """Remove arenas a killed process of this station left behind (its pid is gone); returns them."""
    removed = []
    for path in arena_dir().glob(f"pouchline-{station}-*-*"):
        pid = path.name.rsplit("-", 1)[1]
        if not pid.isdigit() or path.name.count("-") != station.count("-") + 3:
            continue  # another station whose name merely starts like this one's
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except PermissionError:
            pass  # alive, another user's
    return removed


class ArenaReader:
    """A worker's read-only view of one station's arena."""

    def __init__(self, name: str, tag: str) -> None:
        if "/" in name or not name.startswith("pouchline-"):
            raise ValueError(f"arena name {name!r} is not a pouchline arena")
        path = arena_dir() / name
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < _DATA_START:
                raise ValueError(f"{path}: {size} bytes is too small for an arena")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        magic, stated, file_tag = _FILE_HEADER.unpack_from(self._map, 0)
        expected = _tag(tag)
        if magic != _FILE_MAGIC or stated != size or file_tag != expected:
            self._map.close()
            raise ValueError(f"{path} is not the arena of station session {tag!r}")
        self.name, self.tag, self.size = name, expected, size
        self._view = memoryview(self._map)

    def view(self, reference: memoryview, nbytes: int, what: str) -> tuple[memoryview, Callable[[], None]]:
        """The referenced frame's bytes, in place (no copy), and a check that they are still
        that frame's: call it after reading them (a sequence lock's second look)."""
        if len(reference) != REFERENCE.size:
            raise ProtocolError("arena_invalid", f"{what}: reference is {len(reference)} bytes, not {REFERENCE.size}")
        offset, generation, tag = REFERENCE.unpack(reference)
        if tag != self.tag:
            raise ProtocolError("arena_invalid", f"{what}: reference to arena {tag!r}, this link maps {self.tag!r}")
        start = offset + _REGION.size
        if offset < _DATA_START or offset % _ALIGN or start + nbytes > self.size or generation == 0:
            raise ProtocolError("arena_invalid", f"{what}: reference offset {offset} + {nbytes} bytes (generation "
                                                 f"{generation}) lies outside the {self.size}-byte arena")
        expected = (generation, nbytes)

        def lease() -> None:
            stamped = _REGION.unpack_from(self._map, offset)
            if stamped != expected:
                raise ProtocolError("arena_stale", f"{what}: arena region at {offset} was reused (generation "
                                                   f"{stamped[0]}, expected {generation}); the station redelivers it")

        lease()
        return self._view[start : start + nbytes], lease

    def close(self) -> None:
        """Let go of the mapping; frames still viewing it keep it alive until they are gone."""
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass  # a frame's payload still views it: the mapping goes when the last view does
