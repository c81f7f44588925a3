"""Import labelled images from other tools: a folder per class, or a ``path,label`` CSV.

Imported frames are pre-aligned crops (``view="crop"``, ``aligned_crops=True``) with no
ground truth. The original file bytes are stored (never re-encoded, so JPEG artefacts and
hashes stay those of the source); images are decoded once, only to learn their geometry.
The dataset is built in a hidden sibling folder and renamed into place, so a failed
import leaves nothing half-written behind.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import track

from pouchline.datasets.manifest import (
    DatasetError,
    DatasetWriter,
    decode_image,
    image_geometry,
    sha256_bytes,
    sniff_format,
)
from pouchline.datasets.records import DatasetInfo

#: Names longer than this get a hash suffix, leaving room for a "-<n>" collision suffix.
_MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_REQUIRED_COLUMNS = ("path", "label")

#: Called with (file, line, message) for a bad image file: raises, or records a skip.
OnBad = Callable[[Path, int | None, str], None]


@dataclass
class ImportResult:
    """What an import produced; ``skipped`` lists ``file[:line]: reason`` when ``skip_bad``."""

    out: Path
    records: int
    classes: list[str]
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    """One source image, where it was listed (for errors), and what to store it as."""

    path: Path
    origin: Path
    line: int | None
    key: str
    labels: list[str]
    meta: dict[str, str]


def import_dataset(
    src: Path,
    out: Path,
    *,
    name: str | None = None,
    labels: list[str] | None = None,
    copy: bool = True,
    progress: bool = True,
    skip_bad: bool = False,
) -> ImportResult:
    """Import ``src`` (class folders or a CSV) into the new dataset folder ``out``.

    ``labels`` fixes the class order (and refuses any other label); ``copy=False`` hard-links
    images where the file system allows it; ``skip_bad`` skips undecodable files instead of
    failing, listing them in the result.
    """
    src, out = Path(src), Path(out)
    skipped: list[str] = []

    def on_bad(path: Path, line: int | None, message: str) -> None:
        error = DatasetError(path, message, line=line)
        if not skip_bad:
            raise error
        skipped.append(str(error))

    if not src.exists():
        raise DatasetError(src, "import source does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(out, "output exists and is not an empty folder; import into a new folder")
    if src.is_dir():
        kind, (classes, items) = "folder", _scan_folder(src, labels, on_bad)
    elif src.suffix.lower() == ".csv":
        kind, (classes, items) = "csv", _scan_csv(src, labels)
    else:
        raise DatasetError(src, "cannot import: expected a folder with one sub-folder per class, or a .csv file")
    source_name = src.resolve().stem if kind == "csv" else src.resolve().name
    info = DatasetInfo(
        name=name or source_name,
        classes=classes,
        aligned_crops=True,
        spec=None,
        source={"kind": kind, "path": str(src)},
    )
    lot = _safe_name(source_name, "import")
    records = _build(out, info, items, lot, copy=copy, progress=progress, on_bad=on_bad)
    return ImportResult(out=out, records=records, classes=classes, skipped=skipped)


# --- names --------------------------------------------------------------------------------


def _safe_name(text: str, fallback: str) -> str:
    """Map any name onto the identifier alphabet; long names keep a hash so they stay distinct."""
    clean = _UNSAFE.sub("_", text).lstrip("._-") or fallback
    if len(clean) > _MAX_NAME:
        clean = f"{clean[: _MAX_NAME - 9]}-{sha256_bytes(text.encode())[:8]}"
    return clean


def _unique(base: str, taken: set[str]) -> str:
    """``base``, or ``base-2``, ``base-3``...: deterministic because sources are walked in order."""
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate


def _class_order(found: list[str], labels: list[str] | None, where: Callable[[str], DatasetError]) -> list[str]:
    """Classes as given by ``labels`` (refusing others), else the found ones sorted."""
    if labels is None:
        return sorted(found)
    for label in found:
        if label not in labels:
            raise where(label)
    return list(labels)


# --- folder layout --------------------------------------------------------------------------


def _visible(paths: Iterator[Path], base: Path) -> list[Path]:
    """Sorted paths without hidden parts (``.DS_Store``, ``.git``, our own staging folders)."""
    return sorted(p for p in paths if not any(part.startswith(".") for part in p.relative_to(base).parts))


def _scan_folder(src: Path, labels: list[str] | None, on_bad: OnBad) -> tuple[list[str], list[_Item]]:
    """One sub-folder per class; files anywhere below it (sorted) carry that class."""
    entries = _visible(src.iterdir(), src)
    if not entries:
        raise DatasetError(src, "folder is empty; expected one sub-folder per class holding its images")
    if not any(entry.is_dir() for entry in entries):
        raise DatasetError(src, "has no class sub-folders; expected one sub-folder per class (e.g. ok/, defect/)")
    folders: dict[str, Path] = {}
    for entry in entries:
        if not entry.is_dir():
            on_bad(entry, None, "file is not inside a class sub-folder")
            continue
        label = _safe_name(entry.name, "class")
        if label in folders:
            raise DatasetError(entry, f"class name {label!r} is also that of folder {folders[label].name!r}")
        folders[label] = entry
    classes = _class_order(
        list(folders),
        labels,
        lambda label: DatasetError(folders[label], f"unknown label {label!r}; labels are {labels}"),
    )
    items: list[_Item] = []
    for label in sorted(folders):
        files = [p for p in _visible(folders[label].rglob("*"), src) if p.is_file()]
        if not files:
            raise DatasetError(folders[label], "class folder has no images")
        items += [
            _Item(path=p, origin=p, line=None, key=str(p.relative_to(src).with_suffix("")), labels=[label], meta={})
            for p in files
        ]
    return classes, items


# --- CSV layout ---------------------------------------------------------------------------------


def _scan_csv(src: Path, labels: list[str] | None) -> tuple[list[str], list[_Item]]:
    """``path,label[,...]`` rows; several labels split by ';', extra columns become metadata."""
    try:
        with src.open(newline="", encoding="utf-8-sig") as fh:
            items = list(_csv_items(src, fh))
    except UnicodeDecodeError as exc:
        raise DatasetError(src, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not items:
        raise DatasetError(src, "has a header but no rows")
    found = sorted({label for item in items for label in item.labels})
    first = {label: item for item in reversed(items) for label in item.labels}
    classes = _class_order(
        found,
        labels,
        lambda label: DatasetError(
            src, f"unknown label {label!r}; labels are {labels}", line=first[label].line, field="label"
        ),
    )
    return classes, items


def _csv_items(src: Path, fh: TextIO) -> Iterator[_Item]:
    reader = csv.reader(fh)
    header = [column.strip() for column in next(reader, [])]
    if not any(header):
        raise DatasetError(src, "is empty; expected a header line 'path,label[,...]'", line=1)
    for column in _REQUIRED_COLUMNS:
        if column not in header:
            raise DatasetError(src, f"missing column {column!r}; the header has {header}", line=1, field=column)
    if len(set(header)) != len(header):
        raise DatasetError(src, f"header {header} repeats a column name", line=1)
    for row in reader:
        if any(cell.strip() for cell in row):
            yield _csv_item(src, reader.line_num, header, row)


def _csv_item(src: Path, line: int, header: list[str], row: list[str]) -> _Item:
    if len(row) != len(header):
        raise DatasetError(src, f"row has {len(row)} cells, the header has {len(header)}", line=line)
    values = dict(zip(header, row, strict=True))
    text = values["path"].strip()
    if not text:
        raise DatasetError(src, "empty path", line=line, field="path")
    path = Path(text) if Path(text).is_absolute() else src.parent / text
    if not path.is_file():
        raise DatasetError(src, f"image file {path} does not exist or is not a file", line=line, field="path")
    labels = [_safe_name(label.strip(), "class") for label in values["label"].split(";") if label.strip()]
    if not labels:
        raise DatasetError(src, "empty label", line=line, field="label")
    # Ids come from the path as written ("../imgs/a.png" -> "imgs_a"); absolute paths give their name.
    key = Path(path.name if Path(text).is_absolute() else text).with_suffix("")
    meta = {column: value for column, value in values.items() if column not in _REQUIRED_COLUMNS}
    return _Item(path=path, origin=src, line=line, key=str(key), labels=labels, meta=meta)


# --- writing ------------------------------------------------------------------------------------


def _build(
    out: Path, info: DatasetInfo, items: list[_Item], lot: str, *, copy: bool, progress: bool, on_bad: OnBad
) -> int:
    """Write every item into a hidden staging folder, then rename it to ``out``; returns records."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.importing")
    taken: set[str] = set()
    try:
        with DatasetWriter(staging, info, fsync=False) as writer:
            console = Console(stderr=True)
            for item in track(items, description=f"importing {info.name}", disable=not progress, console=console):
                _add(writer, item, _unique(_safe_name(item.key, "image"), taken), lot, copy, on_bad)
            count = writer.count
        if count == 0:
            raise DatasetError(out, f"no image could be imported: all {len(items)} files were unreadable")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return count


def _add(writer: DatasetWriter, item: _Item, ident: str, lot: str, copy: bool, on_bad: OnBad) -> None:
    """Store one source file as it is; problems are reported against the CSV line or the file."""
    named = f"{item.path} is " if item.line is not None else ""
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        on_bad(item.origin, item.line, f"{named}unreadable ({exc.strerror})")
        return
    fmt = sniff_format(data)
    image = decode_image(data) if fmt else None
    if fmt is None or image is None:
        on_bad(item.origin, item.line, f"{named}not a readable PNG, JPEG, BMP or TIFF image")
        return
    width, height, channels = image_geometry(image)
    try:
        writer.add(
            image_bytes=data,
            image_ext=fmt,
            link_from=None if copy else item.path,
            id=ident,
            width=width,
            height=height,
            channels=channels,
            view="crop",
            station="import",
            camera="import",
            lot=lot,
            cell=ident,
            timestamp=item.path.stat().st_mtime,
            labels=item.labels,
            meta=item.meta,
        )
    except DatasetError as exc:
        raise DatasetError(item.origin, exc.message, line=item.line, field=exc.field) from None
