"""The station wire protocol: round trips, zero-copy, one targeted test per error kind, and fuzzing
that proves `decode` refuses garbage only with a counted `ProtocolError`."""

from __future__ import annotations

import copy
import logging
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pouchline.station.arena import REFERENCE, ArenaReader, ArenaWriter
from pouchline.station.protocol import (
    _CONTROL,
    CONTROL_MAGIC,
    DEFAULT_LIMITS,
    FRAME_MAGIC,
    MAX_BATCH,
    REFERENCE_MAGIC,
    PROTOCOL_ERROR_KINDS,
    Done,
    Frame,
    FrameRef,
    FrameHeader,
    FrameTruth,
    HeaderStamp,
    HeaderValidator,
    Heartbeat,
    Hello,
    Limits,
    ProtocolError,
    RejectCounter,
    Trigger,
    decode,
    done_message,
    encode_control,
    encode_frame,
    split_batch,
)

RNG = np.random.default_rng(0)
COLOUR = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (24, 32), dtype=np.uint8)
DEEP = RNG.integers(0, 65536, (24, 32), dtype=np.uint16)
PICTURE = np.dstack([*np.meshgrid(np.arange(32) * 8, np.arange(24) * 10), np.full((24, 32), 90)]).astype(np.uint8)
JPEG = cv2.imencode(".jpg", PICTURE)[1].tobytes()
PNG = cv2.imencode(".png", PICTURE)[1].tobytes()
TRUTH = {
    "labels": ["swollen"],
    "severities": {"swelling": 0.8, "dent": 0.0},
    "ground_truth": {"seed": 7, "index": 3, "px_per_mm": 2.5, "swelling_mm": 0.8, "swelling_pct": 16.0,
                     "polygon": [(1.0, 1.0), (30.0, 1.0), (30.0, 22.0)], "render": {"film": "silver"}},
}
CONTROLS = [
    Hello(type="hello", worker="w-1", session="a1b2c3d4", capacity=4),
    Heartbeat(type="heartbeat", sender="st1", session="s_1-x", busy=0, capacity=0),
    Done(type="done", keys=[("st1", "top", 0), ("st1", "side", 2**40)]),
    Trigger(type="trigger", lot="LOT-8", cell="C-2", station=None),
    Trigger(type="trigger", lot="LOT-8", cell=None, station="st1"),
]


def header(**changes: Any) -> FrameHeader:
    """A valid 32x24 colour JPEG header, with ``changes`` applied (validated)."""
    fields: dict[str, Any] = {
        "v": 1, "station": "st1", "camera": "top", "lot": "LOT-1", "cell": "C-1", "view": "top", "views": 2,
        "seq": 5, "t_mono_ns": 123_456_789, "t_wall": 1_700_000_000.5, "exposure": 800.0, "gain": 1.5,
        "trigger": "source", "encoding": "jpeg", "width": 32, "height": 24, "channels": 3, "dtype": "uint8",
        "nbytes": len(JPEG), "dropped": None, "truth": None,
    }
    return FrameHeader.model_validate({**fields, **changes})


def raw_header(image: np.ndarray) -> FrameHeader:
    return header(encoding="raw", channels=1 if image.ndim == 2 else 3, dtype=str(image.dtype), nbytes=image.nbytes)


FRAMES: dict[str, tuple[FrameHeader, bytes | np.ndarray]] = {
    "jpeg": (header(), JPEG),
    "jpeg_with_truth": (header(truth=TRUTH), JPEG),
    "png": (header(encoding="png", nbytes=len(PNG)), PNG),
    "raw_gray": (raw_header(GRAY), GRAY),
    "raw_colour": (raw_header(COLOUR), COLOUR),
    "raw_uint16": (raw_header(DEEP), DEEP),
    "dropped": (header(dropped="queue_full", nbytes=0), b""),
}


def frame_parts(**changes: Any) -> list[bytes]:
    """The parts of a valid JPEG frame message, with header fields changed *unvalidated* on the wire."""
    body = {**header().model_dump(), **changes}
    return [FRAME_MAGIC, msgpack.packb(body), JPEG]


def control_parts(body: object) -> list[bytes]:
    return [CONTROL_MAGIC, msgpack.packb(body)]


def refusal(parts: object, limits: Limits | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode(parts, limits or DEFAULT_LIMITS)  # type: ignore[arg-type]
    return caught.value


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FRAMES)
def test_frame_round_trip(name: str) -> None:
    sent, payload = FRAMES[name]
    frame = decode(encode_frame(sent, payload))
    assert isinstance(frame, Frame)
    assert frame.header == sent
    assert bytes(frame.payload) == (payload.tobytes() if isinstance(payload, np.ndarray) else payload)
    if sent.dropped is not None:
        with pytest.raises(ProtocolError, match="queue_full") as caught:
            frame.image()
        assert caught.value.kind == "payload_undecodable"
        return
    image = frame.image()
    assert image.shape == sent.shape and image.dtype == sent.dtype
    if isinstance(payload, np.ndarray):
        assert np.array_equal(image, payload)
    elif sent.encoding == "png":
        assert np.array_equal(image, PICTURE)  # lossless
    else:
        assert np.abs(image.astype(int) - PICTURE).mean() < 3  # lossy, but the same picture


def _grey_alpha_png(grey: int, alpha: int, width: int = 5, height: int = 4) -> bytes:
    """A grey+alpha PNG (colour type 4), which cv2.imencode cannot write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([grey, alpha]) * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 4, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_png_alpha_is_dropped_and_channels_count_as_in_records() -> None:
    bgra = np.dstack([PICTURE, np.full((24, 32), 128, np.uint8)])
    png = cv2.imencode(".png", bgra)[1].tobytes()
    frame = decode(encode_frame(header(encoding="png", nbytes=len(png)), png))
    assert isinstance(frame, Frame) and np.array_equal(frame.image(), PICTURE)
    grey = _grey_alpha_png(100, 200)
    frame = decode(encode_frame(header(encoding="png", width=5, height=4, channels=1, nbytes=len(grey)), grey))
    assert isinstance(frame, Frame)
    assert frame.image().shape == (4, 5) and (frame.image() == 100).all()


def test_truth_round_trips_with_its_ground_truth() -> None:
    frame = decode(encode_frame(*FRAMES["jpeg_with_truth"]))
    assert isinstance(frame, Frame) and frame.header.truth is not None
    assert frame.header.truth == FrameTruth.model_validate(TRUTH)
    assert frame.header.truth.ground_truth is not None
    assert frame.header.truth.ground_truth.polygon[1] == (30.0, 1.0)


@pytest.mark.parametrize("message", CONTROLS, ids=lambda message: message.type)
def test_control_round_trip(message: Hello | Heartbeat | Done | Trigger) -> None:
    parts = encode_control(message)
    assert parts[0] == CONTROL_MAGIC and len(parts) == 2
    assert decode(parts) == message


def test_done_keys_come_back_as_tuples() -> None:
    done = decode(encode_control(CONTROLS[2]))
    assert isinstance(done, Done)
    assert done.keys == [("st1", "top", 0), ("st1", "side", 2**40)]
    assert all(type(key) is tuple for key in done.keys)
    assert header().key in Done(type="done", keys=[header().key]).keys


def test_decode_takes_zmq_frames_bytearrays_and_memoryviews() -> None:
    parts = encode_frame(*FRAMES["jpeg"])
    for wrap in (zmq.Frame, bytearray, memoryview):
        frame = decode([wrap(bytes(part)) for part in parts])
        assert isinstance(frame, Frame) and frame.image().shape == (24, 32, 3)


def test_received_payload_is_not_copied() -> None:
    sent, _ = FRAMES["raw_colour"]
    parts = encode_frame(sent, COLOUR)
    buffer = bytearray(bytes(parts[2]))
    frame = decode([parts[0], parts[1], buffer])
    assert isinstance(frame, Frame)
    received = np.frombuffer(buffer, np.uint8)
    assert np.shares_memory(np.frombuffer(frame.payload, np.uint8), received)
    assert np.shares_memory(frame.image(), received), "raw images are views of the message buffer"
    buffer[0] ^= 0xFF
    assert frame.image()[0, 0, 0] == COLOUR[0, 0, 0] ^ 0xFF


def test_array_payload_is_sent_without_a_copy() -> None:
    parts = encode_frame(raw_header(DEEP), DEEP)
    assert np.shares_memory(np.frombuffer(parts[2], np.uint8), DEEP)
    jpeg_array = cv2.imencode(".jpg", PICTURE)[1]  # (N, 1) uint8, as cv2 hands it out
    parts = encode_frame(header(nbytes=jpeg_array.nbytes), jpeg_array)
    assert np.shares_memory(np.frombuffer(parts[2], np.uint8), jpeg_array)


# -- the sender refuses what a receiver would refuse -----------------------------------------------
@pytest.mark.parametrize(("sent", "payload", "problem"), [
    (header(nbytes=len(JPEG) - 1), JPEG, f"header nbytes {len(JPEG) - 1} but the payload has {len(JPEG)} bytes"),
    (header(nbytes=len(PNG)), PNG, "header says jpeg but the payload is a png image"),
    (header(dropped="queue_full", nbytes=len(JPEG)), JPEG, "must have an empty payload"),
    (header(nbytes=0), b"", "not marked dropped"),
    (raw_header(COLOUR), np.asfortranarray(COLOUR), "C-contiguous"),
    (raw_header(COLOUR), COLOUR.reshape(32, 24, 3), "does not match header (24, 32, 3)"),
    (raw_header(DEEP), DEEP.astype(">u2"), "little-endian"),
    (raw_header(COLOUR).model_copy(update={"nbytes": 2301}), COLOUR.tobytes()[:-3],
     "raw 32x24x3 uint8 needs 2304 bytes, payload has 2301"),
    (header(height=48), JPEG, "jpeg payload is 32x24, header says 32x48"),
])
def test_encode_frame_refuses_inconsistent_payloads(sent: FrameHeader, payload: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        encode_frame(sent, payload)


def test_a_checked_payload_is_not_read_again_but_the_receiver_still_reads_it() -> None:
    """A source that read the JPEG's own header made the frame header from it (``checked``):
    the station then only checks sizes; a worker checks everything, so a header that lies
    about such a payload is refused there all the same."""
    lying = header(width=64)
    with pytest.raises(ValueError, match="payload is 32x24, header says 64x24"):
        encode_frame(lying, JPEG)
    parts = encode_frame(lying, JPEG, checked=True)
    assert refusal(parts).kind == "payload_mismatch"
    with pytest.raises(ValueError, match=f"header nbytes {len(JPEG) + 1}"):
        encode_frame(header(nbytes=len(JPEG) + 1), JPEG, checked=True)
    assert decode(encode_frame(header(), JPEG, checked=True)).header == header()


def test_encoders_refuse_messages_receivers_would_refuse_as_too_large() -> None:
    big = header(truth={**TRUTH, "ground_truth": {**TRUTH["ground_truth"], "render": {"blob": "x" * 70_000}}})
    with pytest.raises(ValueError, match=r"header is \d+ bytes, receivers refuse more than 65536"):
        encode_frame(big, JPEG)
    with pytest.raises(ValueError, match="payload is"):
        encode_frame(header(), JPEG, limits=Limits(max_payload_bytes=100))
    with pytest.raises(ValueError, match="done message is"):
        encode_control(CONTROLS[2], limits=Limits(max_control_bytes=10))


# -- header validation ------------------------------------------------------------------------------
def test_a_header_field_typo_is_refused_with_the_field_named() -> None:
    body = header().model_dump()
    body["exposre"] = body.pop("exposure")
    error = refusal([FRAME_MAGIC, msgpack.packb(body), JPEG])
    assert error.kind == "header_invalid"
    assert "exposre: unknown field" in str(error) and "exposure: Field required" in str(error)
    with pytest.raises(ValidationError, match="exposre"):
        header(exposre=800.0)


def test_nested_unknown_fields_and_control_typos_are_named() -> None:
    error = refusal(frame_parts(truth={**TRUTH, "lables": ["ok"]}))
    assert error.kind == "header_invalid" and "truth.lables: unknown field" in str(error)
    error = refusal(control_parts({"type": "hello", "worker": "w", "session": "s", "capacity": 1, "capacty": 2}))
    assert error.kind == "control_invalid" and "hello.capacty: unknown field" in str(error)


@pytest.mark.parametrize(("changes", "named"), [
    ({"width": 0}, "width: Input should be greater than or equal to 1"),
    ({"height": 16385}, "height: Input should be less than or equal to 16384"),
    ({"width": "32"}, "width: Input should be a valid integer (got '32')"),
    ({"views": 1.0}, "views: Input should be a valid integer"),
    ({"views": 17}, "views: Input should be less than or equal to 16"),
    ({"seq": -1}, "seq: Input should be greater than or equal to 0"),
    ({"v": 2}, "v: Input should be 1"),
    ({"t_wall": float("nan")}, "t_wall: Input should be a finite number"),
    ({"exposure": 0.0}, "exposure: Input should be greater than 0"),
    ({"station": "st 1"}, "station: Value error, station 'st 1' must be 1-128 characters"),
    ({"cell": ""}, "cell: Value error, cell '' must be"),
    ({"trigger": "plc"}, "trigger: Input should be 'source', 'external' or 'presence'"),
    ({"encoding": "bmp"}, "encoding: Input should be 'jpeg', 'png' or 'raw'"),
    ({"channels": 4}, "channels: Input should be 1 or 3"),
    ({"dtype": "uint16"}, "dtype 'uint16': jpeg payloads are uint8"),
    ({"dropped": "queue full"}, "dropped: Value error, dropped 'queue full'"),
    ({"truth": {**TRUTH, "labels": []}}, "truth.labels: List should have at least 1 item"),
    ({"truth": {**TRUTH, "severities": {"dent": -1.0}}}, "truth.severities.dent: Input should be greater than"),
    ({"truth": {**TRUTH, "ground_truth": {**TRUTH["ground_truth"], "px_per_mm": 0}}},
     "truth.ground_truth.px_per_mm: Input should be greater than 0"),
])
def test_invalid_header_fields_are_named(changes: dict[str, Any], named: str) -> None:
    error = refusal(frame_parts(**changes))
    assert error.kind == "header_invalid"
    assert named in str(error)


# -- every error kind, from a targeted bad message --------------------------------------------------
GOOD_FRAME = encode_frame(*FRAMES["jpeg"])
GOOD_CONTROL = encode_control(CONTROLS[0])
TINY = Limits(max_header_bytes=64, max_control_bytes=16)
BAD_MESSAGES: list[tuple[str, object, Limits | None, list[str]]] = [
    ("parts", [], None, ["0 parts"]),
    ("parts", [*GOOD_FRAME, b""], None, ["4 parts"]),
    ("parts", GOOD_FRAME[:2], None, ["magic b'PLF1' has 2 parts"]),
    ("parts", [*GOOD_CONTROL, b""], None, ["magic b'PLC1' has 3 parts"]),
    ("parts", [FRAME_MAGIC, "header", b""], None, ["part 1 is a str, not a byte buffer"]),
    ("parts", 42, None, ["message is a int"]),
    ("magic", [b"PLF2", *GOOD_FRAME[1:]], None, ["b'PLF2'", "frame magic"]),
    ("magic", [b"hello", b"x"], None, ["b'hello'", "control message magic"]),
    ("header_too_large", GOOD_FRAME, TINY, [f"frame header is {len(GOOD_FRAME[1])} bytes, the limit is 64"]),
    ("header_undecodable", [FRAME_MAGIC, b"\xc1", JPEG], None, ["frame header is not valid msgpack"]),
    ("header_undecodable", [FRAME_MAGIC, GOOD_FRAME[1] + b"\x00", JPEG], None, ["extra data"]),
    ("header_undecodable", [FRAME_MAGIC, GOOD_FRAME[1][:-1], JPEG], None, ["incomplete"]),
    ("header_undecodable", [FRAME_MAGIC, msgpack.packb({"v": msgpack.ExtType(5, b"x")}), JPEG], None,
     ["frame header is not valid msgpack"]),
    ("header_undecodable", [FRAME_MAGIC, msgpack.packb({1: 2}), JPEG], None, ["not valid msgpack"]),
    ("header_invalid", [FRAME_MAGIC, msgpack.packb([1, 2]), JPEG], None, ["message: Input should be"]),
    ("payload_too_large", [FRAME_MAGIC, GOOD_FRAME[1], JPEG], Limits(max_payload_bytes=100),
     [f"payload is {len(JPEG)} bytes, the limit is 100"]),
    ("payload_mismatch", frame_parts(width=64), None, ["jpeg payload is 32x24, header says 64x24"]),
    ("payload_mismatch", frame_parts(nbytes=6)[:2] + [JPEG[:4] + b"\xff\xd9"], None,
     ["jpeg payload: JPEG without a frame header (SOF)"]),
    ("payload_mismatch", [FRAME_MAGIC, GOOD_FRAME[1], JPEG[:-1]], None,
     [f"header nbytes {len(JPEG)} but the payload has {len(JPEG) - 1} bytes"]),
    ("payload_mismatch", frame_parts(nbytes=len(PNG))[:2] + [PNG], None,
     ["header says jpeg but the payload is a png image"]),
    ("payload_mismatch", frame_parts(encoding="png")[:2] + [JPEG], None,
     ["header says png but the payload is a jpeg image"]),
    ("payload_mismatch", frame_parts(encoding="raw"), None, ["raw 32x24x3 uint8 needs 2304 bytes"]),
    ("payload_mismatch", frame_parts(encoding="raw", dtype="uint16", nbytes=2304)[:2] + [bytes(2304)], None,
     ["raw 32x24x3 uint16 needs 4608 bytes, payload has 2304"]),
    ("payload_mismatch", frame_parts(dropped="queue_full"), None, ["dropped frame (queue_full) must have an empty"]),
    ("payload_mismatch", frame_parts(nbytes=0)[:2] + [b""], None, ["payload is empty but the frame is not marked"]),
    ("control_too_large", GOOD_CONTROL, TINY, [f"control body is {len(GOOD_CONTROL[1])} bytes, the limit is 16"]),
    ("control_undecodable", [CONTROL_MAGIC, b"\xc1\xff"], None, ["control body is not valid msgpack"]),
    ("control_undecodable", [CONTROL_MAGIC, msgpack.packb({"t": msgpack.Timestamp(1, 0)})], None, ["max_ext_len"]),
    ("control_undecodable", [CONTROL_MAGIC, b"\xa2\xff\xfe"], None, ["not valid msgpack"]),
    ("control_invalid", control_parts({"type": "reboot"}), None, ["'reboot'", "'hello', 'heartbeat', 'done'"]),
    ("control_invalid", control_parts({"worker": "w"}), None, ["discriminator 'type'"]),
    ("control_invalid", control_parts({"type": "done", "keys": []}), None, ["done.keys: List should have at least 1"]),
    ("control_invalid", control_parts({"type": "done", "keys": [["st1", "top"]]}), None, ["done.keys.0"]),
    ("control_invalid", control_parts({"type": "done", "keys": [["st1", "top", "3"]]}), None, ["done.keys.0.2"]),
    ("control_invalid", control_parts({"type": "hello", "worker": "w", "session": "no spaces", "capacity": 1}), None,
     ["hello.session: String should match pattern"]),
    ("control_invalid", control_parts({"type": "hello", "worker": "w", "session": "s", "capacity": 0}), None,
     ["hello.capacity: Input should be greater than or equal to 1"]),
    ("control_invalid", control_parts({"type": "trigger", "lot": "L/1", "cell": None, "station": None}), None,
     ["trigger.lot: Value error, lot 'L/1'"]),
    ("control_invalid", control_parts(["hello"]), None, ["message: Input should be"]),
]


@pytest.mark.parametrize(("kind", "parts", "limits", "texts"), BAD_MESSAGES,
                         ids=[f"{kind}-{i}" for i, (kind, *_) in enumerate(BAD_MESSAGES)])
def test_each_bad_message_is_refused_with_its_kind_and_reason(kind: str, parts: object, limits: Limits | None,
                                                              texts: list[str]) -> None:
    error = refusal(parts, limits)
    assert error.kind == kind, str(error)
    for text in texts:
        assert text in str(error)


def test_undecodable_and_misdescribed_payloads_are_caught_by_image() -> None:
    sof = JPEG.index(b"\xff\xc0")
    garbage = JPEG[: sof + 2 + int.from_bytes(JPEG[sof + 2:sof + 4], "big")] + bytes(200) + b"\xff\xd9"  # a size, then no scan
    frame = decode(frame_parts(nbytes=len(garbage))[:2] + [garbage])
    assert isinstance(frame, Frame)
    with pytest.raises(ProtocolError, match="cannot be decoded") as caught:
        frame.image()
    assert caught.value.kind == "payload_undecodable"
    frame = decode(frame_parts(channels=1))  # the JPEG is in colour
    assert isinstance(frame, Frame)
    with pytest.raises(ProtocolError, match=r"decodes to \(24, 32, 3\) uint8, header says \(24, 32\) uint8") as caught:
        frame.image()
    assert caught.value.kind == "payload_mismatch"


def test_every_error_kind_is_produced_by_some_bad_message() -> None:
    produced = {kind for kind, *_ in BAD_MESSAGES} | {"payload_undecodable"}
    # "unexpected" is the transport's; the arena kinds come from resolving references (test_arena.py),
    # the verdict kinds from verdict messages (test_inspect.py)
    verdict_kinds = {kind for kind in PROTOCOL_ERROR_KINDS if kind.startswith("verdict_")}
    assert produced == set(PROTOCOL_ERROR_KINDS) - {"unexpected", "arena_invalid", "arena_stale"} - verdict_kinds


def test_protocol_errors_have_known_kinds_and_survive_copying() -> None:
    with pytest.raises(ValueError, match="unknown protocol error kind 'oops'"):
        ProtocolError("oops", "x")
    error = copy.deepcopy(ProtocolError("magic", "first part is wrong"))
    assert error.kind == "magic" and str(error) == "first part is wrong"


# -- RejectCounter ----------------------------------------------------------------------------------
def test_reject_counter_logs_the_first_of_each_kind_once(caplog: pytest.LogCaptureFixture) -> None:
    counter = RejectCounter()
    with caplog.at_level(logging.WARNING, logger="pouchline.station.protocol"):
        for i in range(3):
            counter.record(ProtocolError("magic", f"bad magic #{i}"))
        counter.record(ProtocolError("parts", "too many parts"))
        counter.record(ProtocolError("parts", "too few parts"))
    warnings = [r for r in caplog.records if r.name == "pouchline.station.protocol"]
    assert [r.levelno for r in warnings] == [logging.WARNING] * 2
    assert "bad magic #0" in warnings[0].getMessage() and "too many parts" in warnings[1].getMessage()
    assert counter.counts == {"magic": 3, "parts": 2} and counter.total == 5
    counter.counts["magic"] = 0
    assert counter.counts["magic"] == 3, "counts is a copy"


def test_reject_counter_is_thread_safe() -> None:
    counter = RejectCounter()
    error = ProtocolError("parts", "x")

    def hammer() -> None:
        for _ in range(2000):
            counter.record(error)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.counts == {"parts": 8000} and counter.total == 8000


# -- fuzzing ----------------------------------------------------------------------------------------
FUZZ = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
           | st.binary(max_size=12) | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
HEADER_BODY = header(truth=TRUTH).model_dump()
CONTROL_TYPES = st.sampled_from(["hello", "heartbeat", "done", "trigger", "HELLO", ""])


def _packed(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


RANDOM_PARTS = st.one_of(
    st.lists(st.binary(max_size=40), max_size=5),
    st.lists(st.sampled_from([FRAME_MAGIC, CONTROL_MAGIC, REFERENCE_MAGIC, b"", b"PLF", JPEG[:4]])
             | st.binary(max_size=8), max_size=4),
    st.tuples(st.dictionaries(st.text(max_size=10), VALUES, max_size=6).map(_packed), st.binary(max_size=40))
    .map(lambda p: [FRAME_MAGIC, *p]),
    st.dictionaries(st.text(max_size=10), VALUES, max_size=6).map(lambda d: [CONTROL_MAGIC, _packed(d)]),
    VALUES.map(lambda v: [CONTROL_MAGIC, _packed(v)]),
    st.dictionaries(st.sampled_from(["worker", "sender", "session", "capacity", "busy", "keys", "lot", "cell",
                                     "station"]), VALUES, max_size=5)
    .flatmap(lambda d: CONTROL_TYPES.map(lambda t: [CONTROL_MAGIC, _packed({"type": t, **d})])),
    st.dictionaries(st.sampled_from(sorted(HEADER_BODY)), VALUES, min_size=1, max_size=3)
    .map(lambda wrong: [FRAME_MAGIC, _packed({**HEADER_BODY, **wrong}), JPEG]),
    # Frames by reference: offsets, generations and tags, right or wrong, into a real arena.
    st.tuples(st.sampled_from([64, 65, 128, 0, 2**40]), st.sampled_from([1, 2, 0, 2**63]),
              st.sampled_from([b"fuzz0000", b"other___"]), st.sampled_from([0, 1, 2, 200, 10**6]))
    .map(lambda r: [REFERENCE_MAGIC, _packed({**HEADER_BODY, "nbytes": len(JPEG) + r[3] - 1 if r[3] else len(JPEG)}),
                    REFERENCE.pack(r[0] if r[0] < 2**40 else r[0] - 1, r[1] if r[1] < 2**63 else r[1] - 1, r[2])]),
    st.binary(max_size=30).map(lambda ref: [REFERENCE_MAGIC, _packed(HEADER_BODY), ref]),
)


@pytest.fixture(scope="module", autouse=True)
def fuzz_arena():
    """A real arena holding the test JPEG at offset 64 (generation 1): what references point into."""
    global _ARENA
    writer = ArenaWriter("fuzz", "fuzz0000", 1 << 20)
    assert writer.put(memoryview(JPEG)).offset == 64
    _ARENA = ArenaReader(writer.name, "fuzz0000")
    yield
    _ARENA.close()
    writer.close()


_ARENA: ArenaReader | None = None


def _fuzz(run: Callable[..., None]) -> Counter[str]:
    """Runs hypothesis ``run(check, ...)``; every refusal goes to a RejectCounter that must count them all."""
    counter, seen = RejectCounter(), Counter[str]()

    def check(parts: object) -> None:
        try:
            message = decode(parts)  # type: ignore[arg-type]
        except ProtocolError as error:
            seen[error.kind] += 1
            counter.record(error)
            return
        try:
            _assert_valid(message)
        except ProtocolError as error:  # from Frame.image()
            seen[error.kind] += 1
            counter.record(error)

    run(check)
    assert counter.total == sum(seen.values()) > 0
    assert counter.counts == dict(seen)
    return seen


def _assert_valid(message: object) -> None:
    """Whatever decode accepts is consistent, re-encodable, and decodes to itself again."""
    if isinstance(message, FrameRef):
        assert _ARENA is not None
        message = message.resolve(_ARENA)  # ProtocolError (counted) for a reference that lies
        assert bytes(message.payload) == JPEG
    if isinstance(message, Frame):
        assert len(message.payload) == message.header.nbytes
        assert decode(encode_frame(message.header, message.payload)) == message
        if message.header.dropped is None:
            image = message.image()
            assert image.shape == message.header.shape and image.dtype == message.header.dtype
    else:
        assert isinstance(message, Hello | Heartbeat | Done | Trigger)
        assert decode(encode_control(message)) == message


def test_fuzz_random_part_lists(caplog: pytest.LogCaptureFixture) -> None:
    def run(check: Callable[[object], None]) -> None:
        FUZZ(given(RANDOM_PARTS)(check))()

    seen = _fuzz(run)
    assert {"parts", "magic", "header_undecodable", "header_invalid", "control_invalid", "arena_invalid"} <= set(seen), seen
    assert sum(1 for r in caplog.records if r.name == "pouchline.station.protocol") == len(seen), "once per kind"


VALID_MESSAGES = [[bytes(part) for part in encode_frame(*sent)] for sent in FRAMES.values()] + [
    encode_control(message) for message in CONTROLS
]


def _flip(draw: st.DrawFn, parts: list[bytes]) -> list[bytes]:
    index = draw(st.integers(0, len(parts) - 1))
    if not parts[index]:
        return parts
    data = bytearray(parts[index])
    position = draw(st.integers(0, len(data) - 1))
    data[position] ^= 1 << draw(st.integers(0, 7))
    return [*parts[:index], bytes(data), *parts[index + 1:]]


def _truncate(draw: st.DrawFn, parts: list[bytes]) -> list[bytes]:
    index = draw(st.integers(0, len(parts) - 1))
    return [*parts[:index], parts[index][: draw(st.integers(0, max(0, len(parts[index]) - 1)))], *parts[index + 1:]]


def _extend(draw: st.DrawFn, parts: list[bytes]) -> list[bytes]:
    index = draw(st.integers(0, len(parts) - 1))
    return [*parts[:index], parts[index] + draw(st.binary(min_size=1, max_size=16)), *parts[index + 1:]]


def _edit_field(draw: st.DrawFn, parts: list[bytes]) -> list[bytes]:
    """Delete, replace or add one field of the msgpack body (nested one level too)."""
    if len(parts) < 2:
        return parts
    try:
        body = msgpack.unpackb(parts[1], raw=False)
    except Exception:
        return parts
    if not isinstance(body, dict):
        return parts
    target = body
    nested = [key for key, value in body.items() if isinstance(value, dict)]
    if nested and draw(st.booleans()):
        target = body[draw(st.sampled_from(nested))]
    action = draw(st.sampled_from(["delete", "replace", "add"]))
    if action == "add" or not target:
        target[draw(st.text(max_size=10))] = draw(VALUES)
    elif action == "delete":
        del target[draw(st.sampled_from(sorted(target, key=str)))]
    else:
        target[draw(st.sampled_from(sorted(target, key=str)))] = draw(VALUES)
    return [parts[0], _packed(body), *parts[2:]]


def _resize_payload(draw: st.DrawFn, parts: list[bytes]) -> list[bytes]:
    """Truncate or extend the payload *and* fix nbytes, so the checks behind the length check run."""
    if len(parts) != 3:
        return parts
    try:
        body = msgpack.unpackb(parts[1], raw=False)
    except Exception:
        return parts
    size = draw(st.integers(0, len(parts[2]) + 8))
    payload = (parts[2] + draw(st.binary(min_size=8, max_size=8)))[:size]
    if not isinstance(body, dict):
        return parts
    return [parts[0], _packed({**body, "nbytes": size}), payload]


def _shuffle(draw: st.DrawFn, parts: list[bytes]) -> list[bytes]:
    return draw(st.permutations(parts))


def _drop_or_repeat(draw: st.DrawFn, parts: list[bytes]) -> list[bytes]:
    index = draw(st.integers(0, len(parts) - 1))
    if draw(st.booleans()):
        return [*parts[:index], *parts[index + 1:]]
    return [*parts[:index], parts[index], *parts[index:]]


MUTATIONS = [_flip, _flip, _truncate, _extend, _edit_field, _edit_field, _resize_payload, _resize_payload,
             _shuffle, _drop_or_repeat]


@st.composite
def mutated_messages(draw: st.DrawFn) -> list[bytes]:
    parts = list(draw(st.sampled_from(VALID_MESSAGES)))
    for _ in range(draw(st.integers(1, 3))):
        if parts:
            parts = draw(st.sampled_from(MUTATIONS))(draw, parts)
    return parts


def test_fuzz_mutated_valid_messages() -> None:
    def run(check: Callable[[object], None]) -> None:
        FUZZ(given(mutated_messages())(check))()

    seen = _fuzz(run)
    deep = {"header_undecodable", "header_invalid", "payload_mismatch", "payload_undecodable", "control_undecodable",
            "control_invalid"}
    # The mutations reach past the framing into the header and payload checks (which deep
    # kinds a run hits varies a little with how hypothesis schedules its examples).
    assert len(deep & set(seen)) >= 4, seen


def test_valid_messages_decode_in_the_fuzz_harness() -> None:
    """The harness itself: every unmutated message passes, so the fuzz tests measure decode, not the harness."""
    for parts in VALID_MESSAGES:
        _assert_valid(decode(parts))


def test_headers_are_immutable_and_keyed() -> None:
    sent = header(seq=9)
    assert sent.key == ("st1", "top", 9)
    with pytest.raises(ValidationError):
        sent.seq = 10  # type: ignore[misc]


# -- the fast paths accept exactly what the models accept ---------------------------------------
#: Values that equal valid ones without being valid (True == 1 == 1.0), or nearly pass a check.
TRICKY = st.sampled_from([True, False, 0, 1, 1.0, 2, 3, 3.0, -1, 24, 32, 2**63 - 1, 2**63, 1.5, -0.0, float("nan"),
                          float("inf"), "C-1", "C-1\n", "\nC-1", "C 1", "", "x" * 128, "x" * 129, "top", "jpeg",
                          "raw", "uint16", "source", None, [1], {"a": 1}])
PLAIN_BODY = header().model_dump()
#: Other valid values per field (or nearly: some combinations are refused, like png + uint16).
ALTERNATIVES = {
    "station": ["st2", "a" * 128], "camera": ["side", "0"], "lot": ["LOT-2", "l.1_x"], "cell": ["C-2", "c_9.x"],
    "view": ["side"], "views": [1, 16], "seq": [0, 2**63 - 1], "t_mono_ns": [0, 7], "t_wall": [0.0, 2.5e9, 3],
    "exposure": [None, 0.5, 800], "gain": [None, -2.0, 0, 1], "trigger": ["external", "presence"],
    "encoding": ["png", "raw"], "width": [1, 16384], "height": [1, 24], "channels": [1, 3], "dtype": ["uint16"],
    "nbytes": [0, 7], "dropped": ["queue_full", None], "v": [1],
}


def _verdict(validate: Callable[[object], Any], body: object) -> tuple[Any, ...]:
    """What a validator makes of ``body``: the model's values with their exact types, or the errors."""
    try:
        model = validate(body)
    except ValidationError as error:
        return ("refused", [(item["loc"], item["type"]) for item in error.errors()])
    return ("accepted", [(name, type(value), value) for name, value in model.model_dump().items()])


@st.composite
def edited_headers(draw: st.DrawFn) -> dict[str, Any]:
    body = dict(PLAIN_BODY)
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "add":
            body[draw(st.sampled_from(["exposre", "extra", "Cell"]))] = draw(TRICKY)
        elif action == "delete" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        else:
            name = draw(st.sampled_from(sorted(ALTERNATIVES)))
            body[name] = draw(st.sampled_from(ALTERNATIVES[name]) | st.sampled_from(ALTERNATIVES[name]) | TRICKY | VALUES)
    return body


def test_fast_header_validation_agrees_with_the_model() -> None:
    """`HeaderValidator` (what stations and workers use per frame) vs pydantic on thousands of
    edited headers, with its cache warmed by the same stream: same model or same errors, always."""
    validator = HeaderValidator()
    validator.validate(PLAIN_BODY)
    verdicts: Counter[str] = Counter()

    @FUZZ
    @given(edited_headers())
    def check(body: dict[str, Any]) -> None:
        expected = _verdict(FrameHeader.model_validate, body)
        assert _verdict(validator.validate, body) == expected
        assert _verdict(validator.validate, body) == expected  # again, now that it may be cached
        verdicts[expected[0]] += 1

    check()
    assert verdicts["accepted"] > 100 and verdicts["refused"] > 100, verdicts


def test_header_stamps_agree_with_the_model() -> None:
    """`HeaderStamp` (what capture loops use) vs pydantic on the same edited headers: a stamp made
    of the repeating fields and stamped with the frame's own gives the model's header or refuses
    what the model refuses, naming fields the model names."""
    verdicts: Counter[str] = Counter()

    @FUZZ
    @given(edited_headers())
    def check(body: dict[str, Any]) -> None:
        expected = _verdict(FrameHeader.model_validate, body)
        own = {name: body[name] for name in HeaderValidator.PER_FRAME if name in body}
        repeating = {name: value for name, value in body.items() if name not in HeaderValidator.PER_FRAME}
        try:
            stamp = HeaderStamp(**repeating)
        except ValidationError as error:
            assert expected[0] == "refused"
            # Field by field the same; a whole-model rule (jpeg is uint8) may speak first here, where
            # the per-frame fields are placeholders the model would have refused before it.
            assert {(item["loc"], item["type"]) for item in error.errors() if item["loc"]} <= set(expected[1])
            verdicts["refused by the stamp"] += 1
            return
        if len(own) < len(HeaderValidator.PER_FRAME):
            assert expected[0] == "refused"  # a field is missing; stamp() cannot even be called without it
            return
        assert _verdict(lambda _: stamp.stamp(**own), body) == expected
        verdicts[expected[0]] += 1

    check()
    assert verdicts["accepted"] > 100 and verdicts["refused"] > 50 and verdicts["refused by the stamp"] > 50, verdicts


def test_a_header_stamp_takes_only_what_repeats() -> None:
    fields = header().model_dump()
    with pytest.raises(ValueError, match="nbytes, seq, t_mono_ns, t_wall change per frame"):
        HeaderStamp(**{name: value for name, value in fields.items() if name != "cell"})
    repeating = {name: value for name, value in fields.items() if name not in HeaderValidator.PER_FRAME}
    with pytest.raises(ValueError, match="ground truth"):
        HeaderStamp(**{**repeating, "truth": TRUTH})
    with pytest.raises(ValidationError, match="lot"):
        HeaderStamp(**{**repeating, "lot": "LOT 1"})
    stamp = HeaderStamp(**repeating)
    assert stamp.stamp("C-1", 5, 123_456_789, 1_700_000_000.5, len(JPEG)) == header()
    with pytest.raises(ValidationError, match="cell"):
        stamp.stamp("C-1\n", 5, 123_456_789, 1_700_000_000.5, len(JPEG))


@st.composite
def edited_done_bodies(draw: st.DrawFn) -> object:
    valid = st.tuples(st.sampled_from(["st1", "a" * 128, "0"]), st.sampled_from(["top", "s.2"]),
                      st.sampled_from([0, 7, 2**63 - 1])).map(list)
    odd = st.lists(TRICKY | st.sampled_from(["st1", "top", 7]), min_size=2, max_size=4)
    keys = st.lists(valid | valid | valid | odd, max_size=3)
    body: dict[str, Any] = {"type": draw(st.sampled_from(["done", "done", "done", "hello", "DONE", 1])),
                            "keys": draw(keys | keys | TRICKY)}
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.sampled_from(["extra", "type"]))] = draw(TRICKY)
    return body


def test_fast_done_validation_agrees_with_the_model() -> None:
    """A worker's `done` (one per batch) is decoded by a fast path: same message or same errors as pydantic."""
    verdicts: Counter[str] = Counter()

    @FUZZ
    @given(edited_done_bodies())
    def check(body: object) -> None:
        try:
            expected: object = _CONTROL.validate_python(body)
        except ValidationError:
            expected = None
        try:
            got: object = decode(control_parts(body))
        except ProtocolError as error:
            assert error.kind == "control_invalid", error
            got = None
        assert got == expected and type(got) is type(expected)
        verdicts["accepted" if expected is not None else "refused"] += 1

    check()
    assert verdicts["accepted"] > 50 and verdicts["refused"] > 50, verdicts
    keys = [("st1", "top", 1), ("st1", "side", 2)]
    assert done_message(keys) == Done(type="done", keys=keys)
    with pytest.raises(ValidationError):
        done_message([("st1", "top\n", 1)])


@pytest.mark.parametrize("field", ["station", "camera", "lot", "cell", "view"])
def test_identifiers_with_a_trailing_newline_are_refused(field: str) -> None:
    """``$`` in a Python regex matches before a final newline: ids are matched whole."""
    error = refusal(frame_parts(**{field: "C-1\n"}))
    assert error.kind == "header_invalid" and field in str(error)


def test_a_batch_splits_into_its_frames_and_nothing_else() -> None:
    one = encode_frame(*FRAMES["jpeg"])
    assert split_batch(one * 3) == [one, one, one]
    assert split_batch(one) == [one]
    for odd in (one * 2 + one[:1], one * (MAX_BATCH + 1), control_parts({"type": "done"})):
        assert split_batch(odd) == [odd]  # for decode to refuse or take as one message
    assert refusal(one * (MAX_BATCH + 1)).kind == "parts"
