"""Full check of a dataset before anyone trains on it: every line, every file, every byte.

Unlike the reader, which stops at the first bad line, validation carries on and reports
every problem (up to ``max_errors``) as ``file:line: field 'f': message``. A torn last line
is an *error* here: the data is readable, but the dataset is not clean until a writer has
reopened it (which truncates the tail) or the line is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2

from pouchline.datasets.manifest import (
    INFO,
    MANIFEST,
    DatasetError,
    decode_image,
    image_geometry,
    label_problem,
    load_info,
    resolve_in_root,
    scan_manifest,
    sha256_bytes,
)
from pouchline.datasets.records import DatasetInfo, FrameRecord


@dataclass
class ValidationReport:
    """Outcome of `validate_dataset`; ``ok`` only when there is no error."""

    records: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the dataset can be used as it is."""
        return not self.errors


class _Errors:
    """Collects located errors for one manifest; stops listening after ``limit``."""

    def __init__(self, report: ValidationReport, manifest: Path, limit: int):
        self.report = report
        self.manifest = manifest
        self.limit = limit
        self.stopped = False

    @property
    def full(self) -> bool:
        return len(self.report.errors) >= self.limit

    def add(self, line: int, field: str | None, message: str) -> None:
        if not self.full:
            self.report.errors.append(str(DatasetError(self.manifest, message, line=line, field=field)))


def validate_dataset(root: Path, *, check_images: bool = True, max_errors: int = 200) -> ValidationReport:
    """Check manifest lines, ids, labels and (with ``check_images``) every image and mask file.

    Stops reading after ``max_errors`` errors, saying so in the last error.
    """
    root = Path(root)
    report = ValidationReport()
    try:
        info = load_info(root)
    except DatasetError as exc:
        report.errors.append(str(exc))
        return report
    manifest = root / MANIFEST
    if not manifest.is_file():
        report.errors.append(str(DatasetError(manifest, "missing: the dataset has no manifest")))
        return report
    errors = _Errors(report, manifest, max_errors)
    used = _check_manifest(root, info, errors, check_images)
    if errors.stopped:
        report.errors.append(f"{manifest}: stopped after {max_errors} errors; fix these and validate again")
    elif report.records == 0:
        report.errors.append(str(DatasetError(manifest, "the dataset has no records")))
    unused = [name for name in info.classes if name not in used]
    if unused and report.records:
        report.warnings.append(f"{root / INFO}: no record carries class(es) {', '.join(unused)}")
    return report


def _check_manifest(root: Path, info: DatasetInfo, errors: _Errors, check_images: bool) -> set[str]:
    """Check every line; returns the labels in use."""
    first_line: dict[str, int] = {}
    used: set[str] = set()
    for entry in scan_manifest(errors.manifest):
        if errors.full:
            errors.stopped = True
            break
        if entry.torn:
            errors.report.errors.append(f"{entry.describe_torn()}; reopen the dataset with a writer to truncate it")
            break
        for issue in entry.problems:
            errors.add(entry.number, issue.field, issue.message)
        record = entry.record
        if record is None:
            continue
        errors.report.records += 1
        used.update(record.labels)
        if record.id in first_line:
            errors.add(entry.number, "id", f"duplicate id {record.id!r} (first on line {first_line[record.id]})")
        first_line.setdefault(record.id, entry.number)
        problem = label_problem(record, info.classes)
        if problem:
            errors.add(entry.number, "labels", problem)
        if check_images:
            _check_files(root, record, entry.number, errors)
    return used


def _check_files(root: Path, record: FrameRecord, line: int, errors: _Errors) -> None:
    """Image exists, matches its hash, decodes with the recorded geometry; so does the mask."""
    path = _existing(root, record.image, "image", line, errors)
    if path is None:
        return
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != record.sha256:
        errors.add(line, "sha256", f"{path} hashes to {digest}, the record says {record.sha256}")
    image = decode_image(data)
    if image is None:
        errors.add(line, "image", f"{path} is not a decodable image")
        return
    width, height, channels = image_geometry(image)
    for name, actual, recorded in (
        ("width", width, record.width),
        ("height", height, record.height),
        ("channels", channels, record.channels),
    ):
        if actual != recorded:
            errors.add(line, name, f"{path} has {name} {actual}, the record says {recorded}")
    if record.mask is not None:
        _check_mask(root, record, line, errors, (width, height))


def _check_mask(root: Path, record: FrameRecord, line: int, errors: _Errors, size: tuple[int, int]) -> None:
    assert record.mask is not None
    path = _existing(root, record.mask, "mask", line, errors)
    if path is None:
        return
    mask = decode_image(path.read_bytes(), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        errors.add(line, "mask", f"{path} is not a decodable image")
    elif (mask.shape[1], mask.shape[0]) != size:
        errors.add(line, "mask", f"{path} is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")


def _existing(root: Path, relative: str, field: str, line: int, errors: _Errors) -> Path | None:
    """The file a record names, or None after reporting why it cannot be used."""
    path = resolve_in_root(root, relative)
    if path is None:
        errors.add(line, field, f"{relative!r} resolves outside the dataset folder")
    elif not path.is_file():
        errors.add(line, field, f"{path} is missing")
    else:
        return path
    return None
