"""Turn a dataset split into training arrays: aligned crops and their targets.

Every frame goes through the same `locate` (or `fit_crop` for datasets of aligned crops)
and `to_model_input` that live inspection uses. The result is cached next to the run, keyed
by the dataset's manifest hash, so epochs and re-runs do not decode JPEGs again.
No torch here: evaluation and inspection import this module too.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pouchline.datasets.manifest import MANIFEST, DatasetError, DatasetReader
from pouchline.datasets.records import DEFORMATION_KINDS, FrameRecord
from pouchline.models.locate import CROP_SIZE, Located, fit_crop, locate, warp_to_crop
from pouchline.models.sidelocate import SIDE_CROP_SIZE, locate_side

#: The heat map is the crop at 1/8 resolution.
HEAT_STRIDE = 8


@dataclass
class Prepared:
    """Crops and targets of one split, row-aligned."""

    crops: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # float32 (N, K): 1 where the frame carries the class
    swelling: np.ndarray  # float32 (N,), NaN where unknown
    heat: np.ndarray  # float32 (N, H/8, W/8): defect share of each heat-map cell, NaN if no truth
    kinds: np.ndarray  # object (N,): worst defect kind, 'ok', or the label for imported data
    deformations: np.ndarray  # float32 (N, kinds): 1 where the deformation kind is out of spec, NaN if unknown
    ids: np.ndarray  # object (N,): frame ids
    failed: list[str]  # frame ids the cell could not be located in

    def __len__(self) -> int:
        return len(self.ids)


def to_model_input(crop: np.ndarray, channels: int) -> np.ndarray:
    """Crop in the colour layout the model takes: grayscale (H, W, 1) or BGR (H, W, 3)."""
    if channels == 1:
        grey = crop if crop.ndim == 2 else (crop[..., 0] if crop.shape[2] == 1 else cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY))
        return grey[..., None]
    if crop.ndim == 2 or crop.shape[2] == 1:
        return np.repeat(crop.reshape(crop.shape[0], crop.shape[1], 1), 3, axis=2)
    return crop


def crop_size_of(view: str, aligned_crops: bool) -> tuple[int, int]:
    """Crop size (width, height) of a view: the side view's silhouette band has its own."""
    return SIDE_CROP_SIZE if view == "side" and not aligned_crops else CROP_SIZE


def mirrors(view: str) -> bool:
    """Whether crops of ``view`` are mirrored across their long axis, in training (augmentation)
    and at inference (`Detector.infer`): a mirrored top-view crop is another valid cell, a
    mirrored side-view crop is not (the belt is always below)."""
    return view != "side"


def align(image: np.ndarray, aligned_crops: bool, view: str = "top") -> Located:
    """The one way frames become crops, for training, evaluation and inspection alike."""
    if aligned_crops:
        return fit_crop(image)
    return locate_side(image) if view == "side" else locate(image)


def manifest_hash(root: Path) -> str:
    """SHA-256 of the manifest: identifies the exact training data."""
    digest = hashlib.sha256()
    with open(root / MANIFEST, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _worst_kind(record: FrameRecord) -> str:
    defects = [(s, k) for k, s in record.severities.items() if s > 0]
    return max(defects)[1] if defects else record.labels[0]


def _prepare_one(args: tuple[str, str, bool, int, list[str], str]) -> tuple | None:
    root, record_json, aligned, channels, classes, view = args
    reader_root = Path(root)
    record = FrameRecord.model_validate_json(record_json)
    image = cv2.imread(str(reader_root / record.image), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(reader_root / record.image, "cannot be decoded as an image")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    located = align(image, aligned, view)
    if located.status != "ok" or located.crop is None:
        return None
    crop = to_model_input(located.crop, channels)
    labels = np.array([1.0 if name in record.labels else 0.0 for name in classes], np.float32)
    crop_size = (crop.shape[1], crop.shape[0])
    heat_size = (crop_size[0] // HEAT_STRIDE, crop_size[1] // HEAT_STRIDE)
    heat = np.full(heat_size[::-1], np.nan, np.float32)
    if record.mask is not None:
        mask = cv2.imread(str(reader_root / record.mask), cv2.IMREAD_GRAYSCALE)
        crop_mask = warp_to_crop((mask > 0).astype(np.float32), located, crop_size, interpolation=cv2.INTER_LINEAR)
        heat = cv2.resize(crop_mask, heat_size, interpolation=cv2.INTER_AREA)
    elif record.ground_truth is not None or "ok" in record.labels:
        heat = np.zeros(heat_size[::-1], np.float32)
    swelling = record.ground_truth.swelling_mm if record.ground_truth is not None else np.nan
    if record.ground_truth is not None:
        deformations = np.array([1.0 if record.severities.get(k, 0.0) > 0 else 0.0 for k in DEFORMATION_KINDS], np.float32)
    else:
        deformations = np.full(len(DEFORMATION_KINDS), np.nan, np.float32)
    return crop, labels, np.float32(swelling), heat, _worst_kind(record), record.id, deformations


def prepare(root: Path, split: str | None, *, channels: int, classes: list[str], view: str = "top",
            cache_dir: Path | None = None, workers: int = 1, progress: bool = True) -> Prepared:
    """Crops and targets of a dataset split (all frames of ``view``; all splits if None)."""
    reader = DatasetReader(root)
    aligned = reader.info.aligned_crops
    # The version names what a frame's crop and targets are made by: bump it when locate or
    # the targets change (v3: locate joins the pieces of a dark cell on a dark belt; v4: its
    # edge threshold no longer depends on how many threads OpenCV runs).
    key = hashlib.sha256(f"v4:{manifest_hash(root)}:{split}:{channels}:{classes}:{view}:{crop_size_of(view, aligned)}".encode()).hexdigest()[:16]
    cache = None if cache_dir is None else cache_dir / f"{split or 'all'}-{key}.npz"
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            return Prepared(data["crops"], data["labels"], data["swelling"], data["heat"], data["kinds"].astype(object),
                            data["deformations"], data["ids"].astype(object), list(data["failed"]))
    wanted = "crop" if aligned else view
    records = [r for r in reader.records(split) if r.view == wanted]
    if not records:
        raise DatasetError(root, f"has no '{wanted}' frames in split {split or 'any'}: nothing to train or evaluate on")
    jobs = [(str(root), r.model_dump_json(), aligned, channels, classes, view) for r in records]
    rows: list[tuple | None] = []
    with Progress(TextColumn(f"[bold]prepare {split or 'all'}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("frames", total=len(jobs))
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for row in pool.imap(_prepare_one, jobs, chunksize=32):
                    rows.append(row)
                    bar.advance(task)
        else:
            for job in jobs:
                rows.append(_prepare_one(job))
                bar.advance(task)
    failed = [r.id for r, row in zip(records, rows) if row is None]
    kept = [row for row in rows if row is not None]
    if not kept:
        raise DatasetError(root, f"no cell could be located in any of the {len(records)} frames")
    prepared = Prepared(
        crops=np.stack([k[0] for k in kept]),
        labels=np.stack([k[1] for k in kept]),
        swelling=np.array([k[2] for k in kept], np.float32),
        heat=np.stack([k[3] for k in kept]),
        kinds=np.array([k[4] for k in kept], dtype=object),
        deformations=np.stack([k[6] for k in kept]),
        ids=np.array([k[5] for k in kept], dtype=object),
        failed=failed,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, crops=prepared.crops, labels=prepared.labels, swelling=prepared.swelling,
                 heat=prepared.heat, kinds=prepared.kinds.astype(str), deformations=prepared.deformations,
                 ids=prepared.ids.astype(str),
                 failed=np.array(failed, dtype=str))
    return prepared
