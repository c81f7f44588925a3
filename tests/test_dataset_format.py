"""Dataset format: round trip, streaming, splits, crash-safe appends, located errors, summary."""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console

from pouchline.datasets.manifest import (
    INFO,
    MANIFEST,
    DatasetError,
    DatasetReader,
    DatasetWriter,
    load_info,
    split_of,
)
from pouchline.datasets.records import SYNTH_CLASSES, DatasetInfo, Splits
from pouchline.datasets.summary import render_summary, summarize

TORN = b'{"id": "frame-9999", "image": "images/fr'


def _info(**changes: object) -> DatasetInfo:
    return DatasetInfo(name="test", classes=list(SYNTH_CLASSES), **changes)


def _fields(ident: str, **changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "id": ident,
        "width": 4,
        "height": 3,
        "channels": 1,
        "view": "top",
        "station": "st1",
        "camera": "cam",
        "lot": "lot",
        "cell": f"cell-{ident}",
        "timestamp": 0.0,
        "labels": ["ok"],
    }
    fields.update(changes)
    return fields


def test_round_trip_keeps_records_images_masks_and_info(make_dataset) -> None:
    root, written = make_dataset(6)
    reader = DatasetReader(root)
    assert list(reader) == written
    assert len(reader) == 6
    assert reader.info == _info()
    assert written[1].ground_truth is not None and written[1].ground_truth.polygon[0] == (1.0, 1.0)
    for record in written:
        image = reader.read_image(record)
        assert image.shape == (12, 16, 3)
        original = np.random.default_rng(int(record.id[-4:])).integers(0, 255, (12, 16, 3), dtype=np.uint8)
        assert np.array_equal(image, original)  # the fixture's pixels, PNG being lossless
        mask = reader.read_mask(record)
        assert (mask is None) == (record.mask is None)
        if mask is not None:
            assert mask.shape == (12, 16) and mask[3, 4] == 255 and mask[0, 0] == 0
    assert all(line.endswith("\n") for line in (root / MANIFEST).read_text().splitlines(keepends=True))


def test_reader_streams_and_locates_a_corrupt_line_mid_file(make_dataset) -> None:
    root, written = make_dataset(4)
    manifest = root / MANIFEST
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(b"".join([*lines[:2], b"{not json\n", *lines[2:]]))
    stream = iter(DatasetReader(root))
    assert [next(stream), next(stream)] == written[:2]  # records before the bad line arrive first
    with pytest.raises(DatasetError) as caught:
        next(stream)
    assert str(caught.value).startswith(f"{manifest}:3: not valid JSON")
    assert (caught.value.path, caught.value.line) == (manifest, 3)


def test_reader_names_line_and_field_of_an_invalid_record(make_dataset, edit_manifest) -> None:
    root, _ = make_dataset(3)
    edit_manifest(root, 2, width=-5)
    with pytest.raises(DatasetError, match=r"manifest\.jsonl:2: field 'width': Input should be greater than 0"):
        list(DatasetReader(root))
    edit_manifest(root, 2, width=16, ground_truth={"seed": "x"})
    with pytest.raises(DatasetError) as caught:
        list(DatasetReader(root))
    assert caught.value.field == "ground_truth.seed" and "more problem(s)" in str(caught.value)


def test_path_traversal_in_a_record_is_refused(make_dataset, edit_manifest, tmp_path: Path) -> None:
    root, written = make_dataset(2)
    edit_manifest(root, 2, image="../outside.png")
    with pytest.raises(DatasetError, match=r":2: field 'image': path '\.\./outside\.png' must not contain"):
        list(DatasetReader(root))
    # A symlink passes the syntax check but still leaves the folder: opening it is refused.
    (tmp_path / "secret.png").write_bytes(b"x")
    link = root / "images" / "link.png"
    link.symlink_to(tmp_path / "secret.png")
    record = written[0].model_copy(update={"image": "images/link.png"})
    with pytest.raises(DatasetError, match=r"link\.png: field 'image': record 'frame-0000'.*outside the dataset"):
        DatasetReader(root).read_image(record)


def test_missing_or_undecodable_image_names_the_file(make_dataset) -> None:
    root, written = make_dataset(2)
    reader = DatasetReader(root)
    path = root / written[0].image
    path.write_bytes(b"plain text")
    with pytest.raises(DatasetError, match=rf"{path}: image of record 'frame-0000' cannot be decoded"):
        reader.read_image(written[0])
    path.unlink()
    with pytest.raises(DatasetError, match=rf"{path}: image of record 'frame-0000' is missing"):
        reader.read_image(written[0])


def test_load_info_errors_name_folder_file_line_and_field(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'nope'}: dataset folder does not exist"):
        load_info(tmp_path / "nope")
    with pytest.raises(DatasetError, match=rf"{tmp_path / INFO}: missing"):
        load_info(tmp_path)
    (tmp_path / INFO).write_text('{\n  "name": "x",\n  oops\n}')
    with pytest.raises(DatasetError, match=rf"{tmp_path / INFO}:3: not valid JSON"):
        load_info(tmp_path)
    (tmp_path / INFO).write_text(json.dumps({"name": "x", "classes": ["ok", "ok"]}))
    with pytest.raises(DatasetError, match=r"dataset\.json: field 'classes': .*repeat a name"):
        load_info(tmp_path)
    (tmp_path / INFO).write_text(json.dumps({"name": "x", "classes": ["ok"], "schema_version": 99}))
    with pytest.raises(DatasetError, match=r"field 'schema_version': schema_version 99 is not supported"):
        load_info(tmp_path)


def test_splits_are_deterministic_and_respect_fractions() -> None:
    splits = Splits()
    cells = [f"cell-{i:05d}" for i in range(2000)]
    first = [split_of(cell, splits) for cell in cells]
    assert first == [split_of(cell, Splits()) for cell in cells]
    counts = Counter(first)
    for name, fraction in splits.fractions.items():
        assert abs(counts[name] / len(cells) - fraction) < 0.03, counts
    reseeded = [split_of(cell, Splits(seed=1)) for cell in cells]
    assert reseeded != first
    assert {split_of(cell, Splits(fractions={"a": 0.0, "b": 1.0})) for cell in cells} == {"b"}


def test_reader_splits_keep_views_of_a_cell_together(make_dataset) -> None:
    root, written = make_dataset(40)
    reader = DatasetReader(root)
    by_cell: dict[str, set[str]] = {}
    for record in written:
        by_cell.setdefault(record.cell, set()).add(reader.split_of(record))
    assert all(len(splits) == 1 for splits in by_cell.values())
    parts = {name: list(reader.records(name)) for name in ("train", "val", "test")}
    assert sorted(r.id for part in parts.values() for r in part) == [r.id for r in written]
    assert all(reader.split_of(r) == name for name, part in parts.items() for r in part)
    with pytest.raises(DatasetError, match=r"field 'splits': unknown split 'dev'; this dataset has train, val, test"):
        reader.records("dev")


def test_torn_tail_is_skipped_by_reader_and_truncated_by_writer(make_dataset, encode) -> None:
    root, written = make_dataset(3)
    manifest = root / MANIFEST
    with manifest.open("ab") as fh:
        fh.write(TORN)
    reader = DatasetReader(root)
    with pytest.warns(UserWarning, match=r"manifest\.jsonl:4: torn last line"):
        assert list(reader) == written
    assert reader.torn_tail is not None and ":4: torn last line" in reader.torn_tail
    assert len(reader) == 3

    with pytest.warns(UserWarning, match="truncated"):
        writer = DatasetWriter(root, _info(), fsync=False)
    with writer:
        assert writer.repaired_tail is not None and ":4: torn last line" in writer.repaired_tail
        assert writer.count == 3
        with pytest.raises(DatasetError, match=r"field 'id': duplicate id 'frame-0001'"):
            writer.add(image_bytes=encode(np.zeros((3, 4), np.uint8)), image_ext="png", **_fields("frame-0001"))
        added = writer.add(image_bytes=encode(np.zeros((3, 4), np.uint8)), image_ext="png", **_fields("late"))
        assert writer.count == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(DatasetReader(root)) == [*written, added]
    assert manifest.read_bytes().count(b"\n") == 4


def test_complete_last_line_without_newline_is_kept(make_dataset, encode) -> None:
    root, written = make_dataset(2)
    manifest = root / MANIFEST
    manifest.write_bytes(manifest.read_bytes().rstrip(b"\n"))
    assert list(DatasetReader(root)) == written
    with pytest.warns(UserWarning, match="had no newline; added it"):
        writer = DatasetWriter(root, _info(), fsync=False)
    with writer:
        writer.add(image_bytes=encode(np.zeros((3, 4), np.uint8)), image_ext="png", **_fields("late"))
    assert [r.id for r in DatasetReader(root)] == ["frame-0000", "frame-0001", "late"]


def test_writer_refuses_bad_frames_before_writing_anything(tmp_path: Path, encode) -> None:
    png = encode(np.zeros((3, 4), np.uint8))
    with DatasetWriter(tmp_path / "ds", _info()) as writer:
        with pytest.raises(DatasetError, match=r"field 'labels': record 'a': unknown label\(s\) 'scratch'"):
            writer.add(image_bytes=png, image_ext="png", **_fields("a", labels=["scratch"]))
        with pytest.raises(DatasetError, match=r"images/b\.png: image_bytes are not a PNG file"):
            writer.add(image_bytes=b"GIF89a", image_ext="png", **_fields("b"))
        with pytest.raises(DatasetError, match=r"image_ext 'gif' is not one of"):
            writer.add(image_bytes=png, image_ext="gif", **_fields("c"))
        with pytest.raises(DatasetError, match=r"field 'id': record '\.\./d': id '\.\./d' must be"):
            writer.add(image_bytes=png, image_ext="png", **_fields("../d"))
        with pytest.raises(TypeError, match="derives sha256"):
            writer.add(image_bytes=png, image_ext="png", sha256="0" * 64, **_fields("e"))
        assert writer.count == 0
    assert list((tmp_path / "ds" / "images").iterdir()) == []
    assert (tmp_path / "ds" / MANIFEST).read_bytes() == b""


def test_zero_filled_tail_after_power_loss_is_torn(make_dataset, encode) -> None:
    root, written = make_dataset(2)
    with (root / MANIFEST).open("ab") as fh:
        fh.write(b"\0" * 37)
    with pytest.warns(UserWarning, match=r":3: torn last line \(37 bytes"):
        assert list(DatasetReader(root)) == written
    with pytest.warns(UserWarning, match="truncated it"), DatasetWriter(root, _info(), fsync=True):
        pass
    assert (root / MANIFEST).read_bytes().endswith(b"}\n")


def test_second_writer_is_refused_while_the_first_is_open(make_dataset) -> None:
    root, _ = make_dataset(1)
    with DatasetWriter(root, _info()), pytest.raises(DatasetError, match=r"manifest\.jsonl: another writer"):
        DatasetWriter(root, _info())
    DatasetWriter(root, _info()).close()  # the lock goes with the first writer


def test_dataset_error_keeps_its_location_when_copied() -> None:
    error = DatasetError(Path("m.jsonl"), "bad", line=3, field="width")
    clone = copy.deepcopy(error)  # the protocol worker processes use to send errors back
    assert str(clone) == "m.jsonl:3: field 'width': bad"
    assert (clone.path, clone.line, clone.field) == (Path("m.jsonl"), 3, "width")


def test_writer_refuses_to_append_with_other_classes(make_dataset) -> None:
    root, _ = make_dataset(1)
    with pytest.raises(DatasetError, match=rf"{root / INFO}: field 'classes': existing dataset has classes"):
        DatasetWriter(root, DatasetInfo(name="test", classes=["good", "bad"]))


def test_summary_counts_and_renders(make_dataset) -> None:
    root, _ = make_dataset(12)
    summary = summarize(root)
    assert json.loads(json.dumps(summary)) == summary
    assert (summary["frames"], summary["cells"]) == (12, 6)
    assert summary["labels"] == {"ok": 4, "swollen": 4, "deformed": 4}
    assert summary["views"] == {"side": 6, "top": 6}
    assert sum(s["cells"] for s in summary["splits"].values()) == 6
    assert sum(s["frames"] for s in summary["splits"].values()) == 12
    swelling = summary["severities"]["swelling"]  # per cell, non-zero only: frames 0, 2, ..., 10
    assert swelling["count"] == 5 and swelling["max_mm"] == pytest.approx(1.0)
    assert sum(swelling["counts"]) == 5 and "dent" not in summary["severities"]
    assert summary["swelling_mm"]["count"] == 6
    assert summary["image_sizes"] == {"16x12": 12}
    console = Console(record=True, width=100)
    render_summary(summary, console)
    text = console.export_text()
    assert "12 frames, 6 cells" in text and "deformed" in text and "█" in text


def test_reader_reads_grayscale_frames(tmp_path: Path, encode) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    with DatasetWriter(tmp_path / "ds", _info()) as writer:
        record = writer.add(image_bytes=encode(gray, ".png"), image_ext=".PNG", **_fields("g"))
    reader = DatasetReader(tmp_path / "ds")
    assert record.image == "images/g.png"
    assert np.array_equal(reader.read_image(record, cv2.IMREAD_GRAYSCALE), gray)
    assert reader.read_image(record).shape == (3, 4, 3)
