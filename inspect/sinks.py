"""Where cell verdicts go: the line controller (acknowledged, resent until stored) and files.

`ControllerLink` is the collector's end of the verdict link: a DEALER that sends each cell
verdict and keeps it until the controller acknowledges it (the controller stores first,
then acks), resending after ``ack_timeout_s``. The controller recognises duplicates by cell
id, so a resend after a lost ack costs nothing. `VerdictReceiver` is the controller's end
(and a test or benchmark sink's). `JsonlSink` appends verdicts to a file and keeps their
images in a content-addressed folder beside it, for runs without a controller.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from pouchline.inspect.aggregate import Decided
from pouchline.inspect.verdicts import Ack, CellVerdict, decode, encode
from pouchline.station.protocol import ProtocolError, RejectCounter

log = logging.getLogger(__name__)


class ControllerLink:
    """Cell verdicts to the controller, at least once."""

    def __init__(self, context: zmq.Context, endpoint: str, *, ack_timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self.ack_timeout_s = ack_timeout_s
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.connect(endpoint)
        self.unacked: OrderedDict[str, tuple[list[bytes], float]] = OrderedDict()
        self.rejected = RejectCounter()
        self.counts = {"sent": 0, "acked": 0, "resent": 0}

    def send(self, decided: Decided) -> None:
        parts = encode(decided.verdict, decided.attachments)
        self.unacked[decided.verdict.cell_id] = (parts, time.monotonic())
        self._push(parts)
        self.counts["sent"] += 1

    def _push(self, parts: list[bytes]) -> None:
        try:
            self.socket.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the controller is away and its queue is full: the resend timer tries again

    def receive(self) -> None:
        """Take the acks that have arrived."""
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message, _ = decode(parts)
                if not isinstance(message, Ack):
                    raise ProtocolError("unexpected", f"the controller sent a {type(message).__name__}")
            except ProtocolError as error:
                self.rejected.record(error)
                continue
            for cell_id in message.cells:
                if self.unacked.pop(cell_id, None) is not None:
                    self.counts["acked"] += 1

    def resend(self) -> None:
        """Send again what has waited longer than the ack timeout (oldest first)."""
        now = time.monotonic()
        for cell_id, (parts, sent) in list(self.unacked.items()):
            if now - sent < self.ack_timeout_s:
                break
            self.unacked[cell_id] = (parts, now)
            self.unacked.move_to_end(cell_id)
            self._push(parts)
            self.counts["resent"] += 1

    def tick(self) -> None:
        self.receive()
        self.resend()

    def close(self, drain_s: float = 5.0) -> None:
        """Wait up to ``drain_s`` for the last acknowledgements, then close (what is left is reported)."""
        deadline = time.monotonic() + drain_s
        while self.unacked and time.monotonic() < deadline:
            self.socket.poll(50)
            self.tick()
        if self.unacked:
            log.error("verdict link to %s closed with %d cell verdicts not acknowledged", self.endpoint, len(self.unacked))
        self.socket.close(linger=0)


class JsonlSink:
    """One JSON line per cell verdict; attachments as files named by their SHA-256."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.images = self.path.with_name(self.path.name + ".images")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def send(self, decided: Decided) -> None:
        verdict = decided.verdict
        for frame in verdict.frames:
            for item in frame.attachments:
                target = self.images / f"{item.sha256}.{'jpg' if item.media_type == 'image/jpeg' else 'png'}"
                if not target.exists():
                    self.images.mkdir(parents=True, exist_ok=True)
                    partial = target.with_suffix(".part")
                    partial.write_bytes(decided.attachments[item.part])
                    partial.replace(target)
        self._file.write(verdict.model_dump_json() + "\n")

    def tick(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: Path) -> list[CellVerdict]:
    """Cell verdicts written by `JsonlSink` (a torn last line from a crash is skipped)."""
    verdicts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            verdicts.append(CellVerdict.model_validate_json(line))
        except ValueError as error:
            log.warning("%s:%d: skipped (%s)", path, number, error)
    return verdicts


class VerdictReceiver:
    """The controller's end: validate, hand each cell verdict to ``store``, then acknowledge it.

    ``store`` must make the verdict durable before it returns (and treat a cell id it has
    seen as a duplicate); an exception from it means no ack, so the collector sends again.
    """

    def __init__(self, endpoint: str, store: Callable[[CellVerdict, list[memoryview]], Any],
                 context: zmq.Context | None = None) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.store = store
        self.rejected = RejectCounter()
        self.stored = 0

    def poll(self, timeout_s: float) -> int:
        """Handle what arrives within ``timeout_s``; the number of verdicts stored."""
        stored = 0
        if not self.socket.poll(timeout_s * 1000):
            return 0
        while True:
            try:
                identity, *parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                message, attachments = decode(parts)
                if not isinstance(message, CellVerdict):
                    raise ProtocolError("unexpected", f"expected cell verdicts, got a {type(message).__name__}")
            except ProtocolError as error:
                self.rejected.record(error)
                continue
            self.store(message, attachments)
            self.socket.send_multipart([identity, *encode(Ack(cells=[message.cell_id]))])
            stored += 1
        self.stored += stored
        return stored

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()
