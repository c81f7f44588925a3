"""import_dataset: folder-per-class and CSV layouts, original bytes kept, clear errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from pouchline.datasets.importer import import_dataset
from pouchline.datasets.manifest import DatasetError, DatasetReader
from pouchline.datasets.records import check_identifier
from pouchline.datasets.summary import summarize
from pouchline.datasets.validate import validate_dataset


def _gray(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (6, 8), dtype=np.uint8)


def _colour(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (5, 7, 3), dtype=np.uint8)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def class_folders(tmp_path: Path, encode) -> Path:
    """src/ok: gray PNG, colour and gray JPEG; src/bad parts: colour BMP, BGRA PNG, gray TIFF in a sub-folder."""
    src = tmp_path / "line 3 export"
    _write(src / "ok" / "a.png", encode(_gray(1), ".png"))
    _write(src / "ok" / "b.jpg", encode(_colour(2), ".jpg"))
    _write(src / "ok" / "e.jpeg", encode(_gray(6), ".jpg"))
    _write(src / "bad parts" / "c.bmp", encode(_colour(3), ".bmp"))
    _write(src / "bad parts" / "alpha.png", encode(np.dstack([_colour(4), _gray(4)[:5, :7]]), ".png"))
    _write(src / "bad parts" / "cam 2" / "d.tif", encode(_gray(5), ".tif"))
    _write(src / ".DS_Store", b"\0\0")
    return src


def test_folder_import_keeps_original_bytes_and_geometry(class_folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = import_dataset(class_folders, out, progress=False)
    assert (result.out, result.records, result.classes, result.skipped) == (out, 6, ["bad_parts", "ok"], [])
    reader = DatasetReader(out)
    assert reader.info.aligned_crops and reader.info.spec is None and reader.info.name == "line 3 export"
    assert reader.info.source == {"kind": "folder", "path": str(class_folders)}
    records = {r.id: r for r in reader}
    assert sorted(records) == ["bad_parts_alpha", "bad_parts_c", "bad_parts_cam_2_d", "ok_a", "ok_b", "ok_e"]
    expected = {  # id: (source file, width, height, channels, stored extension)
        "ok_a": ("ok/a.png", 8, 6, 1, "png"),
        "ok_b": ("ok/b.jpg", 7, 5, 3, "jpg"),
        "ok_e": ("ok/e.jpeg", 8, 6, 1, "jpg"),
        "bad_parts_c": ("bad parts/c.bmp", 7, 5, 3, "bmp"),
        "bad_parts_alpha": ("bad parts/alpha.png", 7, 5, 3, "png"),
        "bad_parts_cam_2_d": ("bad parts/cam 2/d.tif", 8, 6, 1, "tif"),
    }
    for ident, (source, width, height, channels, ext) in expected.items():
        record, original = records[ident], class_folders / source
        assert (record.width, record.height, record.channels) == (width, height, channels)
        assert record.image == f"images/{ident}.{ext}"
        assert (out / record.image).read_bytes() == original.read_bytes()
        assert record.sha256 == hashlib.sha256(original.read_bytes()).hexdigest()
        assert record.timestamp == original.stat().st_mtime
        assert record.labels == [source.split("/")[0].replace(" ", "_")]
        assert (record.view, record.station, record.camera) == ("crop", "import", "import")
        assert (record.lot, record.cell, record.severities, record.mask) == ("line_3_export", ident, {}, None)
    assert validate_dataset(out).ok
    assert summarize(out)["swelling_mm"] is None  # no ground truth in imported data
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_folder_import_with_label_order_and_hard_links(class_folders: Path, tmp_path: Path) -> None:
    result = import_dataset(
        class_folders, tmp_path / "out", labels=["ok", "bad_parts", "other"], copy=False, progress=True, name="n"
    )
    assert result.classes == ["ok", "bad_parts", "other"]
    reader = DatasetReader(tmp_path / "out")
    assert reader.info.name == "n"
    record = next(r for r in reader if r.id == "ok_a")
    assert os.path.samefile(reader.image_path(record), class_folders / "ok" / "a.png")


def test_colliding_names_get_distinct_valid_ids(tmp_path: Path, encode) -> None:
    src = tmp_path / "src"
    png = encode(_gray(), ".png")
    for name in ("x y.png", "x_y.png", "x?y.jpg", "-" + "n" * 200 + ".png"):
        _write(src / "ok" / name, png)
    import_dataset(src, tmp_path / "out", progress=False)
    ids = [r.id for r in DatasetReader(tmp_path / "out")]  # files are walked in sorted order
    assert ids[1:] == ["ok_x_y", "ok_x_y-2", "ok_x_y-3"]
    assert all(check_identifier(i, "id") for i in ids)
    assert len(ids[0]) == 120 and ids[0].startswith("ok_-nnn")  # long names end in a hash


def test_csv_import_with_relative_absolute_multi_labels_and_meta(tmp_path: Path, encode) -> None:
    images = tmp_path / "imgs"
    _write(images / "one.png", encode(_gray(1), ".png"))
    _write(images / "two.jpg", encode(_colour(2), ".jpg"))
    elsewhere = _write(tmp_path / "other" / "three.png", encode(_colour(3), ".png"))
    csv = tmp_path / "lists" / "labels.csv"
    csv.parent.mkdir()
    csv.write_text(
        "path, label ,operator\n"
        "../imgs/one.png,ok,anna\n"
        "\n"
        f'"{elsewhere}","swollen; deformed",ben\n'
        "../imgs/two.jpg,deformed,\n",
        encoding="utf-8-sig",
    )
    result = import_dataset(csv, tmp_path / "out", progress=False)
    assert result.classes == ["deformed", "ok", "swollen"] and result.records == 3
    reader = DatasetReader(tmp_path / "out")
    assert reader.info.source == {"kind": "csv", "path": str(csv)}
    one, three, two = list(reader)
    assert (one.id, one.labels, one.channels, one.meta) == ("imgs_one", ["ok"], 1, {"operator": "anna"})
    assert one.lot == "labels"  # the CSV's name
    assert (three.id, three.labels, three.channels) == ("three", ["swollen", "deformed"], 3)
    assert (two.id, two.image, two.meta) == ("imgs_two", "images/imgs_two.jpg", {"operator": ""})
    assert validate_dataset(tmp_path / "out").ok


def test_source_errors(tmp_path: Path, encode) -> None:
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'nope'}: import source does not exist"):
        import_dataset(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'empty'}: folder is empty"):
        import_dataset(tmp_path / "empty", tmp_path / "out", progress=False)
    _write(tmp_path / "flat" / "a.png", encode(_gray(), ".png"))
    with pytest.raises(DatasetError, match=r"flat: has no class sub-folders"):
        import_dataset(tmp_path / "flat", tmp_path / "out", progress=False)
    (tmp_path / "flat" / "ok").mkdir()
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'flat' / 'a.png'}: file is not inside a class sub-folder"):
        import_dataset(tmp_path / "flat", tmp_path / "out", progress=False)
    (tmp_path / "flat" / "a.png").unlink()
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'flat' / 'ok'}: class folder has no images"):
        import_dataset(tmp_path / "flat", tmp_path / "out", progress=False)
    with pytest.raises(DatasetError, match=r"cannot import: expected a folder .* or a \.csv file"):
        import_dataset(_write(tmp_path / "list.txt", b""), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_non_image_file_is_named_or_skipped(tmp_path: Path, encode) -> None:
    src = tmp_path / "src"
    _write(src / "ok" / "a.png", encode(_gray(), ".png"))
    notes = _write(src / "ok" / "notes.png", b"not really a png")
    with pytest.raises(DatasetError, match=rf"{notes}: not a readable PNG, JPEG, BMP or TIFF image"):
        import_dataset(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    result = import_dataset(src, tmp_path / "out", progress=False, skip_bad=True)
    assert result.records == 1 and result.skipped == [f"{notes}: not a readable PNG, JPEG, BMP or TIFF image"]
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'out'}: output exists and is not an empty folder"):
        import_dataset(src, tmp_path / "out", progress=False)
    notes.with_name("a.png").unlink()
    with pytest.raises(DatasetError, match=r"no image could be imported: all 1 files were unreadable"):
        import_dataset(src, tmp_path / "out2", progress=False, skip_bad=True)


def test_unknown_label_when_labels_are_given(class_folders: Path, tmp_path: Path, encode) -> None:
    with pytest.raises(DatasetError, match=r"bad parts: unknown label 'bad_parts'; labels are \['ok'\]"):
        import_dataset(class_folders, tmp_path / "out", labels=["ok"], progress=False)
    _write(tmp_path / "a.png", encode(_gray(), ".png"))
    csv = _write(tmp_path / "l.csv", b"path,label\na.png,ok\na.png,dented\n")
    with pytest.raises(DatasetError, match=rf"{csv}:3: field 'label': unknown label 'dented'; labels are \['ok'\]"):
        import_dataset(csv, tmp_path / "out", labels=["ok"], progress=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"path,class\na.png,ok\n", r":1: field 'label': missing column 'label'; the header has \['path', 'class'\]"),
        (b"file,label\na.png,ok\n", r":1: field 'path': missing column 'path'"),
        (b"", r":1: is empty; expected a header line"),
        (b"path,label\n", r": has a header but no rows"),
        (b"path,label\na.png,ok\nmissing.png,ok\n", r":3: field 'path': image file .*missing\.png does not exist"),
        (b"path,label\na.png,ok\na.png\n", r":3: row has 1 cells, the header has 2"),
        (b"path,label\na.png, ; \n", r":2: field 'label': empty label"),
        (b"path,label\na.png,ok;swollen\n", r":2: .*'ok' cannot be combined with a defect label"),
        (b"path,label\nnotes.txt,ok\n", r":2: .*notes\.txt is not a readable PNG, JPEG, BMP or TIFF image"),
    ],
)
def test_csv_errors_name_line_and_column(tmp_path: Path, encode, text: bytes, message: str) -> None:
    _write(tmp_path / "a.png", encode(_gray(), ".png"))
    _write(tmp_path / "notes.txt", b"hello")
    csv = _write(tmp_path / "labels.csv", text)
    with pytest.raises(DatasetError, match=rf"^{csv}{message}"):
        import_dataset(csv, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
