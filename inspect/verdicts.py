"""Verdict messages: workers -> collector -> controller, validated like frames are.

Three hops, four ZeroMQ multipart messages (every body msgpack, every field strict):

- ``[FRAME_VERDICT_MAGIC, FrameVerdict, *attachments]``: a worker's verdict on one view;
- ``[STATS_MAGIC, WorkerStats]``: a worker's counters and histograms, once a second;
- ``[CELL_VERDICT_MAGIC, CellVerdict, *attachments]``: the collector's verdict on a whole cell;
- ``[ACK_MAGIC, Ack]``: the controller has stored cell verdicts (the collector resends until then).

Attachments (the original JPEG, a heat-map overlay PNG) travel as their own parts, listed in
the body with size and SHA-256, so a receiver checks them without trusting the sender. The
error kinds are those of `pouchline.station.protocol` (``verdict_*``), counted the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError

from pouchline.station.protocol import (
    WIRE,
    FrameTruth,
    Identifier,
    ProtocolError,
    as_bytes,
    check_size,
    describe_errors,
    pack_model,
    unpack_body,
)

FRAME_VERDICT_MAGIC = b"PLV1"
STATS_MAGIC = b"PLS1"
CELL_VERDICT_MAGIC = b"PLK1"
ACK_MAGIC = b"PLA1"

MAX_BODY_BYTES = 1024 * 1024
MAX_ATTACHMENT_BYTES = 64 * 1024 * 1024
MAX_ATTACHMENTS = 64

Decision = Literal["pass", "reject"]
#: What became of one view. Everything but ``ok`` (and ``skipped``) rejects the cell.
FrameStatus = Literal[
    "ok",  # inspected; the decision follows the model
    "no_cell",  # no cell in view
    "partial_cell",  # the cell touches the image border
    "dropped",  # the station dropped the frame (queue full, redelivery limit, missed trigger)
    "refused",  # the frame message was malformed (counted by kind)
    "undecodable",  # the image bytes could not be decoded
    "too_large",  # the image has more pixels than the worker's limit
    "unsupported_view",  # no model for this view
    "skipped",  # a view this service is configured not to judge
    "error",  # inference failed
]
Score = Annotated[float, Field(allow_inf_nan=False)]
#: msgpack has no tuples: points and boxes are short lists.
Point = Annotated[list[Score], Field(min_length=2, max_length=2)]
Box = Annotated[list[Score], Field(min_length=4, max_length=4)]
MAX_OUTLINE_POINTS = 256


class ModelRef(BaseModel):
    """Which model judged: enough to find its file and metadata again."""

    model_config = WIRE

    name: str = Field(max_length=200, description="Model name from its metadata.")
    version: str = Field(max_length=200, description="Model version from its metadata.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the .onnx file.")
    precision: Literal["fp32", "int8"] = Field(description="Numeric precision of the graph.")


class ShadowResult(BaseModel):
    """What a shadow model said about the same frame; logged and counted, never acted on."""

    model_config = WIRE

    model: ModelRef = Field(description="The shadow model.")
    decision: Decision = Field(description="The decision the shadow model would have made.")
    reasons: list[str] = Field(max_length=16, description="Its reasons.")
    probs: dict[str, Score] = Field(description="Its probabilities.")


class Attachment(BaseModel):
    """An image carried as an extra message part."""

    model_config = WIRE

    kind: Literal["image", "overlay"] = Field(
        description="'image': the frame as captured (JPEG/PNG bytes); 'overlay': the heat map as a transparent PNG "
        "layer to stack on the image (same aspect, smaller)."
    )
    camera: Identifier = Field(description="Camera whose frame this is.")
    media_type: Literal["image/jpeg", "image/png"] = Field(description="Content type of the bytes.")
    part: int = Field(ge=0, lt=MAX_ATTACHMENTS, description="Index among the message's attachment parts.")
    nbytes: int = Field(ge=1, le=MAX_ATTACHMENT_BYTES, description="Length of the part.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the part (content address in the store).")


class _OfCell(BaseModel):
    """Fields naming the cell, shared by frame and cell verdicts."""

    model_config = WIRE

    v: Literal[1] = Field(1, description="Message version.")
    station: Identifier = Field(description="Station that captured the cell.")
    lot: Identifier = Field(description="Lot of the cell.")
    cell: Identifier = Field(description="Cell id.")

    @property
    def cell_id(self) -> str:
        """``station/lot/cell``: the cell's id across the line (what the controller deduplicates on)."""
        return f"{self.station}/{self.lot}/{self.cell}"


class FrameVerdict(_OfCell):
    """A worker's verdict on one view of one cell."""

    camera: Identifier = Field(description="Camera within the station.")
    view: Identifier = Field(description="View of the cell (top, side, ...).")
    views: int = Field(ge=1, le=16, description="Views the cell has in all.")
    seq: int = Field(ge=0, description="The frame's per-camera sequence number.")
    t_capture: float = Field(ge=0, description="Capture time, Unix seconds (station clock).")
    status: FrameStatus = Field(description="What became of the view.")
    decision: Decision = Field(description="pass or reject for this view.")
    reasons: list[str] = Field(max_length=16, description="Why it is rejected: flags ('swollen', 'deformed', "
                                                          "'anomaly') or the status and its detail.")
    detail: str = Field("", max_length=2000, description="Human-readable detail for a non-ok status.")
    probs: dict[str, Score] = Field(default_factory=dict, description="Model probabilities per output.")
    anomaly: Score | None = Field(None, description="Anomaly score (Mahalanobis distance).")
    swelling_mm: Score | None = Field(None, description="Estimated swelling in mm.")
    swelling_pct: Score | None = Field(None, description="Swelling in % of nominal thickness.")
    regions: list[Annotated[list[Point], Field(max_length=MAX_OUTLINE_POINTS)]] = Field(default_factory=list, max_length=64,
                                       description="Defect outlines from the heat map, frame pixel coordinates.")
    boxes: list[Box] = Field(default_factory=list, max_length=64, description="Bounding box [x, y, w, h] of each region.")
    cell_corners: Annotated[list[Point], Field(min_length=4, max_length=4)] | None = Field(
        None, description="The located cell's rectangle, frame pixel coordinates."
    )
    model: ModelRef | None = Field(None, description="The model that judged (None if none ran).")
    shadow: ShadowResult | None = Field(None, description="The shadow model's opinion, if one runs.")
    timings_ms: dict[str, Score] = Field(default_factory=dict,
                                         description="queue, decode, locate, infer, post and total, in ms.")
    worker: Identifier = Field(description="Worker that judged.")
    truth: FrameTruth | None = Field(None, description="Ground truth from the source, passed through for live scoring.")
    attachments: list[Attachment] = Field(default_factory=list, max_length=4, description="Images carried along.")

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.station, self.camera, self.seq)


class CellVerdict(_OfCell):
    """The inspection service's verdict on a whole cell: worst view wins."""

    decision: Decision = Field(description="pass only when every expected view was inspected and passed.")
    reasons: list[str] = Field(max_length=64, description="Union of the views' reasons, plus 'missing_view' on a "
                                                          "deadline miss.")
    views_expected: int = Field(ge=1, le=16, description="Views the cell should have.")
    frames: list[FrameVerdict] = Field(max_length=16, description="The views that arrived, by camera.")
    t_capture: float = Field(ge=0, description="Earliest capture time of its views.")
    t_decided: float = Field(ge=0, description="When the collector decided, Unix seconds.")
    audit: bool = Field(False, description="A passed cell sampled for audit (its images are attached).")


class Histogram(BaseModel):
    """Cumulative-free bucket counts (Prometheus turns them cumulative)."""

    model_config = WIRE

    bounds: list[Score] = Field(max_length=64, description="Upper bounds of the buckets (the last is +Inf, implied).")
    counts: list[int] = Field(max_length=65, description="Observations per bucket, one more than bounds.")
    total: Score = Field(description="Sum of the observations.")


class WorkerStats(BaseModel):
    """A worker's running totals, sent once a second."""

    model_config = WIRE

    v: Literal[1] = Field(1, description="Message version.")
    worker: Identifier = Field(description="Worker name.")
    pid: int = Field(ge=0, description="Process id.")
    counters: dict[str, int] = Field(description="Monotonic counters: frames, verdicts, drops by reason, ...")
    histograms: dict[str, Histogram] = Field(description="batch_size, latency and stage timings.")
    held: int = Field(ge=0, description="Frames received and not yet done (queue depth).")
    model: ModelRef | None = Field(description="The live model.")
    more_models: list[ModelRef] = Field(default_factory=list, max_length=16,
                                        description="The live models of further views (`more_models`).")
    shadow: ModelRef | None = Field(None, description="The shadow model, if any.")


class Ack(BaseModel):
    """The controller stored these cells' verdicts (durably)."""

    model_config = WIRE

    type: Literal["ack"] = Field("ack", description="Message type.")
    cells: list[str] = Field(min_length=1, max_length=4096, description="station/lot/cell of each stored verdict.")


_MODELS: dict[bytes, type[BaseModel]] = {
    FRAME_VERDICT_MAGIC: FrameVerdict, STATS_MAGIC: WorkerStats, CELL_VERDICT_MAGIC: CellVerdict, ACK_MAGIC: Ack,
}
_WITH_ATTACHMENTS = (FRAME_VERDICT_MAGIC, CELL_VERDICT_MAGIC)


def attachment(kind: Literal["image", "overlay"], camera: str, data: bytes, part: int) -> Attachment:
    """Describe ``data`` as attachment part ``part``."""
    media = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
    return Attachment(kind=kind, camera=camera, media_type=media, part=part, nbytes=len(data),
                      sha256=hashlib.sha256(data).hexdigest())


def encode(message: BaseModel, attachments: Sequence[bytes] = ()) -> list[bytes]:
    """``[magic, body, *attachments]``; refuses what a receiver would refuse."""
    magic = next(magic for magic, model in _MODELS.items() if isinstance(message, model))
    if attachments and magic not in _WITH_ATTACHMENTS:
        raise ValueError(f"{type(message).__name__} messages carry no attachments")
    return [magic, pack_model(message, MAX_BODY_BYTES, type(message).__name__), *attachments]


def _described(message: BaseModel) -> list[Attachment]:
    if isinstance(message, FrameVerdict):
        return list(message.attachments)
    if isinstance(message, CellVerdict):
        return [item for frame in message.frames for item in frame.attachments]
    return []


def decode(parts: Sequence[object], *, verify_hashes: bool = True) -> tuple[BaseModel, list[memoryview]]:
    """A validated verdict message and its attachment parts; `ProtocolError` (``verdict_*``,
    ``magic``, ``parts``) for anything else.

    ``verify_hashes=False`` checks attachment sizes but not their SHA-256: for a relay (the
    collector) whose receiver hashes the bytes anyway to store them by content address."""
    views = [as_bytes(part, index) for index, part in enumerate(parts)]
    if len(views) < 2:
        raise ProtocolError("parts", f"verdict message has {len(views)} parts, at least 2 expected")
    magic, extra = bytes(views[0][:16]), views[2:]
    model = _MODELS.get(magic)
    if model is None:
        raise ProtocolError("magic", f"first part {magic!r} is not a verdict magic")
    if extra and magic not in _WITH_ATTACHMENTS or len(extra) > MAX_ATTACHMENTS:
        raise ProtocolError("parts", f"{model.__name__} message with {len(extra)} attachment parts")
    check_size(views[1], MAX_BODY_BYTES, "verdict_too_large", f"{model.__name__} body")
    body = unpack_body(views[1], MAX_BODY_BYTES, "verdict_undecodable", f"{model.__name__} body")
    try:
        message = model.model_validate(body)
    except ValidationError as error:
        raise ProtocolError("verdict_invalid", f"{model.__name__}: {describe_errors(error)}") from error
    _check_attachments(message, extra, verify_hashes)
    return message, extra


def _check_attachments(message: BaseModel, parts: list[memoryview], verify_hashes: bool) -> None:
    described = _described(message)
    if sorted(item.part for item in described) != list(range(len(parts))):
        raise ProtocolError("verdict_invalid", f"{type(message).__name__} lists attachment parts "
                                               f"{sorted(item.part for item in described)} but carries {len(parts)}")
    for item in described:
        data = parts[item.part]
        check_size(data, MAX_ATTACHMENT_BYTES, "verdict_too_large", f"attachment {item.part}")
        if len(data) != item.nbytes or (verify_hashes and hashlib.sha256(data).hexdigest() != item.sha256):
            raise ProtocolError("verdict_invalid", f"attachment {item.part} ({item.kind} of {item.camera}) does not "
                                                   f"match its size or sha256")
