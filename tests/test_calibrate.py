"""The rule that shares the line's false-reject budget between flags (`pouchline model calibrate`).

Score matrices are made here; the end-to-end run on real models is in test_models.py.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pouchline.models.calibrate import allocate
from pouchline.models.metrics import thresholds_at


def _rejected(scores: np.ndarray, rejects: np.ndarray, good: np.ndarray) -> np.ndarray:
    return (scores > thresholds_at(good, rejects)).any(axis=1)


def test_the_budget_goes_to_the_flag_that_catches_defects() -> None:
    rng = np.random.default_rng(0)
    good = rng.uniform(0.0, 0.5, (1000, 3))
    good[:4, 0] = 0.9  # four good cells that flag 0 cannot tell from defects
    defective = rng.uniform(0.0, 0.5, (200, 3))
    defective[:, 0] = rng.uniform(0.85, 1.0, 200)  # flag 0 sees every defect; flags 1 and 2 see none
    rejects = allocate(good, defective, budget=10)
    assert rejects[1] == rejects[2] == 0  # no good cell is spent on flags that catch nothing
    assert rejects[0] >= 4 and _rejected(defective, rejects, good).mean() > 0.9
    assert _rejected(good, rejects, good).sum() <= 10


def test_a_flag_that_separates_perfectly_costs_no_good_cell() -> None:
    good = np.column_stack([np.linspace(0, 0.4, 500), np.linspace(0, 0.9, 500)])
    defective = np.column_stack([np.full(50, 0.8), np.linspace(0, 0.9, 50)])
    rejects = allocate(good, defective, budget=20)
    assert rejects.tolist() == [0, 0]  # flag 0 already catches every defect above the highest good score
    assert _rejected(defective, rejects, good).all() and not _rejected(good, rejects, good).any()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(0, 30))
def test_the_good_cells_rejected_never_exceed_the_budget(seed: int, flags: int, budget: int) -> None:
    """Whatever the scores (ties included: rounded to 1/20), every flag together rejects at most the budget."""
    rng = np.random.default_rng(seed)
    good = np.round(rng.beta(1, 4, (300, flags)) * 20) / 20
    defective = np.round(rng.beta(3, 2, (80, flags)) * 20) / 20
    rejects = allocate(good, defective, budget)
    assert _rejected(good, rejects, good).sum() <= budget
    assert (rejects >= 0).all()
