"""validate_dataset: every problem reported as file:line: field 'f': message, none missed."""

from __future__ import annotations

import numpy as np
import pytest

from pouchline.datasets.manifest import INFO, MANIFEST, DatasetWriter, sha256_bytes
from pouchline.datasets.records import DatasetInfo
from pouchline.datasets.validate import validate_dataset


def _only_error(report) -> str:
    assert not report.ok
    assert len(report.errors) == 1, report.errors
    return report.errors[0]


def test_clean_dataset_passes(make_dataset) -> None:
    root, _ = make_dataset(6)
    report = validate_dataset(root)
    assert report.ok and report.errors == [] and report.records == 6
    assert report.warnings == []


def test_missing_image(make_dataset) -> None:
    root, written = make_dataset(3)
    (root / written[1].image).unlink()
    error = _only_error(validate_dataset(root))
    assert error == f"{root / MANIFEST}:2: field 'image': {root.resolve() / written[1].image} is missing"
    assert validate_dataset(root, check_images=False).ok


def test_wrong_sha256(make_dataset, edit_manifest) -> None:
    root, written = make_dataset(3)
    edit_manifest(root, 3, sha256="f" * 64)
    error = _only_error(validate_dataset(root))
    assert error.startswith(f"{root / MANIFEST}:3: field 'sha256': ")
    assert f"hashes to {written[2].sha256}, the record says {'f' * 64}" in error


def test_non_image_file(make_dataset, edit_manifest) -> None:
    root, written = make_dataset(2)
    data = b"this is a text file, not a frame"
    (root / written[0].image).write_bytes(data)
    edit_manifest(root, 1, sha256=sha256_bytes(data))
    error = _only_error(validate_dataset(root))
    assert error.startswith(f"{root / MANIFEST}:1: field 'image': ")
    assert error.endswith("images/frame-0000.png is not a decodable image")


def test_unknown_label(make_dataset, edit_manifest) -> None:
    root, _ = make_dataset(3)
    edit_manifest(root, 2, labels=["scratched"])
    error = _only_error(validate_dataset(root))
    assert error == (
        f"{root / MANIFEST}:2: field 'labels': unknown label(s) 'scratched'; "
        "the dataset's classes are ok, swollen, deformed"
    )


def test_geometry_and_mask_mismatches(make_dataset, edit_manifest, encode) -> None:
    root, written = make_dataset(4)
    edit_manifest(root, 1, width=17, channels=1)
    (root / written[1].mask).write_bytes(encode(np.zeros((5, 5), np.uint8)))
    (root / written[3].mask).unlink()
    errors = validate_dataset(root).errors
    image = root.resolve() / written[0].image
    assert errors[0] == f"{root / MANIFEST}:1: field 'width': {image} has width 16, the record says 17"
    assert ":1: field 'channels': " in errors[1] and "has channels 3, the record says 1" in errors[1]
    assert ":2: field 'mask': " in errors[2] and "is 5x5, its image is 16x12" in errors[2]
    assert ":4: field 'mask': " in errors[3] and errors[3].endswith("masks/frame-0003.png is missing")
    assert len(errors) == 4


def test_carries_on_after_bad_lines_and_reports_each(make_dataset, edit_manifest) -> None:
    root, _ = make_dataset(4)
    edit_manifest(root, 3, view="front", timestamp="yesterday")
    manifest = root / MANIFEST
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(b"".join([lines[0], b"[1, 2]\n", *lines[1:], lines[0]]))
    report = validate_dataset(root)
    assert report.records == 4  # the four good lines, the duplicate included
    assert report.errors == [
        f"{manifest}:2: expected a JSON object, got list",
        f"{manifest}:4: field 'view': Input should be 'top', 'side' or 'crop' (got 'front')",
        f"{manifest}:4: field 'timestamp': Input should be a valid number, "
        "unable to parse string as a number (got 'yesterday')",
        f"{manifest}:6: field 'id': duplicate id 'frame-0000' (first on line 1)",
    ]


def test_path_traversal_in_a_record(make_dataset, edit_manifest) -> None:
    root, _ = make_dataset(2)
    edit_manifest(root, 2, mask="masks/../../escape.png")
    error = _only_error(validate_dataset(root))
    assert error.startswith(f"{root / MANIFEST}:2: field 'mask': path 'masks/../../escape.png' must not contain")


def test_torn_last_line_is_an_error(make_dataset) -> None:
    root, _ = make_dataset(2)
    with (root / MANIFEST).open("ab") as fh:
        fh.write(b'{"id": "frame-0002", "ima')
    report = validate_dataset(root)
    error = _only_error(report)
    assert error.startswith(f"{root / MANIFEST}:3: torn last line") and "reopen the dataset with a writer" in error
    assert report.records == 2


def test_empty_and_missing_datasets(tmp_path) -> None:
    DatasetWriter(tmp_path / "empty", DatasetInfo(name="e", classes=["ok"])).close()
    error = _only_error(validate_dataset(tmp_path / "empty"))
    assert error == f"{tmp_path / 'empty' / MANIFEST}: the dataset has no records"
    (tmp_path / "blank").mkdir()
    blank = tmp_path / "blank"
    assert _only_error(validate_dataset(blank)) == f"{blank / INFO}: missing: {blank} is not a pouchline dataset"
    error = _only_error(validate_dataset(tmp_path / "missing"))
    assert error == f"{tmp_path / 'missing'}: dataset folder does not exist"
    (tmp_path / "empty" / MANIFEST).unlink()
    error = _only_error(validate_dataset(tmp_path / "empty"))
    assert error == f"{tmp_path / 'empty' / MANIFEST}: missing: the dataset has no manifest"
    (tmp_path / "empty" / INFO).write_text("[]")
    assert "dataset.json: " in _only_error(validate_dataset(tmp_path / "empty"))


def test_unused_class_is_a_warning(make_dataset) -> None:
    root, _ = make_dataset(2)  # labels ok, swollen: no 'deformed' frame
    report = validate_dataset(root)
    assert report.ok and report.warnings == [f"{root / INFO}: no record carries class(es) deformed"]


@pytest.mark.parametrize("limit", [1, 3])
def test_stops_after_max_errors(make_dataset, limit: int) -> None:
    root, written = make_dataset(6)
    for record in written:
        (root / record.image).unlink()
    errors = validate_dataset(root, max_errors=limit).errors
    assert len(errors) == limit + 1
    assert errors[-1] == f"{root / MANIFEST}: stopped after {limit} errors; fix these and validate again"
