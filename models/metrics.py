"""Detection metrics without scikit-learn: AUROC, ROC/PR curves, thresholds at a false-reject rate.

Used by training (validation each epoch), export (the INT8 accuracy gate) and evaluation,
so every number about a model is computed one way.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN without both classes."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-positive and true-positive rates as the threshold sweeps down the scores."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    hits = np.asarray(positive, bool)[order]
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(hits.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(~hits) / max((~hits).sum(), 1)])
    return fpr, tpr


def pr_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision as the threshold sweeps down the scores."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    hits = np.asarray(positive, bool)[order]
    true_pos = np.cumsum(hits)
    recall = true_pos / max(hits.sum(), 1)
    precision = true_pos / np.arange(1, len(hits) + 1)
    return recall, precision


def threshold_at_frr(good_scores: np.ndarray, frr: float) -> float:
    """Smallest threshold that flags at most ``frr`` of the good cells (score > threshold)."""
    good = np.asarray(good_scores, np.float64)
    if good.size == 0:
        raise ValueError("no good cells to calibrate a threshold on")
    return float(thresholds_at(good.reshape(-1, 1), np.array([int(np.floor(frr * good.size))]))[0])


def thresholds_at(good: np.ndarray, rejects: np.ndarray) -> np.ndarray:
    """Per column of good cells' scores (cells x flags), the threshold (flag when score >
    threshold) that rejects ``rejects`` of them (fewer where scores tie at the threshold);
    with 0, the highest good score."""
    return limits_of_sorted(-np.sort(-good, axis=0), rejects)


def limits_of_sorted(ordered: np.ndarray, rejects: np.ndarray) -> np.ndarray:
    """`thresholds_at` on good scores already sorted high to low, column by column."""
    return ordered[np.minimum(rejects, ordered.shape[0] - 1), np.arange(ordered.shape[1])]


def recall(scores: np.ndarray, threshold: float) -> float:
    """Share of scores above the threshold (NaN for an empty set)."""
    scores = np.asarray(scores)
    return float((scores > threshold).mean()) if scores.size else float("nan")
