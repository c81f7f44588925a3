"""`pouchline model eval`: metrics and plots of a shipped ONNX model on a labelled dataset.

Frames go through `Inferencer.predict`, the same code as live inspection, decode and
locate included. The report folder gets:

* ``metrics.json`` (also where ``--json`` points);
* ``roc.png`` and ``pr.png``: ROC and PR curves per defect and for the anomaly score;
* ``confusion.png``: the confusion matrix at the shipped thresholds;
* ``swelling.png``: predicted against true swelling;
* ``worst.png``: a grid of the worst errors with heat-map overlays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pouchline.datasets.manifest import DatasetError, DatasetReader
from pouchline.datasets.records import DEFORMATION_KINDS, FrameRecord
from pouchline.models.inference import Inferencer, Prediction
from pouchline.models.metadata import ModelError, ModelMetadata
from pouchline.models.metrics import auroc, pr_curve, roc_curve

#: Swollen recall is specified for swelling of at least this much (mm).
SWOLLEN_RECALL_FROM_MM = 0.5
_BATCH = 32


@dataclass
class Scored:
    """Everything evaluation needs about one frame."""

    record: FrameRecord
    prediction: Prediction


def _score(model: Inferencer, reader: DatasetReader, records: list[FrameRecord], view: str,
           progress: bool) -> list[Scored]:
    scored: list[Scored] = []
    with Progress(TextColumn(f"[bold]eval {view}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress or not records) as bar:
        task = bar.add_task("frames", total=len(records))
        for start in range(0, len(records), _BATCH):
            chunk = records[start : start + _BATCH]
            images = [reader.read_image(r, cv2.IMREAD_UNCHANGED) for r in chunk]
            for record, prediction in zip(chunk, model.predict(images)):
                scored.append(Scored(record, prediction))
            bar.advance(task, len(chunk))
    return scored


def group_cells(views: dict[str, list[Scored]]) -> dict[tuple[str, str], dict[str, Scored]]:
    """Each cell's frames, by view (a cell id is unique within its lot)."""
    cells: dict[tuple[str, str], dict[str, Scored]] = {}
    for view, scored in views.items():
        for item in scored:
            cells.setdefault((item.record.lot, item.record.cell), {})[view] = item
    return cells


def merge_views(views: dict[str, list[Scored]], metas: dict[str, ModelMetadata]) -> tuple[list[Scored], int]:
    """Per-view predictions joined into one per cell, as the line decides a cell: worst view wins.

    A cell is flagged by anything any view flags; its probabilities are the largest over
    the views (for AUROC); its anomaly score is the largest score relative to its model's
    threshold (so 1.0 is the threshold); its swelling is the thickness gauge's (`gauge_view`).
    A cell some view could not locate keeps that status and counts as not located. Returns
    the cells judged by every view and the number of cells some view has no frame of.
    """
    gauge = gauge_view(metas)
    merged, incomplete = [], 0
    for per_view in group_cells(views).values():
        if len(per_view) < len(views):
            incomplete += 1
            continue
        predictions = {view: item.prediction for view, item in per_view.items()}
        unlocated = [p.status for p in predictions.values() if p.status != "ok"]
        if unlocated:
            merged.append(Scored(per_view[gauge].record, Prediction(status=unlocated[0])))
            continue
        outputs = metas[gauge].outputs
        merged.append(Scored(per_view[gauge].record, Prediction(
            status="ok",
            probs={name: max(p.probs[name] for p in predictions.values()) for name in outputs},
            flagged=sorted({flag for p in predictions.values() for flag in p.flagged}),
            anomaly=max(p.anomaly / metas[view].anomaly_threshold for view, p in predictions.items()),
            swelling_mm=predictions[gauge].swelling_mm, swelling_pct=predictions[gauge].swelling_pct,
        )))
    return merged, incomplete


def gauge_view(metas: dict[str, ModelMetadata]) -> str:
    """The view whose swelling estimate a cell reports: the model with the smallest swelling
    error on its validation split (a side silhouette measures thickness; a top view infers it)."""
    return min(metas, key=lambda view: metas[view].metrics.get("val_swelling_mae_mm", float("inf")))


def _defect_kinds(record: FrameRecord) -> set[str]:
    return {kind for kind, severity in record.severities.items() if severity > 0 and kind in DEFORMATION_KINDS}


def _flag_share(items: list[Scored], flag: str) -> float:
    """Share of items flagged with ``flag`` (NaN for none)."""
    return float(np.mean([flag in s.prediction.flagged for s in items])) if items else float("nan")


def compute_metrics(scored: list[Scored], meta: ModelMetadata) -> dict[str, Any]:
    """The metrics JSON: per-output recall/AUROC, false rejects, swelling error, anomaly recall.

    Recalls count what was flagged, so the same code scores one model's frames and the
    cells that several views judged together (`merge_views`)."""
    located = [s for s in scored if s.prediction.status == "ok"]
    metrics: dict[str, Any] = {
        "images": len(scored),
        "not_located": {status: sum(s.prediction.status == status for s in scored) for status in ("no_cell", "partial_cell")},
        "thresholds": meta.thresholds,
        "anomaly_threshold": meta.anomaly_threshold,
    }
    if not meta.multilabel:
        return {**metrics, **_class_metrics(located, meta.outputs)}
    good = [s for s in located if s.record.labels == ["ok"]]
    held_out = set(meta.training.get("held_out_kinds", []))
    for name in meta.outputs:
        scores = np.array([s.prediction.probs[name] for s in located])
        truth = np.array([name in s.record.labels for s in located])
        if name == "swollen":
            eligible = np.array([s.record.ground_truth is None or s.record.ground_truth.swelling_mm >= SWOLLEN_RECALL_FROM_MM
                                 for s in located])
            positives = truth & eligible
        elif name == "deformed" and held_out:
            positives = truth & np.array([not (_defect_kinds(s.record) <= held_out) for s in located])
        else:
            positives = truth
        metrics[name] = {
            "auroc": auroc(scores, truth),
            "recall": _flag_share([s for s, keep in zip(located, positives) if keep], name),
            "recall_all": _flag_share([s for s, keep in zip(located, truth) if keep], name),
            "positives": int(positives.sum()),
        }
    if good:
        # What the line does: a cell that anything flags is rejected.
        metrics["false_reject_rate"] = float(np.mean([bool(s.prediction.flagged) for s in good]))
        metrics["false_reject_rate_defect_outputs"] = float(np.mean([bool(set(s.prediction.flagged) - {"anomaly"})
                                                                    for s in good]))
        metrics["good_images"] = len(good)
        if held_out:
            # Good cells may carry an in-spec mark of the held-out kind, which the model has
            # never seen in any size; how many of the false rejects those marks cause:
            familiar = [s for s in good if not _marks(s.record) & held_out]
            metrics["false_reject_rate_without_unseen_marks"] = float(np.mean([bool(s.prediction.flagged)
                                                                                for s in familiar]))
    else:
        metrics["false_reject_rate"] = float("nan")
    with_truth = [s for s in located if s.record.ground_truth is not None]
    if meta.has_swelling and with_truth:
        errors = np.array([s.prediction.swelling_mm - s.record.ground_truth.swelling_mm for s in with_truth])  # type: ignore[union-attr]
        metrics["swelling_mae_mm"] = float(np.abs(errors).mean())
        metrics["swelling_p95_abs_error_mm"] = float(np.percentile(np.abs(errors), 95))
    metrics["per_kind"] = _per_kind(located)
    anomaly_scores = np.array([s.prediction.anomaly for s in located])
    defective = np.array([s.record.labels != ["ok"] for s in located])
    unseen = [s for s in located if _defect_kinds(s.record) & held_out]
    metrics["anomaly"] = {
        "auroc": auroc(anomaly_scores, defective),
        "held_out_kinds": sorted(held_out),
        "recall_unseen": _flag_share(unseen, "anomaly"),
        "unseen_images": len(unseen),
    }
    return metrics


def _marks(record: FrameRecord) -> set[str]:
    """Deformation kinds drawn on a cell, in spec or not (renderer truth; empty without it)."""
    render = record.ground_truth.render if record.ground_truth is not None else {}
    return {mark["kind"] for mark in render.get("deformations", []) if isinstance(mark, dict) and "kind" in mark}


def _per_kind(located: list[Scored]) -> dict[str, dict[str, float]]:
    """Per deformation kind: caught by the `deformed` output, by the anomaly score, and
    rejected at all (any output flagged: what the line actually does with the cell)."""
    result = {}
    for kind in DEFORMATION_KINDS:
        cells = [s for s in located if kind in _defect_kinds(s.record)]
        if cells:
            result[kind] = {
                "cells": len(cells),
                "deformed_recall": float(np.mean(["deformed" in s.prediction.flagged for s in cells])),
                "anomaly_recall": float(np.mean(["anomaly" in s.prediction.flagged for s in cells])),
                "rejected": float(np.mean([bool(s.prediction.flagged) for s in cells])),
            }
    return result


def _class_metrics(located: list[Scored], classes: list[str]) -> dict[str, Any]:
    """Multi-class models (imported datasets): accuracy, and recall and AUROC per class."""
    truth = np.array([classes.index(s.record.labels[0]) if s.record.labels[0] in classes else -1 for s in located])
    guess = np.array([classes.index(s.prediction.flagged[0]) for s in located])
    result: dict[str, Any] = {"accuracy": float((truth == guess).mean()) if len(truth) else float("nan")}
    for k, name in enumerate(classes):
        scores = np.array([s.prediction.probs[name] for s in located])
        result[name] = {"recall": float((guess[truth == k] == k).mean()) if (truth == k).any() else float("nan"),
                        "auroc": auroc(scores, truth == k), "images": int((truth == k).sum())}
    return result


def _plots(scored: list[Scored], model: Inferencer, reader: DatasetReader, report: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = model.meta
    located = [s for s in scored if s.prediction.status == "ok"]
    curves = {name: (np.array([s.prediction.probs[name] for s in located]),
                     np.array([name in s.record.labels for s in located])) for name in meta.outputs}
    curves["anomaly"] = (np.array([s.prediction.anomaly for s in located]),
                         np.array([s.record.labels != ["ok"] for s in located]))
    for kind, title in (("roc", "ROC"), ("pr", "Precision-recall")):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for name, (scores, truth) in curves.items():
            if truth.all() or not truth.any():
                continue
            if kind == "roc":
                fpr, tpr = roc_curve(scores, truth)
                ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(scores, truth):.4f})")
                ax.set_xlabel("false-positive rate")
                ax.set_ylabel("true-positive rate")
                ax.set_xscale("symlog", linthresh=0.01)
            else:
                rec, prec = pr_curve(scores, truth)
                ax.plot(rec, prec, label=name)
                ax.set_xlabel("recall")
                ax.set_ylabel("precision")
        ax.set_title(f"{title}: {reader.info.name}")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(report / f"{kind}.png", dpi=110)
        plt.close(fig)

    names = ["ok", *meta.outputs] if meta.multilabel else list(meta.outputs)
    matrix = np.zeros((len(names), len(names)), int)
    for s in located:
        predicted = [n for n in meta.outputs if n in s.prediction.flagged] or ["ok"]  # multi-class: the top class
        for truth in s.record.labels:
            for guess in predicted:
                if truth in names:
                    matrix[names.index(truth), names.index(guess)] += 1
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted (at shipped thresholds)")
    ax.set_ylabel("true label")
    fig.tight_layout()
    fig.savefig(report / "confusion.png", dpi=110)
    plt.close(fig)

    with_truth = [s for s in located if s.record.ground_truth is not None]
    if meta.has_swelling and with_truth:
        true = np.array([s.record.ground_truth.swelling_mm for s in with_truth])  # type: ignore[union-attr]
        predicted = np.array([s.prediction.swelling_mm for s in with_truth])
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(true, predicted, s=4, alpha=0.4)
        top = max(float(true.max()), float(predicted.max()), 0.5)
        ax.plot([0, top], [0, top], "k--", lw=1)
        if meta.swelling_limit_mm:
            ax.axvline(meta.swelling_limit_mm, color="r", lw=0.8, label="spec limit")
            ax.legend()
        ax.set_xlabel("true swelling (mm)")
        ax.set_ylabel("predicted swelling (mm)")
        ax.set_title(f"MAE {np.abs(predicted - true).mean():.3f} mm")
        fig.tight_layout()
        fig.savefig(report / "swelling.png", dpi=110)
        plt.close(fig)
    _worst_grid(located, model, reader, report / "worst.png")


def _error_size(s: Scored, meta: Any) -> float:
    """How wrong a prediction is: the largest probability margin on the wrong side."""
    worst = 0.0
    for name in meta.outputs:
        p, t = s.prediction.probs[name], meta.thresholds.get(name, 0.5)
        worst = max(worst, (t - p) if name in s.record.labels else (p - t))
    return worst


def _worst_grid(located: list[Scored], model: Inferencer, reader: DatasetReader, out: Path, count: int = 16) -> None:
    """The frames the model got most wrong, with its heat map over the crop."""
    worst = sorted(located, key=lambda s: _error_size(s, model.meta), reverse=True)[:count]
    tiles = []
    for s in worst:
        crop = s.prediction.located.crop if s.prediction.located is not None else None
        if crop is None or s.prediction.heatmap is None:
            continue
        crop = crop if crop.ndim == 3 and crop.shape[2] == 3 else cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
        heat = cv2.resize(s.prediction.heatmap, (crop.shape[1], crop.shape[0]))
        overlay = cv2.addWeighted(crop, 0.65, cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), 0.35, 0)
        tile = cv2.resize(overlay, (crop.shape[1] * 2, crop.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
        band = np.full((40, tile.shape[1], 3), 25, np.uint8)
        probs = " ".join(f"{k[:4]} {v:.2f}" for k, v in s.prediction.probs.items())
        cv2.putText(band, f"true {'+'.join(s.record.labels)} | {probs}", (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1)
        kinds = ",".join(sorted(_defect_kinds(s.record))) or "-"
        cv2.putText(band, f"{s.record.id} {kinds}", (4, 33), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (190, 190, 190), 1)
        tiles.append(np.vstack([tile, band]))
    if not tiles:
        return
    columns = 4
    blank = np.zeros_like(tiles[0])
    rows = [np.hstack(tiles[i : i + columns] + [blank] * (columns - len(tiles[i : i + columns])))
            for i in range(0, len(tiles), columns)]
    cv2.imwrite(str(out), np.vstack(rows))


def _view_of(model: Inferencer) -> str:
    return "crop" if model.meta.input.aligned_crops else model.meta.input.view


def load_views(paths: list[Path], threads: int = 2) -> dict[str, Inferencer]:
    """One model per view. Several must be multi-label with the same outputs: a cell's
    verdict joins their flags (`merge_views`). Checked before minutes of scoring, not after."""
    loaded: dict[str, Inferencer] = {}
    for path in paths:
        model = Inferencer(path, threads=threads)
        view = _view_of(model)
        if view in loaded:
            raise ModelError(f"{path} and {loaded[view].path} both judge '{view}' frames; give one model per view")
        loaded[view] = model
    metas = {view: model.meta for view, model in loaded.items()}
    if len(metas) > 1 and any(not meta.multilabel or meta.outputs != metas[gauge_view(metas)].outputs
                              for meta in metas.values()):
        raise ModelError("models judge cells together only when all are multi-label with the same outputs: "
                         + "; ".join(f"{m.path}: {m.meta.outputs}" for m in loaded.values()))
    return loaded


def score_views(loaded: dict[str, Inferencer], readers: list[DatasetReader], split: str | None,
                progress: bool) -> tuple[dict[str, list[Scored]], dict[str, list[tuple[DatasetReader, list[FrameRecord]]]]]:
    """Every view's frames (of ``split``) in the datasets, scored by that view's model; and
    the frames found per dataset. All views' frames are found before any is scored, so a
    missing view fails at once."""
    frames = {view: [(reader, [r for r in reader.records(split) if r.view == view]) for reader in readers]
              for view in loaded}
    for view, found in frames.items():
        if not any(records for _, records in found):
            where = readers[0].root if len(readers) == 1 else ", ".join(str(r.root) for r in readers)
            raise DatasetError(Path(str(where)), f"has no '{view}' frames{f' in split {split}' if split else ''} to score")
    scored = {view: [item for reader, records in frames[view] for item in _score(model, reader, records, view, progress)]
              for view, model in loaded.items()}
    return scored, frames


def evaluate(models: Path | list[Path], data: Path | list[Path], report: Path, *, split: str | None = None,
             threads: int = 2, progress: bool = True) -> dict[str, Any]:
    """Evaluate one model, or one model per view judging cells together, on labelled datasets.

    Each model judges the frames of its view in every dataset given. With one model the
    metrics are per frame, with the plots in ``report``. With several (say top and side),
    the metrics are per cell, the way the line decides (`merge_views`), and each view's
    own metrics and plots go under ``views`` and ``report/VIEW``.
    """
    paths = [models] if isinstance(models, Path) else list(models)
    roots = [data] if isinstance(data, Path) else list(data)
    if not paths or not roots:
        raise ValueError("evaluation needs at least one model and one dataset")
    loaded = load_views(paths, threads)
    metas = {view: model.meta for view, model in loaded.items()}
    readers = [DatasetReader(root) for root in roots]
    scored, frames = score_views(loaded, readers, split, progress)
    sources = {view: next(reader for reader, records in frames[view] if records) for view in loaded}
    report.mkdir(parents=True, exist_ok=True)
    header = {"model": ", ".join(map(str, paths)), "model_sha256": ", ".join(m.meta.sha256 for m in loaded.values()),
              "data": ", ".join(map(str, roots)), "split": split}
    if len(loaded) == 1:
        (view, model), = loaded.items()
        metrics = {**header, **compute_metrics(scored[view], model.meta)}
        _plots(scored[view], model, sources[view], report)
    else:
        gauge = gauge_view(metas)
        cells, incomplete = merge_views(scored, metas)
        metrics = {**header, "unit": "cell", "gauge_view": gauge, "cells_incomplete": incomplete,
                   **compute_metrics(cells, metas[gauge]),
                   "thresholds": {view: meta.thresholds for view, meta in metas.items()},
                   "anomaly_threshold": {view: meta.anomaly_threshold for view, meta in metas.items()},
                   "views": {}}
        for view, model in loaded.items():
            metrics["views"][view] = compute_metrics(scored[view], model.meta)
            (report / view).mkdir(exist_ok=True)
            _plots(scored[view], model, sources[view], report / view)
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
