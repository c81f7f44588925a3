"""Wire protocol between camera stations and inspection workers: ZeroMQ multipart messages.

A frame is ``[FRAME_MAGIC, msgpack(header), payload]`` -- the image bytes travel as their own
part, so neither side copies or re-encodes them. A frame by reference is
``[REFERENCE_MAGIC, msgpack(header), reference]``: its bytes wait in the station's shared-memory
arena (`pouchline.station.arena`), for workers on the station's host. A control message is
``[CONTROL_MAGIC, msgpack(body)]``. `station/PROTOCOL.md` documents every field.

Messages cross process and machine boundaries, so `decode` trusts nothing: sizes are checked
before anything is unpacked, msgpack is decoded without extension types, every field is
validated strictly (a typo or a stray type is an error, never coerced or ignored) and the
payload must match its header. Every failure is a `ProtocolError` whose ``kind`` is a stable
counter key, so a receiver counts malformed messages with `RejectCounter` and carries on.
"""

from __future__ import annotations

import logging
import math
import operator
import reprlib
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, TypeVar

import cv2
import msgpack
import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from pouchline.datasets.records import GroundTruth, check_identifier, is_identifier
from pouchline.station.imageinfo import image_header

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
FRAME_MAGIC = b"PLF1"
CONTROL_MAGIC = b"PLC1"
REFERENCE_MAGIC = b"PLR1"

#: Every `ProtocolError.kind`; stable, because status pages and alarms count by them.
PROTOCOL_ERROR_KINDS: tuple[str, ...] = (
    "parts",
    "magic",
    "header_too_large",
    "header_undecodable",
    "header_invalid",
    "payload_too_large",
    "payload_mismatch",
    "payload_undecodable",
    "control_too_large",
    "control_undecodable",
    "control_invalid",
    "arena_invalid",
    "arena_stale",
    "unexpected",  # well-formed, but not a message this receiver accepts (raised by the transport)
    # verdict messages between inspection workers, the collector and the controller (pouchline.inspect.verdicts)
    "verdict_too_large",
    "verdict_undecodable",
    "verdict_invalid",
)

_INT64_MAX = 2**63 - 1  # keeps counters and clocks representable downstream (numpy, databases)
#: Keys one `done` message may carry.
MAX_DONE_KEYS = 1024
#: Frames one message may carry (a batch: the frames' parts one after another).
MAX_BATCH = 64

#: Wire models are strict: a station that sends ``"1080"`` for a width has a bug worth seeing.
#: (Shared with the verdict messages of `pouchline.inspect.verdicts`.)
WIRE = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ProtocolError(Exception):
    """A message that must be refused; ``kind`` is its counter key, ``str()`` the details.

    ``salvage`` holds the identifying fields of a refused frame that could still be read
    (station, camera, seq, lot, cell, view, views, t_wall; see `salvage_fields`), so the
    receiver can answer it: hand the credit back and make the cell a fail-safe reject.
    """

    def __init__(self, kind: str, message: str, salvage: dict[str, Any] | None = None) -> None:
        if kind not in PROTOCOL_ERROR_KINDS:
            raise ValueError(f"unknown protocol error kind {kind!r}; known: {', '.join(PROTOCOL_ERROR_KINDS)}")
        super().__init__(kind, message, salvage)  # all in args, so the error survives copy and pickle
        self.kind = kind
        self.message = message
        self.salvage = salvage

    def __str__(self) -> str:
        return self.message


def _identifier(value: str, info: ValidationInfo) -> str:
    return check_identifier(value, info.field_name or "identifier")


#: Station, camera, lot, cell and view ids end up in file names and topics (see check_identifier).
Identifier = Annotated[str, AfterValidator(_identifier)]
Session = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
#: File name of a station's arena: plain characters, no path.
ArenaName = Annotated[str, Field(pattern=r"^pouchline-[A-Za-z0-9._-]{1,200}$")]
#: Abstract Unix socket name of a station's local lane (see `pouchline.station.lane`).
LaneName = Annotated[str, Field(pattern=r"^pouchline-lane-[A-Za-z0-9_-]{1,64}$")]
#: msgpack has no tuple: a key arrives as a 3-element array.
Key = Annotated[
    tuple[Identifier, Identifier, Annotated[int, Field(ge=0, le=_INT64_MAX)]],
    BeforeValidator(lambda value: tuple(value) if isinstance(value, list) else value),
]


class FrameTruth(BaseModel):
    """What a synthetic or replay source knows about the frame; lets workers score themselves live."""

    model_config = WIRE

    labels: list[Identifier] = Field(min_length=1, description="Class labels of the cell, as in FrameRecord.")
    severities: dict[Identifier, Annotated[float, Field(ge=0)]] = Field(
        description="Per-kind defect severity in mm; 0 when the kind is within spec."
    )
    ground_truth: GroundTruth | None = Field(description="Exact renderer truth (synthetic sources only).")


class FrameHeader(BaseModel):
    """Everything a worker needs to know about one captured view, besides its pixels."""

    model_config = WIRE

    v: Literal[1] = Field(description="Protocol version; a receiver refuses versions it does not speak.")
    station: Identifier = Field(description="Station that captured the frame.")
    camera: Identifier = Field(description="Camera within the station.")
    lot: Identifier = Field(description="Production lot of the cell.")
    cell: Identifier = Field(description="Cell id; every view of one cell carries the same one.")
    view: Identifier = Field(description="Which view of the cell this frame is (top, side, ...).")
    views: int = Field(ge=1, le=16, description="How many views this cell has: the worker waits for all of them.")
    seq: int = Field(ge=0, le=_INT64_MAX, description="Per-camera sequence number; (station, camera, seq) is unique.")
    t_mono_ns: int = Field(
        ge=0, le=_INT64_MAX, description="Capture time on the station's monotonic clock (comparable on its host only)."
    )
    t_wall: float = Field(ge=0, description="Capture time, seconds since the Unix epoch.")
    exposure: float | None = Field(
        gt=0, description="Exposure setting in the camera's units (V4L2: 100 µs steps), if known; metadata only."
    )
    gain: float | None = Field(description="Sensor gain in the camera's own units, if known; metadata only.")
    trigger: Literal["source", "external", "presence"] = Field(
        description="What made this a cell: the source itself, a PLC/HTTP trigger, or presence detection."
    )
    encoding: Literal["jpeg", "png", "raw"] = Field(description="How the payload encodes the image.")
    width: int = Field(ge=1, le=16384, description="Image width in pixels.")
    height: int = Field(ge=1, le=16384, description="Image height in pixels.")
    channels: Literal[1, 3] = Field(description="1 for grayscale, 3 for BGR colour.")
    dtype: Literal["uint8", "uint16"] = Field(description="Sample type; uint16 only for raw (little-endian).")
    nbytes: int = Field(ge=0, description="Payload length in bytes (0 for a dropped frame).")
    dropped: Identifier | None = Field(
        description="Why the station dropped the frame (e.g. 'queue_full'); the payload is then empty and the "
        "cell becomes a fail-safe reject downstream."
    )
    truth: FrameTruth | None = Field(description="Ground truth attached by synthetic/replay sources.")

    @model_validator(mode="after")
    def _encoded_images_are_8_bit(self) -> FrameHeader:
        if self.encoding != "raw" and self.dtype != "uint8":
            raise ValueError(f"dtype {self.dtype!r}: {self.encoding} payloads are uint8")
        return self

    @property
    def key(self) -> tuple[str, str, int]:
        """Unique frame key: what a worker's ``done`` hands back."""
        return (self.station, self.camera, self.seq)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the decoded image: (H, W) for grayscale, (H, W, C) for colour."""
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)


_Model = TypeVar("_Model", bound=BaseModel)


def _trusted(model: type[_Model], data: dict[str, Any]) -> _Model:
    """An instance of ``model`` holding ``data``, which the caller has validated as pydantic
    would (what `BaseModel.model_construct` does, without its per-field overhead)."""
    instance = model.__new__(model)
    object.__setattr__(instance, "__dict__", data)
    object.__setattr__(instance, "__pydantic_fields_set__", set(data))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= _INT64_MAX


def _is_time(value: object) -> bool:
    return type(value) is float and 0.0 <= value < math.inf


class HeaderValidator:
    """`FrameHeader.model_validate` at a fraction of the cost, for the frames of a known camera.

    Validating a 21-field strict model costs about 10 µs, twice per frame (station and worker),
    which at thousands of frames per second is a large share of the transport. But most fields
    repeat from frame to frame: the same station, camera, lot, view, size and encoding. So the
    fields that do not change per frame are validated by pydantic once per distinct combination
    (remembered by value *and* type, so ``True`` or ``1.0`` never pass for a cached ``1``), and
    only the per-frame ones (cell, seq, clocks, size) are checked here, by rules at least as
    strict as the model's. Anything else -- an unseen combination, ground truth, a value of an
    unexpected type -- goes through pydantic, which also writes the error message. The result
    is the very `FrameHeader` pydantic would have made (a test fuzzes the two against each other).
    """

    #: The fields that change per frame; `validate` checks them at least as strictly as the model.
    PER_FRAME = ("cell", "seq", "t_mono_ns", "t_wall", "nbytes")
    #: Distinct combinations remembered; a station has a handful (cameras x lots).
    MOST = 1024

    def __init__(self) -> None:
        self._fields = tuple(FrameHeader.model_fields)
        self._repeating = tuple(name for name in self._fields if name not in self.PER_FRAME)
        self._repeating_of = operator.itemgetter(*self._repeating)
        self._per_frame_of = operator.itemgetter(*self.PER_FRAME)
        self._known: dict[tuple[object, ...], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def validate(self, body: object) -> FrameHeader:
        """A `FrameHeader` from a decoded header; `ValidationError` as `FrameHeader.model_validate` raises it."""
        template = self._template(body)
        if template is None:
            return self._learn(body)
        try:
            cell, seq, t_mono_ns, t_wall, nbytes = self._per_frame_of(body)
        except KeyError:
            return FrameHeader.model_validate(body)
        return _per_frame(template, cell, seq, t_mono_ns, t_wall, nbytes)

    def _template(self, body: object) -> dict[str, Any] | None:
        if type(body) is not dict or len(body) != len(self._fields) or body.get("truth", 0) is not None:
            return None
        try:
            values = self._repeating_of(body)
            return self._known.get((values, tuple(map(type, values))))
        except (KeyError, TypeError):  # a field missing, or an unhashable value: pydantic says what is wrong
            return None

    def _learn(self, body: object) -> FrameHeader:
        header = FrameHeader.model_validate(body)
        if header.truth is None:
            self._remember(self._repeating_of(body), dict(header.__dict__))
        return header

    def _remember(self, values: tuple[object, ...], template: dict[str, Any]) -> None:
        with self._lock:
            if len(self._known) >= self.MOST:
                self._known.clear()
            self._known[(values, tuple(map(type, values)))] = template

    def stamp(self, repeating: dict[str, Any]) -> HeaderStamp:
        """The `HeaderStamp` of these repeating fields, from the templates `validate` keeps (by
        value and type): a station making the headers of its cameras and lots needs no cache of
        its own. ValidationError or ValueError, as `HeaderStamp` raises them, for bad fields."""
        try:
            values = self._repeating_of(repeating)
            template = self._known.get((values, tuple(map(type, values))))
        except (KeyError, TypeError):  # a field missing, or an unhashable value (ground truth)
            return HeaderStamp(**repeating)  # raises, saying what is wrong
        if template is None or len(repeating) != len(self._repeating):
            stamp = HeaderStamp(**repeating)
            self._remember(values, stamp.template)
            return stamp
        return HeaderStamp.of(template)


HEADERS = HeaderValidator()


def _per_frame(template: dict[str, Any], cell: object, seq: object, t_mono_ns: object, t_wall: object,
               nbytes: object) -> FrameHeader:
    """The header made of a validated ``template`` and a frame's own fields (`HeaderValidator.PER_FRAME`),
    checked here by rules at least as strict as the model's; pydantic judges (and explains) the rest."""
    data = template.copy()
    data["cell"], data["seq"], data["t_mono_ns"], data["t_wall"], data["nbytes"] = cell, seq, t_mono_ns, t_wall, nbytes
    if is_identifier(cell) and _is_count(seq) and _is_count(t_mono_ns) and _is_time(t_wall) and _is_count(nbytes):
        return _trusted(FrameHeader, data)
    return FrameHeader.model_validate(data)


class HeaderStamp:
    """The headers of a run of frames that differ only in their own fields (cell, sequence
    number, clocks, payload size): one camera's frames while its lot, view, size, encoding and
    exposure stay the same, which is nearly always.

    `frame_header` has to find out for each frame which fields repeat (it hashes all of them to
    look the combination up); a capture loop knows, so it validates the repeating fields once,
    here, and `stamp` checks only the frame's own, as `HeaderValidator` does. At thousands of
    frames per second that is a visible share of a station's CPU (2.7 against 6.1 µs a header,
    measured on the project's machine). Frames with ground truth (it changes per frame) go
    through `frame_header`.
    """

    def __init__(self, **repeating: Any) -> None:
        """``repeating``: every `FrameHeader` field but the per-frame ones; ValidationError names a bad one."""
        own = set(HeaderValidator.PER_FRAME) & repeating.keys()
        if own:
            raise ValueError(f"{', '.join(sorted(own))} change per frame: pass them to stamp()")
        header = FrameHeader.model_validate({**repeating, "cell": "c", "seq": 0, "t_mono_ns": 0, "t_wall": 0.0, "nbytes": 0})
        if header.truth is not None:
            raise ValueError("ground truth changes per frame: such headers are made by frame_header")
        self.template = dict(header.__dict__)

    @classmethod
    def of(cls, template: dict[str, Any]) -> HeaderStamp:
        """A stamp of a template validated already (a header's fields; its own are overwritten per frame)."""
        stamp = cls.__new__(cls)
        stamp.template = template
        return stamp

    def stamp(self, cell: str, seq: int, t_mono_ns: int, t_wall: float, nbytes: int) -> FrameHeader:
        """This run's header for one frame; ValidationError (naming the field) for a bad value."""
        return _per_frame(self.template, cell, seq, t_mono_ns, t_wall, nbytes)


def frame_header(**fields: Any) -> FrameHeader:
    """``FrameHeader(**fields)``, validated the fast way (see `HeaderValidator`): what stations
    build for every frame."""
    return HEADERS.validate(fields)


def _wire_dtype(header: FrameHeader) -> np.dtype[Any]:
    """Raw uint16 samples are little-endian on the wire, whatever the hosts are."""
    return np.dtype(header.dtype).newbyteorder("<")


def _payload_problem(header: FrameHeader, payload: memoryview, read_image: bool = True) -> str | None:
    """Why ``payload`` cannot belong to ``header`` (None if it can); shared by sender and receiver.

    Encoded images must state the header's size in their own header, so a few-kB payload can
    never make a worker decode (allocate) an image larger than the frame header allows.
    ``read_image`` False: the sender made the header from that image header already.
    """
    size = len(payload)
    if header.nbytes != size:
        return f"header nbytes {header.nbytes} but the payload has {size} bytes"
    if header.dropped is not None:
        return None if size == 0 else f"dropped frame ({header.dropped}) must have an empty payload, has {size} bytes"
    if size == 0:
        return "payload is empty but the frame is not marked dropped"
    if header.encoding == "raw":
        expected = header.width * header.height * header.channels * _wire_dtype(header).itemsize
        if size != expected:
            return (f"raw {header.width}x{header.height}x{header.channels} {header.dtype} needs {expected} bytes, "
                    f"payload has {size}")
        return None
    if not read_image:
        return None
    try:
        stated = image_header(payload)
    except ValueError as error:
        return f"{header.encoding} payload: {error} (starts with {bytes(payload[:8]).hex(' ')})"
    if stated.encoding != header.encoding:
        return f"header says {header.encoding} but the payload is a {stated.encoding} image"
    if (stated.width, stated.height) != (header.width, header.height):
        return f"{header.encoding} payload is {stated.width}x{stated.height}, header says {header.width}x{header.height}"
    return None


@dataclass(frozen=True)
class Frame:
    """A decoded frame message; ``payload`` is a view of the received buffer, not a copy.

    For a frame that came by reference the buffer is the station's shared-memory arena, and
    ``lease`` checks that the station has not reused it (see `verify`).
    """

    header: FrameHeader
    payload: memoryview
    lease: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def verify(self) -> None:
        """Raise ``ProtocolError('arena_stale')`` if the bytes were overwritten while this worker
        held them (it was presumed dead and the frame redelivered). Call it after using
        ``payload`` directly; `image` calls it itself. Inline frames always pass."""
        if self.lease is not None:
            self.lease()

    def image(self) -> np.ndarray:
        """The pixels, exactly ``header.shape`` and ``header.dtype``, so workers need no checks of their own.

        An alpha channel (PNG) is dropped. Raw frames are a view of the message buffer (read-only
        when the buffer is; a copy for frames from the arena): copy before drawing on them.
        """
        header = self.header
        what = f"frame {header.key} ({header.encoding}, {len(self.payload)} bytes)"
        if header.dropped is not None:
            raise ProtocolError("payload_undecodable", f"{what} was dropped by the station ({header.dropped})")
        try:
            if header.encoding == "raw":
                pixels = np.frombuffer(self.payload, _wire_dtype(header)).reshape(header.shape)
                if self.lease is not None:
                    pixels = pixels.copy()
                    self.lease()
                return pixels
            image = cv2.imdecode(np.frombuffer(self.payload, np.uint8), cv2.IMREAD_UNCHANGED)
            self.verify()
        except (cv2.error, ValueError) as error:
            raise ProtocolError("payload_undecodable", f"{what} cannot be decoded: {error}") from error
        if image is None:
            raise ProtocolError("payload_undecodable", f"{what} cannot be decoded")
        if image.ndim == 3 and image.shape[2] == 4:  # alpha: counted as grey(+alpha) 1, colour(+alpha) 3, as in records
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if header.channels == 1 else cv2.COLOR_BGRA2BGR)
        if image.shape != header.shape or image.dtype != header.dtype:
            raise ProtocolError("payload_mismatch", f"{what} decodes to {image.shape} {image.dtype}, "
                                                    f"header says {header.shape} {header.dtype}")
        return image


class ArenaSource(Protocol):
    """What a frame by reference is resolved against (`pouchline.station.arena.ArenaReader`)."""

    def view(self, reference: memoryview, nbytes: int, what: str) -> tuple[memoryview, Callable[[], None]]: ...


@dataclass(frozen=True)
class FrameRef:
    """A frame whose bytes wait in the station's shared-memory arena; ``reference`` says where."""

    header: FrameHeader
    reference: memoryview

    def resolve(self, arena: ArenaSource, *, zero_copy: bool = False) -> Frame:
        """The frame, checked against its header as `decode` checks an inline payload;
        `ProtocolError` (``arena_*``, ``payload_mismatch``) otherwise.

        By default the bytes are copied out, so the payload stays valid for good. With
        ``zero_copy`` the payload views the arena: valid only until the worker is done with
        the frame, and `Frame.image`/`Frame.verify` refuse it if the station reused it."""
        header = self.header
        try:
            view, lease = arena.view(self.reference, header.nbytes, f"frame {header.key}")
        except ProtocolError as error:  # a lying reference still names its frame; a stale one is redelivered
            if error.kind != "arena_invalid":
                raise
            raise ProtocolError(error.kind, error.message, self.salvage()) from error
        payload = view if zero_copy else memoryview(bytes(view))
        problem = _payload_problem(header, payload)
        lease()  # the copy or the checks above read the bytes: they must still have been this frame's
        if problem is not None:
            raise ProtocolError("payload_mismatch", f"frame {header.key}: {problem}", self.salvage())
        return Frame(header, payload, lease if zero_copy else None)

    def salvage(self) -> dict[str, Any] | None:
        """The identifying fields of this frame, for refusing it (see `salvage_fields`)."""
        return salvage_fields(self.header.model_dump())


class Hello(BaseModel):
    """A worker (re)joins a station; a new session tells the station that what it held is lost."""

    model_config = WIRE

    type: Literal["hello"] = Field("hello", description="Message type.")
    worker: Identifier = Field(description="Worker name, stable across restarts.")
    session: Session = Field(description="Random per worker process; changes when the worker restarts.")
    capacity: int = Field(ge=1, le=1024, description="Frames the worker may hold at once (its credit).")
    arena: ArenaName | None = Field(
        None, description="The station arena this worker has mapped (same host): frames may come by reference."
    )


class Heartbeat(BaseModel):
    """Liveness, both ways; a station's new session tells its workers to say hello again."""

    model_config = WIRE

    type: Literal["heartbeat"] = Field("heartbeat", description="Message type.")
    sender: Identifier = Field(description="Worker or station name.")
    session: Session = Field(description="The sender's session (see Hello).")
    busy: int = Field(ge=0, description="Frames the sender holds now (0 from a station).")
    capacity: int = Field(ge=0, le=1024, description="The sender's credit (0 from a station).")
    arena: ArenaName | None = Field(
        None, description="A station's shared-memory arena, for workers on its host to map (None from workers)."
    )
    lane: LaneName | None = Field(
        None, description="A station's local lane, for workers that mapped its arena to connect to (None from workers)."
    )


class Done(BaseModel):
    """A worker is finished with frames: their credit goes back to the station."""

    model_config = WIRE

    type: Literal["done"] = Field("done", description="Message type.")
    keys: list[Key] = Field(min_length=1, max_length=MAX_DONE_KEYS, description="(station, camera, seq) of each frame.")


def _quick_done(body: object) -> Done | None:
    """A `Done` checked by the model's rules without pydantic's cost (a worker sends one per
    batch); None when anything is unusual, for pydantic to decide and explain."""
    if type(body) is not dict or len(body) != 2 or body.get("type") != "done":
        return None
    keys = body.get("keys")
    if type(keys) is not list or not 1 <= len(keys) <= MAX_DONE_KEYS:
        return None
    names: set[object] = set()  # the keys' station and camera ids, each checked once
    try:
        for key in keys:
            if type(key) not in (list, tuple) or len(key) != 3 or not _is_count(key[2]):
                return None
            names.add(key[0])
            names.add(key[1])
    except TypeError:  # an unhashable id: certainly not a valid one
        return None
    if not all(map(is_identifier, names)):
        return None
    return _trusted(Done, {"type": "done", "keys": [tuple(key) for key in keys]})


def done_message(keys: list[tuple[str, str, int]]) -> Done:
    """The `Done` for these frame keys (validated)."""
    return _quick_done({"type": "done", "keys": keys}) or Done(type="done", keys=keys)


class Trigger(BaseModel):
    """A cell arrived at the station (from the PLC); the next views belong to it."""

    model_config = WIRE

    type: Literal["trigger"] = Field("trigger", description="Message type.")
    lot: Identifier = Field(description="Production lot of the cell.")
    cell: Identifier | None = Field(description="Cell id; None lets the station number cells itself.")
    station: Identifier | None = Field(description="Addressed station; None for any station listening.")


Control = Annotated[Hello | Heartbeat | Done | Trigger, Field(discriminator="type")]
_CONTROL: TypeAdapter[Control] = TypeAdapter(Control)


@dataclass(frozen=True)
class Limits:
    """Largest parts a receiver looks at; checked before any byte is unpacked."""

    max_header_bytes: int = 64 * 1024
    max_payload_bytes: int = 64 * 1024 * 1024
    max_control_bytes: int = 256 * 1024


DEFAULT_LIMITS = Limits()


def pack_model(model: BaseModel, limit: int, what: str | Callable[[], str]) -> bytes:
    """msgpack of the model's fields; ``what`` names it in the error (a callable: only then)."""
    # A `done`, and a header without ground truth, hold plain values only: their fields are the wire body.
    plain = isinstance(model, Done) or (isinstance(model, FrameHeader) and model.truth is None)
    data = msgpack.packb(model.__dict__ if plain else model.model_dump(), use_bin_type=True)
    if len(data) > limit:
        raise ValueError(f"{what() if callable(what) else what} is {len(data)} bytes, receivers refuse more than {limit}")
    return data


def _byte_view(header: FrameHeader, payload: bytes | memoryview | np.ndarray) -> memoryview:
    """The payload as flat bytes without a copy; an array must be exactly the image the header describes."""
    if isinstance(payload, np.ndarray):
        if header.encoding == "raw" and (payload.shape != header.shape or payload.dtype != _wire_dtype(header)):
            raise ValueError(f"raw array {payload.shape} {payload.dtype} does not match header "
                             f"{header.shape} {header.dtype} (little-endian)")
        if not payload.flags.c_contiguous:
            raise ValueError("array payload is not C-contiguous (np.ascontiguousarray it; frames go out uncopied)")
    return memoryview(payload).cast("B")


def encode_frame(header: FrameHeader, payload: bytes | memoryview | np.ndarray, *,
                 limits: Limits = DEFAULT_LIMITS, checked: bool = False) -> list[bytes | memoryview]:
    """``[FRAME_MAGIC, header, payload]``; refuses (ValueError) what a receiver would refuse.
    ``checked``: the header was made from the payload's own image header (a source's
    `SourceFrame.checked`), which is then not read a second time; sizes are checked all the same."""
    view = _byte_view(header, payload)
    problem = _payload_problem(header, view, read_image=not checked)
    if problem is not None:
        raise ValueError(f"frame {header.key}: {problem}")
    if len(view) > limits.max_payload_bytes:
        raise ValueError(f"frame {header.key}: payload is {len(view)} bytes, receivers refuse more than "
                         f"{limits.max_payload_bytes}")
    return [FRAME_MAGIC, pack_model(header, limits.max_header_bytes, lambda: f"frame {header.key} header"), view]


def split_batch(parts: Sequence[object]) -> list[Sequence[object]]:
    """The messages in one received message: a batch of frames (3 parts each, at most
    `MAX_BATCH`) is split into them; anything else is one message, for `decode` to judge."""
    count = len(parts)
    if count > 3 and count % 3 == 0 and count <= 3 * MAX_BATCH:
        return [parts[start : start + 3] for start in range(0, count, 3)]
    return [parts]


def encode_control(message: Control, *, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """``[CONTROL_MAGIC, body]``."""
    return [CONTROL_MAGIC, pack_model(message, limits.max_control_bytes, f"{message.type} message")]


def as_bytes(part: object, index: int) -> memoryview:
    """A flat byte view of one received part (zmq.Frame, bytes, bytearray, memoryview) without copying."""
    try:
        return memoryview(getattr(part, "buffer", part)).cast("B")  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise ProtocolError("parts", f"part {index} is a {type(part).__name__}, not a byte buffer ({error})") from error


def check_size(data: memoryview, limit: int, kind: str, what: str) -> None:
    if len(data) > limit:
        raise ProtocolError(kind, f"{what} is {len(data)} bytes, the limit is {limit}")


def _refuse_extension(code: int, _data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack_body(data: memoryview, limit: int, kind: str, what: str) -> object:
    """Safe msgpack: no extension types (timestamps included), no container larger than the part."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_extension,
                               max_str_len=limit, max_bin_len=limit, max_array_len=limit, max_map_len=limit,
                               max_ext_len=0)
    except Exception as error:  # msgpack raises a zoo of types (ExtraData, FormatError, StackError, Unicode...)
        detail = str(error) or type(error).__name__
        raise ProtocolError(kind, f"{what} is not valid msgpack: {detail}") from error


#: Fields of a refused header worth reading on their own, and the check each must pass.
_SALVAGED: dict[str, Callable[[object], bool]] = {
    **{name: is_identifier for name in ("station", "camera", "lot", "cell", "view")},
    "seq": _is_count,
    "views": lambda value: type(value) is int and 1 <= value <= 16,
    "t_wall": _is_time,
}


def salvage_fields(body: object) -> dict[str, Any] | None:
    """The identifying fields of a refused frame header that are individually valid, or None.

    A header refused as a whole (wrong version, a bad size, a payload that does not match)
    usually still says which frame and cell it was; with ``station``, ``camera`` and ``seq``
    the worker returns its credit, with ``lot`` and ``cell`` the cell becomes a fail-safe reject.
    """
    if not isinstance(body, dict):
        return None
    found = {name: body[name] for name, valid in _SALVAGED.items() if name in body and valid(body[name])}
    return found or None


def describe_errors(error: ValidationError, most: int = 5) -> str:
    """Field by field, briefly: which field, what is wrong, what was sent."""
    problems = []
    for item in error.errors()[:most]:
        where = ".".join(str(part) for part in item["loc"]) or "message"
        text = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        sent = "" if item["type"] == "missing" else f" (got {reprlib.repr(item['input'])})"
        problems.append(f"{where}: {text}{sent}")
    more = error.error_count() - most
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def decode(parts: Sequence[object], limits: Limits = DEFAULT_LIMITS) -> Frame | FrameRef | Control:
    """A validated `Frame`, `FrameRef` or control message from received parts; anything else is a
    `ProtocolError`. A `FrameRef`'s payload is checked when it is resolved against its arena."""
    try:
        views = [as_bytes(part, index) for index, part in enumerate(parts)]
    except TypeError as error:
        raise ProtocolError("parts", f"message is a {type(parts).__name__}, not a list of parts") from error
    if len(views) not in (2, 3):
        raise ProtocolError("parts", f"message has {len(views)} parts; frames have 3, control messages 2")
    if len(views) == 3 and views[0] == REFERENCE_MAGIC:
        magic, expected = REFERENCE_MAGIC, "frame"
    else:
        magic, expected = (FRAME_MAGIC, "frame") if len(views) == 3 else (CONTROL_MAGIC, "control message")
    if views[0] != magic:
        if views[0] in (FRAME_MAGIC, CONTROL_MAGIC, REFERENCE_MAGIC):
            raise ProtocolError("parts", f"message with magic {bytes(views[0])!r} has {len(views)} parts")
        raise ProtocolError("magic", f"first part {bytes(views[0][:16])!r} is not the {expected} magic {magic!r}")
    if len(views) == 2:
        check_size(views[1], limits.max_control_bytes, "control_too_large", "control body")
        body = unpack_body(views[1], limits.max_control_bytes, "control_undecodable", "control body")
        try:
            return _quick_done(body) or _CONTROL.validate_python(body)
        except ValidationError as error:
            raise ProtocolError("control_invalid", f"control message: {describe_errors(error)}") from error
    payload = views[2]
    check_size(views[1], limits.max_header_bytes, "header_too_large", "frame header")
    body = unpack_body(views[1], limits.max_header_bytes, "header_undecodable", "frame header")
    if len(payload) > limits.max_payload_bytes:
        raise ProtocolError("payload_too_large", f"payload is {len(payload)} bytes, the limit is "
                                                 f"{limits.max_payload_bytes}", salvage_fields(body))
    try:
        header = HEADERS.validate(body)
    except ValidationError as error:
        raise ProtocolError("header_invalid", f"frame header: {describe_errors(error)}", salvage_fields(body)) from error
    if magic == REFERENCE_MAGIC:
        if header.dropped is not None or header.nbytes == 0 or header.nbytes > limits.max_payload_bytes:
            raise ProtocolError("payload_mismatch", f"frame {header.key}: a frame by reference needs 1 to "
                                                    f"{limits.max_payload_bytes} bytes, header says {header.nbytes}"
                                                    f"{' and dropped' if header.dropped else ''}", salvage_fields(body))
        return FrameRef(header, payload)
    problem = _payload_problem(header, payload)
    if problem is not None:
        raise ProtocolError("payload_mismatch", f"frame {header.key}: {problem}", salvage_fields(body))
    return Frame(header, payload)


class RejectCounter:
    """Counts malformed messages per kind and logs the first of each kind once.

    A flood of garbage (a misconfigured peer, a port scanner) must neither fill the log nor go
    unnoticed: the counts go to the status endpoint, the first example of each kind to the log.
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, error: ProtocolError) -> None:
        with self._lock:
            self._counts[error.kind] += 1
            first = self._counts[error.kind] == 1
        if first:
            log.warning("refused a malformed message (%s): %s; further ones of this kind are only counted",
                        error.kind, error)

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
