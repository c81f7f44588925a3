"""Dataset storage: ``dataset.json`` + an append-only ``manifest.jsonl`` + image/mask files.

The manifest is JSON lines so it can be appended crash-safely and streamed without loading
it: files are written (temp file + ``os.replace``) before the line that references them, and
the line itself goes out in one write. A crash therefore leaves at worst a torn last line,
which the reader skips with a warning and a reopened writer truncates. Only JSON is ever
parsed, never pickles. Every error names the file, and the line and field when known.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import cv2
import numpy as np
from pydantic import ValidationError

from pouchline.datasets.records import DatasetInfo, FrameRecord, Splits

if sys.platform != "win32":
    import fcntl

MANIFEST = "manifest.jsonl"
INFO = "dataset.json"
IMAGES = "images"
MASKS = "masks"

#: File extension -> canonical image format; the stored bytes must really be that format.
IMAGE_EXTENSIONS: dict[str, str] = {
    "png": "png",
    "jpg": "jpg",
    "jpeg": "jpg",
    "bmp": "bmp",
    "tif": "tif",
    "tiff": "tif",
}
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


class DatasetError(Exception):
    """A dataset problem, located as ``file[:line][: field 'f']: message`` for the user."""

    def __init__(self, path: Path | str, message: str, line: int | None = None, field: str | None = None):
        self.path = Path(path)
        self.line = line
        self.field = field
        self.message = message
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")

    def __reduce__(self) -> tuple[type[DatasetError], tuple[Path, str, int | None, str | None]]:
        # Rebuild from the parts, not the message, so the error survives worker processes.
        return type(self), (self.path, self.message, self.line, self.field)


# --- shared file helpers ----------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256, the content check stored in every record."""
    return hashlib.sha256(data).hexdigest()


def sniff_format(data: bytes) -> str | None:
    """Image format from the magic bytes ('png', 'jpg', 'bmp', 'tif'), None for anything else.

    Trusting bytes rather than names catches a text file or a WebP renamed to ``.png``.
    """
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def decode_image(data: bytes, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray | None:
    """Decode image bytes; None when OpenCV cannot (it returns None or raises, by codec)."""
    if not data:
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None


def image_geometry(image: np.ndarray) -> tuple[int, int, int]:
    """(width, height, channels) as records store them: grey(+alpha) is 1, colour(+alpha) is 3."""
    channels = 1 if image.ndim == 2 or image.shape[2] <= 2 else 3
    return int(image.shape[1]), int(image.shape[0]), channels


def resolve_in_root(root: Path, relative: str) -> Path | None:
    """Absolute path of a record file, or None when it escapes the dataset (``..``, symlinks)."""
    base = root.resolve()
    path = (base / relative).resolve()
    return path if path.is_relative_to(base) else None


def label_problem(record: FrameRecord, classes: list[str]) -> str | None:
    """Why a record's labels do not fit the dataset's classes, or None when they do."""
    unknown = [label for label in record.labels if label not in classes]
    if not unknown:
        return None
    return f"unknown label(s) {', '.join(map(repr, unknown))}; the dataset's classes are {', '.join(classes)}"


def write_atomic(path: Path, data: bytes, *, fsync: bool) -> None:
    """Write through a temp file + ``os.replace`` so no reader ever sees half a file."""
    tmp = _temp_name(path)
    try:
        with tmp.open("xb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def link_atomic(source: Path, path: Path) -> bool:
    """Hard-link ``source`` to ``path`` atomically; False where links are impossible (other disk)."""
    tmp = _temp_name(path)
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _temp_name(path: Path) -> Path:
    # Not mkstemp: its 0600 mode would make dataset files unreadable to other users.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: POSIX keeps directory entries in the directory's own blocks."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- parsing ------------------------------------------------------------------------------


def validation_problems(exc: ValidationError, path: Path, line: int | None = None) -> list[DatasetError]:
    """One DatasetError per pydantic error, with the dotted field name (``ground_truth.seed``)."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        shown = repr(error.get("input"))
        if error["type"] != "missing" and error["loc"] and len(shown) <= 60:
            message += f" (got {shown})"
        problems.append(DatasetError(path, message, line=line, field=field))
    return problems


def combine(problems: list[DatasetError]) -> DatasetError:
    """The first problem, saying how many more there are (validation reports them all)."""
    first = problems[0]
    if len(problems) == 1:
        return first
    more = f"{first.message} (and {len(problems) - 1} more problem(s) here)"
    return DatasetError(first.path, more, line=first.line, field=first.field)


def parse_line(raw: bytes, path: Path, line: int) -> tuple[FrameRecord | None, list[DatasetError]]:
    """A manifest line's record, or every problem with it (so validation can list them all)."""
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        return None, [DatasetError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})", line=line)]
    except json.JSONDecodeError as exc:
        return None, [DatasetError(path, f"not valid JSON ({exc.msg} at column {exc.colno})", line=line)]
    if not isinstance(data, dict):
        return None, [DatasetError(path, f"expected a JSON object, got {type(data).__name__}", line=line)]
    try:
        return FrameRecord.model_validate(data), []
    except ValidationError as exc:
        return None, validation_problems(exc, path, line)


@dataclass(frozen=True)
class ManifestLine:
    """One non-blank manifest line, parsed, with where it starts (to truncate a torn tail)."""

    number: int
    offset: int
    raw: bytes
    record: FrameRecord | None
    problems: list[DatasetError]

    @property
    def complete(self) -> bool:
        """Every line the writer finishes ends with a newline; only the last may lack one."""
        return self.raw.endswith(b"\n")

    @property
    def torn(self) -> bool:
        """An interrupted append: no newline and unparsable. A bad complete line is corruption."""
        return not self.complete and bool(self.problems)

    def describe_torn(self) -> str:
        """What a warning or report says about a torn tail."""
        return (
            f"{self.problems[0].path}:{self.number}: torn last line ({len(self.raw)} bytes without a "
            f"newline: {self.problems[0].message}), probably an interrupted append"
        )


def _raw_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of every non-blank line, streamed from disk."""
    offset = 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if raw.strip():
                yield number, offset, raw
            offset += len(raw)


def scan_manifest(path: Path) -> Iterator[ManifestLine]:
    """Parse a manifest line by line; never raises for bad lines, callers decide."""
    for number, offset, raw in _raw_lines(path):
        record, problems = parse_line(raw, path, number)
        yield ManifestLine(number, offset, raw, record, problems)


# --- dataset.json & splits ------------------------------------------------------------------


def load_info(root: Path) -> DatasetInfo:
    """Read ``dataset.json``; every failure names the folder or file (and line/field)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(root, "dataset folder does not exist")
    if not root.is_dir():
        raise DatasetError(root, "is not a folder (a dataset is a folder holding dataset.json and manifest.jsonl)")
    path = root / INFO
    if not path.is_file():
        raise DatasetError(path, f"missing: {root} is not a pouchline dataset")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise DatasetError(path, f"not valid JSON ({exc})", line=line) from None
    try:
        return DatasetInfo.model_validate(data)
    except ValidationError as exc:
        raise combine(validation_problems(exc, path)) from None


def _info_bytes(info: DatasetInfo) -> bytes:
    return (info.model_dump_json(indent=2) + "\n").encode()


def split_of(cell: str, splits: Splits) -> str:
    """Split of a cell: a salted hash, so all views of a cell share a split on every machine."""
    digest = hashlib.sha256(f"{splits.seed}:{cell}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in splits.fractions.items():
        cumulative += fraction
        if position < cumulative:
            return name
    # Fractions may sum to a hair under 1: the rest belongs to the last non-empty split.
    return [name for name, fraction in splits.fractions.items() if fraction > 0][-1]


# --- writer -------------------------------------------------------------------------------


class DatasetWriter:
    """Appends frames to a new or existing dataset; a crash loses at most the frame in flight."""

    def __init__(self, root: Path, info: DatasetInfo, *, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync
        self.manifest = self.root / MANIFEST
        self.repaired_tail: str | None = None
        self._ids: set[str] = set()
        self.info = self._open_info(info)
        (self.root / IMAGES).mkdir(exist_ok=True)
        (self.root / MASKS).mkdir(exist_ok=True)
        self._fh: BinaryIO | None = self.manifest.open("ab")
        try:
            self._lock()
            self._resume()
        except BaseException:
            self.close()
            raise

    def _open_info(self, info: DatasetInfo) -> DatasetInfo:
        """Create the dataset, or reopen it when its classes agree (labels must keep meaning)."""
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(self.root, "exists and is not a folder")
        if (self.root / INFO).exists():
            existing = load_info(self.root)
            if existing.classes != info.classes:
                raise DatasetError(
                    self.root / INFO,
                    f"existing dataset has classes {existing.classes}, the writer was given {info.classes}; "
                    "append only with the same classes, or write a new dataset",
                    field="classes",
                )
            return existing
        if self.manifest.exists():
            raise DatasetError(self.root / INFO, f"missing although {MANIFEST} exists; refusing to guess the classes")
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / INFO, _info_bytes(info), fsync=self.fsync)
        return info

    def _lock(self) -> None:
        """One writer per dataset: two appenders could not see each other's ids."""
        assert self._fh is not None
        if sys.platform == "win32":
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(self.manifest, "another writer has this dataset open") from None

    def _resume(self) -> None:
        """Load existing ids, and cut or complete an interrupted last line before appending."""
        assert self._fh is not None
        for entry in scan_manifest(self.manifest):
            if entry.torn:
                self.repaired_tail = f"{entry.describe_torn()}; truncated it"
                self._fh.truncate(entry.offset)
                break
            if entry.problems:
                raise combine(entry.problems)
            assert entry.record is not None
            self._ids.add(entry.record.id)
            if not entry.complete:
                self.repaired_tail = f"{self.manifest}:{entry.number}: last line had no newline; added it"
                self._append(b"\n")
        if self.repaired_tail:
            self._sync()
            warnings.warn(self.repaired_tail, stacklevel=3)

    @property
    def count(self) -> int:
        """Records in the manifest, including those there before this writer opened it."""
        return len(self._ids)

    def __contains__(self, ident: object) -> bool:
        """Whether a record with this id is already in the manifest (resume, redelivery)."""
        return ident in self._ids

    def add(
        self,
        *,
        image_bytes: bytes,
        image_ext: str,
        mask_png: bytes | None = None,
        link_from: Path | None = None,
        **fields: Any,
    ) -> FrameRecord:
        """Store one frame: image (and mask) files first, then its manifest line.

        ``link_from`` (the file ``image_bytes`` were read from) hard-links it instead of
        writing a copy, falling back to a copy where links are impossible.
        """
        if self._fh is None:
            raise DatasetError(self.manifest, "writer is closed")
        reserved = {"image", "sha256", "mask"} & fields.keys()
        if reserved:
            raise TypeError(f"add() derives {', '.join(sorted(reserved))} itself; do not pass them")
        record = self._record(image_bytes, image_ext, mask_png, fields)
        image_path = self.root / record.image
        if link_from is None or not link_atomic(Path(link_from), image_path):
            write_atomic(image_path, image_bytes, fsync=self.fsync)
        if mask_png is not None and record.mask is not None:
            write_atomic(self.root / record.mask, mask_png, fsync=self.fsync)
        if self.fsync:
            _fsync_dir(self.root / IMAGES)
            if mask_png is not None:
                _fsync_dir(self.root / MASKS)
        self._append((record.model_dump_json(exclude_none=True) + "\n").encode())
        self._ids.add(record.id)
        return record

    def _record(
        self, image_bytes: bytes, image_ext: str, mask_png: bytes | None, fields: dict[str, Any]
    ) -> FrameRecord:
        """Validate everything before any file is written, so a refused frame leaves no trace."""
        ext = image_ext.lower().lstrip(".")
        ident = str(fields.get("id"))
        if ext not in IMAGE_EXTENSIONS:
            known = ", ".join(IMAGE_EXTENSIONS)
            raise DatasetError(self.root / IMAGES, f"record {ident!r}: image_ext {image_ext!r} is not one of {known}")
        try:
            record = FrameRecord(
                image=f"{IMAGES}/{ident}.{ext}",
                sha256=sha256_bytes(image_bytes),
                mask=None if mask_png is None else f"{MASKS}/{ident}.png",
                **fields,
            )
        except ValidationError as exc:
            first = combine(validation_problems(exc, self.manifest))
            raise DatasetError(self.manifest, f"record {ident!r}: {first.message}", field=first.field) from None
        if sniff_format(image_bytes) != IMAGE_EXTENSIONS[ext]:
            raise DatasetError(self.root / record.image, f"image_bytes are not a {ext.upper()} file")
        if record.mask is not None and sniff_format(mask_png or b"") != "png":
            raise DatasetError(self.root / record.mask, "mask_png is not a PNG file")
        problem = label_problem(record, self.info.classes)
        if problem:
            raise DatasetError(self.manifest, f"record {record.id!r}: {problem}", field="labels")
        if record.id in self._ids:
            raise DatasetError(self.manifest, f"duplicate id {record.id!r}: the dataset already has it", field="id")
        return record

    def _append(self, line: bytes) -> None:
        """One write per line: an interruption tears only this line, which readers detect."""
        assert self._fh is not None
        self._fh.write(line)
        self._sync()

    def _sync(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the manifest; safe to call twice."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# --- reader -------------------------------------------------------------------------------


class DatasetReader:
    """Streams records of a dataset and opens their files, never leaving the dataset folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.info = load_info(self.root)
        self.manifest = self.root / MANIFEST
        if not self.manifest.is_file():
            raise DatasetError(self.manifest, "missing: the dataset has no manifest")
        self.torn_tail: str | None = None

    def __iter__(self) -> Iterator[FrameRecord]:
        """Records line by line; a bad line raises, a torn last line warns and ends the stream."""
        for entry in scan_manifest(self.manifest):
            if entry.torn:
                self.torn_tail = entry.describe_torn()
                warnings.warn(f"{self.torn_tail}; skipped it", stacklevel=2)
                return
            if entry.problems:
                raise combine(entry.problems)
            assert entry.record is not None
            yield entry.record

    def __len__(self) -> int:
        """Number of records, counted without validating every line."""
        count = 0
        for number, _, raw in _raw_lines(self.manifest):
            count += raw.endswith(b"\n") or not parse_line(raw, self.manifest, number)[1]
        return count

    def records(self, split: str | None = None) -> Iterator[FrameRecord]:
        """All records, or those of one split (checked before streaming starts)."""
        if split is None:
            return iter(self)
        names = self.info.splits.fractions
        if split not in names:
            raise DatasetError(
                self.root / INFO, f"unknown split {split!r}; this dataset has {', '.join(names)}", field="splits"
            )
        return (record for record in self if self.split_of(record) == split)

    def split_of(self, record: FrameRecord) -> str:
        """Split of a record: that of its cell."""
        return split_of(record.cell, self.info.splits)

    def image_path(self, record: FrameRecord) -> Path:
        """Where the record's image is; refuses paths that leave the dataset."""
        return self._inside(record, record.image, "image")

    def mask_path(self, record: FrameRecord) -> Path | None:
        """Where the record's mask is, None when it has none."""
        return None if record.mask is None else self._inside(record, record.mask, "mask")

    def _inside(self, record: FrameRecord, relative: str, field: str) -> Path:
        path = resolve_in_root(self.root, relative)
        if path is None:
            raise DatasetError(
                self.root / relative,
                f"record {record.id!r}: {relative!r} resolves outside the dataset folder {self.root}",
                field=field,
            )
        return path

    def read_image(self, record: FrameRecord, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
        """Decoded image of a record (BGR by default)."""
        return _read(self.image_path(record), record, flags, "image")

    def read_mask(self, record: FrameRecord) -> np.ndarray | None:
        """Single-channel mask of a record, None when it has none."""
        path = self.mask_path(record)
        return None if path is None else _read(path, record, cv2.IMREAD_GRAYSCALE, "mask")


def _read(path: Path, record: FrameRecord, flags: int, what: str) -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(path, f"{what} of record {record.id!r} is missing") from None
    image = decode_image(data, flags)
    if image is None:
        raise DatasetError(path, f"{what} of record {record.id!r} cannot be decoded as an image")
    return image
