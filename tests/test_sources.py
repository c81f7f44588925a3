"""Frame sources: camera (driven by a real VideoCapture of a file), video file, image folder,
synthetic conveyor and dataset replay, their configs, failures and pacing."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from pouchline.datasets.manifest import DatasetReader
from pouchline.datasets.synth import SynthConfig, cell_id, synthesize
from pouchline.station.capture import CameraConfig, CameraSource
from pouchline.station.filesource import ImageFolderConfig, ImageFolderSource, VideoFileConfig, VideoFileSource
from pouchline.station.replay import ReplayConfig, ReplaySource
from pouchline.station.source import FrameSource, SourceConfig, SourceError, SourceFrame, build_source
from pouchline.station.synthetic import SyntheticConfig, SyntheticSource

SIZE = (320, 240)
BY_ID = "/dev/v4l/by-id/usb-Pouchline_TestCam_0001-video-index0"
SOURCE_CONFIG: TypeAdapter[SourceConfig] = TypeAdapter(SourceConfig)


def write_video(path: Path, frames: int, fourcc: str = "MJPG") -> Path:
    """A real video file of numbered frames, written by OpenCV's FFmpeg backend."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25, SIZE)
    assert writer.isOpened(), f"cannot write {fourcc} to {path.suffix}"
    for index in range(frames):
        image = np.full((SIZE[1], SIZE[0], 3), (20 + 3 * index, 90, 200 - 3 * index), np.uint8)
        cv2.putText(image, str(index), (90, 160), cv2.FONT_HERSHEY_SIMPLEX, 4, (255, 255, 255), 8)
        writer.write(image)
    writer.release()
    return path


def read_all(source: FrameSource, limit: int = 1000) -> list[SourceFrame]:
    frames = []
    while len(frames) < limit and (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def read_until_error(source: FrameSource) -> tuple[list[SourceFrame], SourceError]:
    frames: list[SourceFrame] = []
    with pytest.raises(SourceError) as failure:
        while (frame := source.read()) is not None:
            frames.append(frame)
    return frames, failure.value


def decode(frame: SourceFrame) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def assert_monotonic(frames: list[SourceFrame]) -> None:
    monos = [frame.t_mono_ns for frame in frames]
    walls = [frame.t_wall for frame in frames]
    assert monos == sorted(monos) and walls == sorted(walls)
    assert abs(walls[-1] - time.time()) < 60


@pytest.fixture
def mjpeg_avi(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.avi", 12)


def packets_in_file(frames: list[SourceFrame], path: Path) -> None:
    """Each JPEG payload is a byte run of the file, in file order: the stored packets, unchanged."""
    data, at = path.read_bytes(), 0
    for frame in frames:
        assert frame.encoding == "jpeg" and frame.payload[:2] == b"\xff\xd8"
        found = data.find(frame.payload, at)
        assert found >= 0, "payload is not a byte run of the file"
        at = found + len(frame.payload)


# --- video file -----------------------------------------------------------------------------


def test_mjpeg_video_passthrough_forwards_the_files_own_jpeg_packets(mjpeg_avi: Path) -> None:
    source = VideoFileSource(VideoFileConfig(kind="video", path=mjpeg_avi))
    source.open()
    frames = read_all(source)
    source.close()
    assert len(frames) == 12
    packets_in_file(frames, mjpeg_avi)
    assert {(f.width, f.height, f.channels) for f in frames} == {(320, 240, 3)}
    assert_monotonic(frames)
    assert source.policy == "every" and source.name == f"video:{mjpeg_avi}"

    decoded = VideoFileSource(VideoFileConfig(kind="video", path=mjpeg_avi, passthrough=False))
    decoded.open()
    pixels = read_all(decoded)
    decoded.close()
    assert [f.encoding for f in pixels] == ["raw"] * 12
    assert pixels[0].payload.shape == (240, 320, 3) and pixels[0].payload.dtype == np.uint8
    for jpeg, raw in zip(frames, pixels, strict=True):  # the same pictures, whichever decoder
        assert np.abs(decode(jpeg).astype(int) - raw.payload).mean() < 2


def test_a_video_that_is_not_mjpeg_is_decoded(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", 5, fourcc="mp4v")
    source = VideoFileSource(VideoFileConfig(kind="video", path=video, passthrough=True))
    source.open()
    frames = read_all(source)
    assert [(f.encoding, f.payload.shape) for f in frames] == [("raw", (240, 320, 3))] * 5


@pytest.mark.parametrize("passthrough", [True, False])
def test_a_truncated_video_fails_naming_the_file_and_frame(tmp_path: Path, passthrough: bool) -> None:
    video = write_video(tmp_path / "clip.avi", 40)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    source = VideoFileSource(VideoFileConfig(kind="video", path=video, passthrough=passthrough))
    source.open()
    frames, error = read_until_error(source)
    assert 5 < len(frames) < 40, "frames flowed, then the cut was met"
    assert "clip.avi" in str(error)
    number = re.search(r"frame (\d+)", str(error))
    assert number and int(number.group(1)) == len(frames) + 1, str(error)
    assert all(f.encoding == ("jpeg" if passthrough else "raw") for f in frames)
    if passthrough:  # the cut packet itself is refused, never forwarded half
        assert "truncated" in str(error)
        for frame in frames:
            assert bytes(frame.payload).rstrip(b"\0").endswith(b"\xff\xd9")


def test_an_mp4_cut_before_its_index_fails_to_open(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", 10, fourcc="mp4v")
    video.write_bytes(video.read_bytes()[:-2000])
    source = VideoFileSource(VideoFileConfig(kind="video", path=video))
    with pytest.raises(SourceError, match=r"clip\.mp4: cannot be opened"):
        source.open()


def test_missing_video_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nope.avi: no such file"):
        VideoFileSource(VideoFileConfig(kind="video", path=tmp_path / "nope.avi")).open()


def test_video_loops_and_is_paced(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", 4)
    source = VideoFileSource(VideoFileConfig(kind="video", path=video, loop=True, fps=50))
    source.open()
    started = time.monotonic()
    frames = read_all(source, limit=10)
    elapsed = time.monotonic() - started
    source.close()
    assert [f.payload for f in frames[4:8]] == [f.payload for f in frames[:4]]
    assert 0.18 <= elapsed < 1.5
    spread = (frames[-1].t_mono_ns - frames[0].t_mono_ns) / 1e9
    assert 0.17 <= spread < 1.5


def test_close_then_open_starts_the_stream_again(mjpeg_avi: Path) -> None:
    source = VideoFileSource(VideoFileConfig(kind="video", path=mjpeg_avi))
    source.open()
    first = [source.read() for _ in range(3)]
    source.close()
    source.close()  # twice is fine
    source.open()
    again = source.read()
    assert again is not None and again.payload == first[0].payload
    assert again.t_mono_ns > first[-1].t_mono_ns


# --- camera ---------------------------------------------------------------------------------


class Factory:
    """A capture factory over a real video file: the only stand-in for a USB camera.

    ``packets`` sets FFmpeg's raw packet mode, which hands out whole JPEG files exactly as a
    V4L2 camera does for MJPEG with CONVERT_RGB off.
    """

    def __init__(self, video: Path, *, packets: bool) -> None:
        self.video, self.packets, self.devices = video, packets, []

    def __call__(self, device: int | str) -> cv2.VideoCapture:
        self.devices.append(device)
        capture = cv2.VideoCapture(str(self.video), cv2.CAP_FFMPEG)
        if self.packets:
            assert capture.set(cv2.CAP_PROP_FORMAT, -1)
        return capture


def camera(**settings: object) -> CameraConfig:
    return CameraConfig(kind="camera", device=BY_ID, width=320, height=240, **settings)


def test_camera_forwards_its_mjpeg_and_an_unplug_is_an_error(mjpeg_avi: Path) -> None:
    factory = Factory(mjpeg_avi, packets=True)
    source = CameraSource(camera(exposure=50, gain=2), capture_factory=factory)
    assert source.policy == "newest" and source.name == f"camera:{BY_ID}"
    source.open()
    frames, error = read_until_error(source)
    assert len(frames) == 12
    packets_in_file(frames, mjpeg_avi)
    assert {(f.width, f.height, f.exposure, f.gain) for f in frames} == {(320, 240, 50, 2)}
    # The capture's own buffers, not copies (each read hands out a new one: the contents above
    # were compared after all twelve reads), and checked once, here, for the transport.
    assert all(f.checked and isinstance(f.payload, memoryview) and isinstance(f.payload.obj, np.ndarray)
               for f in frames)
    assert_monotonic(frames)
    assert str(error) == f"camera:{BY_ID}: no frame after 12 frames (unplugged or stalled)"

    source.close()  # what the station does before it reconnects
    source.open()
    again = source.read()
    assert again.payload == frames[0].payload
    assert factory.devices == [BY_ID, BY_ID]
    source.close()


def test_camera_without_passthrough_forwards_pixels(mjpeg_avi: Path) -> None:
    source = CameraSource(camera(passthrough=False), capture_factory=Factory(mjpeg_avi, packets=False))
    source.open()
    frame = source.read()
    source.close()
    assert frame.encoding == "raw" and frame.payload.shape == (240, 320, 3)
    assert (frame.width, frame.height, frame.channels, frame.exposure) == (320, 240, 3, None)


def test_camera_passthrough_refuses_a_buffer_that_is_not_a_jpeg(mjpeg_avi: Path) -> None:
    # The capture reports MJPG but, told not to convert, hands out a decoded plane: never forward it as JPEG.
    source = CameraSource(camera(), capture_factory=Factory(mjpeg_avi, packets=False))
    source.open()
    with pytest.raises(SourceError, match=r"camera:/dev/v4l/by-id/.*: frame 1: not a JPEG or PNG image"):
        source.read()


def test_camera_that_cannot_open_or_delivers_another_size(mjpeg_avi: Path, tmp_path: Path) -> None:
    unplugged = CameraSource(camera(), capture_factory=lambda device: cv2.VideoCapture(str(tmp_path / "gone.avi")))
    with pytest.raises(SourceError, match=r"camera:/dev/v4l/by-id/\S+: cannot open the camera"):
        unplugged.open()
    wrong = CameraSource(CameraConfig(kind="camera", device=0), capture_factory=Factory(mjpeg_avi, packets=True))
    with pytest.raises(SourceError, match="camera:0: delivers 320x240, not the configured 640x480"):
        wrong.open()


@pytest.mark.parametrize("device", ["video0", "/tmp/cam", "/dev/../etc/passwd", -1])
def test_camera_device_must_be_an_index_or_a_dev_path(device: object) -> None:
    with pytest.raises(ValidationError, match="device"):
        CameraConfig(kind="camera", device=device)


# --- image folder -------------------------------------------------------------------------


def test_folder_forwards_file_bytes_in_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    images = {
        "frame10.png": cv2.imencode(".png", np.full((24, 32, 3), 10, np.uint8))[1].tobytes(),
        "frame2.jpg": cv2.imencode(".jpg", np.full((48, 64, 3), 2, np.uint8))[1].tobytes(),
        "frame1.jpg": cv2.imencode(".png", np.full((12, 16), 1, np.uint8))[1].tobytes(),  # a PNG named .jpg
    }
    for name, data in images.items():
        (folder / name).write_bytes(data)
    source = ImageFolderSource(ImageFolderConfig(kind="folder", path=folder, pattern="frame*"))
    source.open()
    frames = read_all(source)
    assert [f.payload for f in frames] == [images["frame1.jpg"], images["frame2.jpg"], images["frame10.png"]]
    assert [(f.encoding, f.width, f.height, f.channels) for f in frames] == [
        ("png", 16, 12, 1), ("jpeg", 64, 48, 3), ("png", 32, 24, 3)]
    assert_monotonic(frames)


def test_folder_refuses_a_file_that_is_not_a_whole_image(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 99, np.uint8))[1].tobytes()
    (folder / "a.jpg").write_bytes(jpeg)
    (folder / "b.jpg").write_bytes(b"not an image at all")
    (folder / "c.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    source = ImageFolderSource(ImageFolderConfig(kind="folder", path=folder))
    source.open()
    assert source.read().payload == jpeg
    with pytest.raises(SourceError, match=r"b\.jpg: not a JPEG or PNG image"):
        source.read()
    with pytest.raises(SourceError, match=r"c\.jpg: JPEG ends without its end-of-image marker .*truncated"):
        source.read()


def test_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="missing: no such folder"):
        ImageFolderSource(ImageFolderConfig(kind="folder", path=tmp_path / "missing")).open()
    with pytest.raises(SourceError, match=r"no file matches '\*\.png'"):
        ImageFolderSource(ImageFolderConfig(kind="folder", path=tmp_path, pattern="*.png")).open()


def test_folder_loops_at_its_pace(tmp_path: Path) -> None:
    for index in range(3):
        cv2.imwrite(str(tmp_path / f"{index}.jpg"), np.full((24, 32, 3), 50 * index, np.uint8))
    source = ImageFolderSource(ImageFolderConfig(kind="folder", path=tmp_path, loop=True, fps=50))
    source.open()
    started = time.monotonic()
    frames = read_all(source, limit=10)
    elapsed = time.monotonic() - started
    assert [f.payload for f in frames[3:6]] == [f.payload for f in frames[:3]]
    assert 0.18 <= elapsed < 1.5


# --- synthetic and replay -----------------------------------------------------------------


def synthetic(**settings: object) -> SyntheticConfig:
    return SyntheticConfig.model_validate({"kind": "synthetic", "seed": 5, "size": [320, 240], "cells_per_s": 0,
                                           "defect_rate": 0.5, **settings})


def test_synthetic_cells_come_with_tags_and_truth() -> None:
    source = SyntheticSource(synthetic(count=3, views=["top", "side"]))
    source.open()
    frames = read_all(source)
    assert len(frames) == 6
    assert [(f.cell.cell, f.cell.view, f.cell.views) for f in frames] == [
        (cell_id(5, index), view, 2) for index in range(3) for view in ("top", "side")]
    assert {f.cell.lot for f in frames} == {"s5-lot0000"}
    for frame in frames:
        assert (frame.encoding, frame.width, frame.height, frame.channels) == ("jpeg", 320, 240, 3)
        assert decode(frame).shape == (240, 320, 3)
        assert frame.truth["labels"] and set(frame.truth["severities"]) >= {"swelling", "dent"}
        truth = frame.truth["ground_truth"]
        assert (truth["seed"], truth["index"]) == (5, int(frame.cell.cell[-6:]))
        assert truth["render"]["view"] == frame.cell.view
    assert_monotonic(frames)
    source.close()
    source.open()  # the same stream again
    assert source.read().payload == frames[0].payload


def test_synthetic_is_paced_on_the_monotonic_clock() -> None:
    source = SyntheticSource(synthetic(count=10, cells_per_s=50))
    source.open()
    started = time.monotonic()
    frames = read_all(source)
    elapsed = time.monotonic() - started
    assert len(frames) == 10 and 0.18 <= elapsed < 1.5
    offsets = [(f.t_mono_ns - frames[0].t_mono_ns) / 1e9 for f in frames]
    assert offsets[-1] >= 0.179, offsets


@pytest.fixture
def synth_dataset(tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    synthesize(out, SynthConfig(count=3, seed=5, views=("top", "side"), size=SIZE, defect_rate=0.5), progress=False)
    return out


def test_replay_forwards_stored_bytes_and_truth_as_the_synthetic_source_renders_them(synth_dataset: Path) -> None:
    source = ReplaySource(ReplayConfig(kind="replay", path=synth_dataset, fast=True))
    source.open()
    replayed = read_all(source)
    reader = DatasetReader(synth_dataset)
    records = list(reader)
    assert [f.payload for f in replayed] == [reader.image_path(r).read_bytes() for r in records]
    assert [(f.cell.cell, f.cell.lot, f.cell.view, f.cell.views) for f in replayed] == [
        (r.cell, r.lot, r.view, 2) for r in records]
    assert [f.truth["labels"] for f in replayed] == [r.labels for r in records]
    assert_monotonic(replayed)

    live = SyntheticSource(synthetic(count=3, views=["top", "side"]))
    live.open()
    rendered = read_all(live)
    assert [f.payload for f in rendered] == [f.payload for f in replayed]
    assert [f.cell for f in rendered] == [f.cell for f in replayed]
    assert [f.truth for f in rendered] == [f.truth for f in replayed]


def test_replay_filters_views_and_loops(synth_dataset: Path) -> None:
    source = ReplaySource(ReplayConfig(kind="replay", path=synth_dataset, fast=True, views=["side"], loop=True))
    source.open()
    frames = read_all(source, limit=5)
    assert [f.cell.view for f in frames] == ["side"] * 5
    assert [f.cell.views for f in frames] == [1] * 5
    assert [f.cell.cell for f in frames] == [cell_id(5, i % 3) for i in range(5)]
    source.close()
    source.open()
    assert source.read().payload == frames[0].payload


def test_replay_keeps_recorded_timing_divided_by_speed(make_dataset: Callable[..., tuple[Path, list]]) -> None:
    root, records = make_dataset(10)  # frames 1 s apart, two per cell
    source = ReplaySource(ReplayConfig(kind="replay", path=root, speed=50))
    source.open()
    started = time.monotonic()
    frames = read_all(source)
    elapsed = time.monotonic() - started
    assert len(frames) == 10 and 0.18 <= elapsed < 1.5
    assert [f.cell.views for f in frames] == [2] * 10
    assert [(f.encoding, f.width, f.height) for f in frames] == [("png", 16, 12)] * 10
    assert frames[0].truth["ground_truth"]["polygon"] == [[1.0, 1.0], [14.0, 1.0], [14.0, 10.0]]


def test_replay_names_dataset_record_and_file_of_a_missing_or_changed_image(
    make_dataset: Callable[..., tuple[Path, list]],
) -> None:
    root, records = make_dataset(4)
    (root / records[1].image).unlink()
    (root / records[2].image).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    source = ReplaySource(ReplayConfig(kind="replay", path=root, fast=True))
    source.open()
    assert source.read() is not None
    with pytest.raises(SourceError) as missing:
        source.read()
    assert str(missing.value).startswith(f"replay:{root}: record 'frame-0001': image {records[1].image}: ")
    with pytest.raises(SourceError, match=r"record 'frame-0002': image images/frame-0002\.png: .*sha256"):
        source.read()


def test_replay_of_a_folder_that_is_no_dataset(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"replay:.*dataset\.json: missing"):
        ReplaySource(ReplayConfig(kind="replay", path=tmp_path)).open()


# --- configs and build_source -------------------------------------------------------------


KINDS = {
    "camera": ({"device": 0}, CameraSource, "newest"),
    "video": ({"path": "clip.avi"}, VideoFileSource, "every"),
    "folder": ({"path": "frames"}, ImageFolderSource, "every"),
    "synthetic": ({"count": 2}, SyntheticSource, "every"),
    "replay": ({"path": "ds"}, ReplaySource, "every"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_build_source_for_each_kind(kind: str) -> None:
    settings, cls, policy = KINDS[kind]
    source = build_source(SOURCE_CONFIG.validate_python({"kind": kind, **settings}))
    assert type(source) is cls and source.policy == policy and source.name.startswith(f"{kind}:")


@pytest.mark.parametrize("kind", KINDS)
def test_a_typo_in_a_source_config_names_the_key(kind: str) -> None:
    settings, _, _ = KINDS[kind]
    with pytest.raises(ValidationError) as error:
        SOURCE_CONFIG.validate_python({"kind": kind, **settings, "lopo": True})
    assert [(e["loc"], e["type"]) for e in error.value.errors()] == [((kind, "lopo"), "extra_forbidden")]


def test_config_values_are_checked() -> None:
    with pytest.raises(ValidationError, match="kind"):
        SOURCE_CONFIG.validate_python({"kind": "webcam", "device": 0})
    with pytest.raises(ValidationError, match="size 10x10 is outside"):
        synthetic(size=[10, 10])
    with pytest.raises(ValidationError, match="neither a built-in"):
        synthetic(domain="no-such-domain")
    with pytest.raises(ValidationError, match="unknown deformation kinds"):
        synthetic(kinds=["dent", "scratch"])
    with pytest.raises(ValidationError, match="speed"):
        SOURCE_CONFIG.validate_python({"kind": "replay", "path": "ds", "speed": 0})
    with pytest.raises(ValidationError, match="fourcc"):
        CameraConfig(kind="camera", device=0, fourcc="MJPEG")
