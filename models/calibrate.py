"""`pouchline model calibrate`: set the thresholds of a station's models together, for the cell.

The line rejects a cell when any flag of any view's model fires: a defect output over its
threshold or the anomaly score over its own. The false-reject budget therefore belongs to
the cell. Training sets one model's thresholds alone: it splits that model's budget evenly
over its flags, on a validation split of about a thousand good cells. At 0.5 % that rests
each threshold on one or two cells, spends as much on a flag that catches nothing more as
on one that catches much, and the views' budgets add up past the cell's.

Here the thresholds are set on many good cells, every view of each, and the budget goes
where it catches most:

1. Every flag starts above every good cell's score: no good cell is rejected.
2. Step by step, one flag's threshold moves down past more good cells. Of all flags and
   distances, the move taken is the one that catches the most more defective cells (of a
   validation split) per good cell it newly rejects, while the good cells that any flag
   rejects, and those some view could not locate (the line rejects them too), stay within
   the target.
3. When no move catches more, or the budget is spent, every model's metadata gets its
   thresholds and a record of how they were set.

Defective cells only steer where the budget goes. The false-reject rate is counted on good
cells alone, so it holds for new good cells as far as the calibration set is like them.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pouchline.datasets.manifest import DatasetError, DatasetReader
from pouchline.models.dataprep import manifest_hash
from pouchline.models.evaluate import Scored, group_cells, load_views, score_views
from pouchline.models.metadata import CalibrationRecord, metadata_path
from pouchline.models.metrics import limits_of_sorted, thresholds_at

#: Fewest good cells the budget must allow to be rejected: below that a threshold rests on single cells.
MIN_REJECTS = 10
ANOMALY = "anomaly"


def allocate(good: np.ndarray, defective: np.ndarray, budget: int) -> np.ndarray:
    """How many good cells each flag (column) may reject: the greedy rule of the module doc.

    ``good`` and ``defective`` are cells x flags scores (higher = more suspect); ``budget``
    is how many good cells all flags together may reject.
    """
    if good.ndim != 2 or defective.ndim != 2 or good.shape[1] != defective.shape[1]:
        raise ValueError(f"score matrices must be cells x flags with the same flags: {good.shape}, {defective.shape}")
    rejects = np.zeros(good.shape[1], dtype=int)
    ordered = -np.sort(-good, axis=0)
    while True:
        limits = limits_of_sorted(ordered, rejects)
        good_hit, defective_hit = good > limits, defective > limits
        used, caught = int(good_hit.any(axis=1).sum()), int(defective_hit.any(axis=1).sum())
        best: tuple[float, int, int] | None = None
        for flag in range(good.shape[1]):
            # Cells the other flags already reject: moving this flag only adds to them.
            good_rest = np.delete(good_hit, flag, axis=1).any(axis=1)
            defective_rest = np.delete(defective_hit, flag, axis=1).any(axis=1)
            previous = limits[flag]
            for more in range(1, good.shape[0] - int(rejects[flag]) + 1):
                limit = ordered[min(rejects[flag] + more, good.shape[0] - 1), flag]
                if limit == previous:  # tied scores: the same threshold, the same cells
                    continue
                previous = limit
                cost = int((good_rest | (good[:, flag] > limit)).sum()) - used
                if used + cost > budget:
                    break
                gain = int((defective_rest | (defective[:, flag] > limit)).sum()) - caught
                if gain > 0 and (best is None or gain / max(cost, 0.5) > best[0]):
                    best = (gain / max(cost, 0.5), flag, more)
        if best is None:
            return rejects
        rejects[best[1]] += best[2]


def _score_value(item: Scored, flag: str) -> float:
    return item.prediction.anomaly if flag == ANOMALY else item.prediction.probs[flag]


def _cells(scored: dict[str, list[Scored]], flags: list[tuple[str, str]], good: bool) -> tuple[np.ndarray, int]:
    """Flag scores (cells x flags) of the good (or defective) cells every view has a frame of,
    and how many of them some view could not locate (the line rejects those unseen)."""
    rows, unlocated = [], 0
    for per_view in group_cells(scored).values():
        if len(per_view) < len(scored) or (per_view[flags[0][0]].record.labels == ["ok"]) != good:
            continue
        if any(item.prediction.status != "ok" for item in per_view.values()):
            unlocated += 1
            continue
        rows.append([_score_value(per_view[view], flag) for view, flag in flags])
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(flags)), unlocated


def plot_allocation(good: np.ndarray, defective: np.ndarray, flags: list[str], limits: np.ndarray,
                    rejects: np.ndarray, out: Path) -> None:
    """One panel per flag: good and defective cells' scores, and the threshold set. Where
    the two overlap is where the budget buys catches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(flags), 3)
    rows = math.ceil(len(flags) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes.flat, flags)):
        both = np.concatenate([good[:, k], defective[:, k]])
        bins = np.linspace(float(np.quantile(both, 0.001)), float(np.quantile(both, 0.999)) + 1e-9, 60)
        ax.hist(np.clip(good[:, k], bins[0], bins[-1]), bins, alpha=0.6, label=f"good ({len(good)})")
        ax.hist(np.clip(defective[:, k], bins[0], bins[-1]), bins, alpha=0.6, label=f"defective ({len(defective)})")
        ax.axvline(limits[k], color="black", linestyle="--", label=f"threshold {limits[k]:.4g}")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {int(rejects[k])} good rejected, {(defective[:, k] > limits[k]).mean():.1%} caught", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(flags):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def calibrate(models: list[Path], good: list[Path], defects: list[Path], *, defects_split: str | None = "val",
              target_frr: float = 0.005, plot: Path | None = None, threads: int = 2,
              progress: bool = True) -> dict[str, Any]:
    """Score, allocate and write every model's thresholds (and ``plot`` them); returns what
    was set and measured."""
    if not 0 < target_frr < 1:
        raise ValueError(f"--target-frr {target_frr} must lie between 0 and 1")
    if not models or not good or not defects:
        raise ValueError("calibration needs at least one model, one dataset of good cells and one of defective cells")
    loaded = load_views(list(models), threads)
    flags = [(view, flag) for view, model in loaded.items() for flag in [*model.meta.thresholds, ANOMALY]]
    good_readers = [DatasetReader(root) for root in good]
    good_scores, unlocated = _cells(score_views(loaded, good_readers, None, progress)[0], flags, good=True)
    cells = len(good_scores) + unlocated
    budget = math.floor(target_frr * cells) - unlocated
    if budget < MIN_REJECTS:
        needed = math.ceil((MIN_REJECTS + unlocated) / target_frr)
        raise DatasetError(Path(", ".join(map(str, good))),
                           f"has {cells} good cells that every view has a frame of ({unlocated} not located); a "
                           f"false-reject rate of {target_frr} needs about {needed} for the thresholds to rest on "
                           f"at least {MIN_REJECTS} rejected cells")
    defect_scores, _ = _cells(score_views(loaded, [DatasetReader(root) for root in defects], defects_split, progress)[0],
                              flags, good=False)
    if len(defect_scores) == 0:
        raise DatasetError(Path(", ".join(map(str, defects))),
                           f"has no defective cells{f' in split {defects_split}' if defects_split else ''} that every "
                           "view located: nothing to steer the budget by")
    rejects = allocate(good_scores, defect_scores, budget)
    limits = thresholds_at(good_scores, rejects)
    if plot is not None:
        plot_allocation(good_scores, defect_scores, [f"{view}.{flag}" for view, flag in flags], limits, rejects, plot)
    record = {
        "rule": "cell-level greedy: most defective cells caught per good cell rejected",
        "models": {view: model.path.name for view, model in loaded.items()},
        # The partners by content: a renamed file is still the partner, a new model under the old name is not.
        "model_sha256": {view: model.meta.sha256 for view, model in loaded.items()},
        "good_data": {str(root): manifest_hash(root) for root in good},
        "defect_data": {str(root): manifest_hash(root) for root in defects}, "defects_split": defects_split,
        "good_cells": cells, "good_not_located": unlocated, "defective_cells": len(defect_scores),
        "rejects": {f"{view}.{flag}": int(k) for (view, flag), k in zip(flags, rejects)},
        "good_rejected": float(((good_scores > limits).any(axis=1).sum() + unlocated) / cells),
        "defective_caught": float((defect_scores > limits).any(axis=1).mean()),
        "calibrated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    typed = CalibrationRecord.model_validate(record)
    for view, model in loaded.items():
        mine = {flag: float(limit) for (owner, flag), limit in zip(flags, limits) if owner == view}
        meta = model.meta.model_copy(update={
            "thresholds": {name: mine[name] for name in model.meta.thresholds}, "anomaly_threshold": mine[ANOMALY],
            "target_frr": target_frr, "calibration": typed,
        })
        metadata_path(model.path).write_text(meta.model_dump_json(indent=2))
    return {**record, "target_frr": target_frr,
            "thresholds": {f"{view}.{flag}": float(limit) for (view, flag), limit in zip(flags, limits)}}
