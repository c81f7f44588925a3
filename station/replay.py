"""Replay of a recorded dataset as a station source, at its recorded timing or faster.

The stored image files go out unchanged, tagged with their cell and carrying the record's
truth, so a recording of a real line can be run through the inspection workers again with
the same bytes the camera produced.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pouchline.datasets.manifest import DatasetError, DatasetReader, sha256_bytes
from pouchline.datasets.records import FrameRecord, View
from pouchline.station.sourcebase import BufferPolicy, CellTag, Pacer, SourceError, SourceFrame, encoded_frame


class ReplayConfig(BaseModel):
    """A dataset folder played back as a stream of cells."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["replay"] = Field(description="Source kind.")
    path: Path = Field(description="Dataset folder (dataset.json + manifest.jsonl).")
    speed: float = Field(
        1.0, gt=0, description="Playback speed: 1 = the recorded timing (records' timestamps), N = N times faster."
    )
    fast: bool = Field(False, description="As fast as possible, ignoring the recorded timing.")
    views: list[View] | None = Field(None, description="Replay only these views; none = every view.")
    loop: bool = Field(False, description="Start again after the last record instead of ending the stream.")


class ReplaySource:
    """The dataset's frames in manifest order.

    A counting pass at ``open()`` gives each cell its number of frames (after the views
    filter), so a worker knows when it has all of a cell; then the manifest is streamed, never
    loaded whole. Timing keeps the recording's gaps between frames (divided by ``speed``);
    the jump from the last record back to the first when looping has no gap.
    """

    policy: BufferPolicy = "every"

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self.name = f"replay:{config.path}"
        self._reader: DatasetReader | None = None
        self._views: Counter[str] = Counter()
        self._records: Iterator[FrameRecord] = iter(())
        self._pacer = Pacer()
        self._offset_s = 0.0
        self._previous: float | None = None

    def open(self) -> None:
        """Check the dataset, count each cell's frames and start at the first record."""
        try:
            reader = DatasetReader(self.config.path)
            with warnings.catch_warnings():  # a torn last line warns once, on the streaming pass
                warnings.simplefilter("ignore")
                self._views = Counter(record.cell for record in self._wanted(reader))
        except DatasetError as error:
            raise SourceError(f"{self.name}: {error}") from None
        if not self._views:
            of_views = f" of views {self.config.views}" if self.config.views else ""
            raise SourceError(f"{self.name}: no frames to replay{of_views}")
        self._reader, self._records = reader, self._wanted(reader)
        self._pacer, self._offset_s, self._previous = Pacer(), 0.0, None

    def _wanted(self, reader: DatasetReader) -> Iterator[FrameRecord]:
        views = self.config.views
        return (record for record in reader if views is None or record.view in views)

    def read(self) -> SourceFrame | None:
        assert self._reader is not None, "open() the source first"
        try:
            record = next(self._records, None)
            if record is None and self.config.loop:
                self._records, self._previous = self._wanted(self._reader), None
                record = next(self._records, None)
        except DatasetError as error:  # a bad manifest line met while streaming
            raise SourceError(f"{self.name}: {error}") from None
        if record is None:
            return None
        data = self._image_bytes(record)
        if not self.config.fast:
            if self._previous is not None:
                self._offset_s += max(record.timestamp - self._previous, 0.0) / self.config.speed
            self._previous = record.timestamp
            self._pacer.wait(self._offset_s)
        ground_truth = record.ground_truth.model_dump(mode="json") if record.ground_truth else None
        try:
            return encoded_frame(
                data, cell=CellTag(cell=record.cell, lot=record.lot, view=record.view, views=self._views[record.cell]),
                truth={"labels": record.labels, "severities": record.severities, "ground_truth": ground_truth},
            )
        except ValueError as error:
            raise self._unreadable(record, str(error)) from None

    def _image_bytes(self, record: FrameRecord) -> bytes:
        assert self._reader is not None
        try:
            data = self._reader.image_path(record).read_bytes()
        except DatasetError as error:
            raise self._unreadable(record, error.message) from None
        except OSError as error:
            raise self._unreadable(record, error.strerror or str(error)) from None
        if sha256_bytes(data) != record.sha256:
            raise self._unreadable(record, "its bytes do not match the record's sha256 (changed or corrupt)")
        return data

    def _unreadable(self, record: FrameRecord, why: str) -> SourceError:
        return SourceError(f"{self.name}: record {record.id!r}: image {record.image}: {why}")

    def close(self) -> None:
        self._reader, self._records = None, iter(())
