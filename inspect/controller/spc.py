"""Statistical process control: p-charts, X-bar/R charts and the Western Electric rules.

Lot sampling (``sampling.py``) judges a lot once it is made; control charts watch the process while
it runs, so that a drifting supplier batch or a station going out of adjustment is noticed subgroups
before a lot fails. The defect rate is charted as a p-chart (subgroups per hour or per N cells are
rarely the same size, so its limits are computed per point) and the swelling estimate in mm as an
X-bar/R chart. The Western Electric rules turn a chart into alarms: besides a point beyond the
3-sigma limits they catch the runs and clusters a slow drift produces long before any single point
crosses a limit.

Limits come either from the charted data itself (a first look at a process) or from a fixed baseline
approved for the line, which is how drift is tracked: limits recomputed from drifting data drift with
it. Everything here is a pure function on plain sequences; ``Chart.to_json`` gives a web page all it
needs to draw the chart, zones and alarms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

Side = Literal["above", "below"]


class ControlConstants(NamedTuple):
    """Shewhart constants for subgroups of n measurements (names as in the literature).

    A2 puts the X-bar limits at X-double-bar +/- A2 * R-bar; D3 and D4 put the R limits at
    D3 * R-bar and D4 * R-bar; d2 is the mean range of n unit-normal values, so sigma = R-bar / d2.
    """

    A2: float
    D3: float
    D4: float
    d2: float


CONTROL_CONSTANTS: dict[int, ControlConstants] = {
    2: ControlConstants(1.880, 0.0, 3.267, 1.128),
    3: ControlConstants(1.023, 0.0, 2.574, 1.693),
    4: ControlConstants(0.729, 0.0, 2.282, 2.059),
    5: ControlConstants(0.577, 0.0, 2.114, 2.326),
    6: ControlConstants(0.483, 0.0, 2.004, 2.534),
    7: ControlConstants(0.419, 0.076, 1.924, 2.704),
    8: ControlConstants(0.373, 0.136, 1.864, 2.847),
    9: ControlConstants(0.337, 0.184, 1.816, 2.970),
    10: ControlConstants(0.308, 0.223, 1.777, 3.078),
}


@dataclass(frozen=True)
class Violation:
    """A Western Electric rule that fired; ``index`` is the point that completed the pattern."""

    rule: int
    index: int
    side: Side
    message: str


@dataclass(frozen=True)
class ChartPoint:
    """One plotted subgroup: its statistic, the centre line, control limits and sigma at that point."""

    value: float
    centre: float
    lcl: float
    ucl: float
    sigma: float
    n: int

    def zone(self, k: int) -> tuple[float, float]:
        """The k-sigma zone edges (centre -/+ k sigma) the Western Electric rules test against."""
        return self.centre - k * self.sigma, self.centre + k * self.sigma


@dataclass(frozen=True)
class Chart:
    """A control chart: ``kind`` is "p", "xbar" or "r"."""

    kind: str
    points: list[ChartPoint]
    violations: list[Violation]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, with the 1- and 2-sigma zone edges per point, for a web page to draw."""
        points = [asdict(p) | {"zone1": list(p.zone(1)), "zone2": list(p.zone(2))} for p in self.points]
        return {"kind": self.kind, "points": points, "violations": [asdict(v) for v in self.violations]}


@dataclass(frozen=True)
class _Rule:
    number: int
    hits: int  # at least this many points ...
    window: int  # ... of this many consecutive ones ...
    k: int  # ... beyond k sigma on the same side
    text: str


_SIDES: tuple[tuple[Side, float], ...] = (("above", 1.0), ("below", -1.0))
_RULES = (
    _Rule(1, 1, 1, 3, "1 point {side} 3σ at subgroup {index}"),
    _Rule(2, 2, 3, 2, "2 of 3 points {side} 2σ ending at subgroup {index}"),
    _Rule(3, 4, 5, 1, "4 of 5 points {side} 1σ ending at subgroup {index}"),
    _Rule(4, 8, 8, 0, "8 points in a row {side} the centre line ending at subgroup {index}"),
)


def western_electric(
    values: Sequence[float], centres: Sequence[float], sigmas: Sequence[float]
) -> list[Violation]:
    """The Western Electric rules on a chart whose centre and sigma may differ per point.

    A point "beyond k sigma" lies strictly beyond centre +/- k sigma; a point exactly on the centre
    line is on neither side and so breaks a run. A pattern is reported at the point that completes
    it, which must itself be one of the pattern's points; windows at the start of the series are
    shortened (two points beyond 2 sigma at subgroups 0 and 1 complete rule 2 at subgroup 1).
    """
    v, c, s = _series(values=values, centres=centres, sigmas=sigmas)
    if np.any(s < 0):
        raise ValueError(f"sigmas must not be negative; subgroup {int(np.argmax(s < 0))} has {s[s < 0][0]}")
    found = [
        violation
        for rule in _RULES
        for side, sign in _SIDES
        for violation in _matches(rule, side, sign * (v - c) > rule.k * s)
    ]
    return sorted(found, key=lambda f: (f.index, f.rule))


def p_chart(defectives: Sequence[int], sizes: Sequence[int], baseline_p: float | None = None) -> Chart:
    """A p-chart of the defect rate over subgroups of varying size.

    The centre line is the pooled rate (total defectives / total inspected), not the mean of the
    subgroup rates, so a small subgroup weighs no more than its cells; or ``baseline_p``, the rate
    approved for the line. Limits are per point, p +/- 3 sqrt(p (1 - p) / n_i), clipped to [0, 1].
    """
    d, n = _series(defectives=defectives, sizes=sizes)
    for name, counts in (("defectives", d), ("sizes", n)):
        _check_counts(name, counts)
    if np.any(n == 0):
        raise ValueError(f"subgroup sizes must be positive; subgroup {int(np.argmax(n == 0))} has size 0")
    if np.any(d > n):
        i = int(np.argmax(d > n))
        raise ValueError(f"defectives exceed the subgroup size at subgroup {i}: {int(d[i])} > {int(n[i])}")
    if baseline_p is None:
        centre = float(d.sum() / n.sum())
    elif 0.0 < baseline_p < 1.0:
        centre = baseline_p
    else:
        raise ValueError(f"baseline_p must lie strictly between 0 and 1, got {baseline_p}")
    sigma = np.sqrt(centre * (1.0 - centre) / n)
    lcl = np.maximum(centre - 3.0 * sigma, 0.0)
    ucl = np.minimum(centre + 3.0 * sigma, 1.0)
    return _chart("p", d / n, centre, sigma, lcl, ucl, n)


def xbar_r_chart(
    subgroups: Sequence[Sequence[float]], baseline: tuple[float, float] | None = None
) -> tuple[Chart, Chart]:
    """The X-bar chart and the R chart of a measurement taken in subgroups of equal size n (2..10).

    Without a baseline the centre and sigma come from the data: X-double-bar +/- A2 R-bar and
    D3 R-bar .. D4 R-bar. ``baseline`` = (centre, sigma of the subgroup means) from an approved
    reference period fixes both charts instead: the X-bar limits are centre +/- 3 sigma, and the R
    chart is centred on the range that process sigma (sigma * sqrt(n)) implies, d2 * sigma * sqrt(n).
    """
    data = _subgroup_matrix(subgroups)
    n = data.shape[1]
    k = CONTROL_CONSTANTS[n]
    means = data.mean(axis=1)
    ranges = data.max(axis=1) - data.min(axis=1)
    if baseline is None:
        centre, r_bar = float(means.mean()), float(ranges.mean())
        sigma = k.A2 * r_bar / 3.0
    else:
        centre, sigma = _check_baseline(baseline)
        r_bar = k.d2 * sigma * math.sqrt(n)
    sizes = np.full(len(data), n)
    xbar = _chart("xbar", means, centre, sigma, centre - 3.0 * sigma, centre + 3.0 * sigma, sizes)
    # D4 = 1 + 3 d3/d2, so the sigma of the range is (D4 - 1) R-bar / 3, with no further constant.
    r = _chart("r", ranges, r_bar, (k.D4 - 1.0) * r_bar / 3.0, k.D3 * r_bar, k.D4 * r_bar, sizes)
    return xbar, r


def _matches(rule: _Rule, side: Side, beyond: np.ndarray) -> list[Violation]:
    """Where ``rule`` completes on one side, given which points lie beyond its k sigma on that side."""
    counts = np.concatenate(([0], np.cumsum(beyond)))
    return [
        Violation(rule.number, i, side, f"rule {rule.number}: " + rule.text.format(side=side, index=i))
        for i in map(int, np.flatnonzero(beyond))
        if counts[i + 1] - counts[max(0, i + 1 - rule.window)] >= rule.hits
    ]


def _chart(
    kind: str,
    values: np.ndarray,
    centre: float | np.ndarray,
    sigma: float | np.ndarray,
    lcl: float | np.ndarray,
    ucl: float | np.ndarray,
    sizes: np.ndarray,
) -> Chart:
    """Points from per-point (or shared) centre, sigma and limits, and the rules' verdict on them."""
    columns = np.broadcast_arrays(values, centre, sigma, lcl, ucl)
    points = [
        ChartPoint(float(v), float(c), float(lo), float(hi), float(s), int(m))
        for v, c, s, lo, hi, m in zip(*columns, sizes, strict=True)
    ]
    return Chart(kind, points, western_electric(*columns[:3]))


def _series(**named: Sequence[float]) -> list[np.ndarray]:
    """The sequences as float arrays, refused if they are empty, of different lengths or not finite."""
    arrays = [np.asarray(values, dtype=float) for values in named.values()]
    lengths = {name: len(a) for name, a in zip(named, arrays, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"mismatched lengths: {', '.join(f'{k}={v}' for k, v in lengths.items())}")
    for name, a in zip(named, arrays, strict=True):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{name} must be a non-empty flat sequence of numbers")
        _check_finite(name, a)
    return arrays


def _check_finite(name: str, a: np.ndarray) -> None:
    bad = ~np.isfinite(a)
    if np.any(bad):
        where = ", ".join(str(int(i)) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} contains a NaN or infinite value (at index {where})")


def _check_counts(name: str, counts: np.ndarray) -> None:
    if np.any(counts < 0):
        i = int(np.argmax(counts < 0))
        raise ValueError(f"{name} must not be negative; subgroup {i} has {counts[i]:g}")
    if np.any(counts != np.floor(counts)):
        raise ValueError(f"{name} must be whole numbers of cells")


def _subgroup_matrix(subgroups: Sequence[Sequence[float]]) -> np.ndarray:
    """The subgroups as an (m, n) array, after checking there are m >= 2 of one size n in 2..10."""
    if len(subgroups) < 2:
        raise ValueError(f"an X-bar/R chart needs at least 2 subgroups, got {len(subgroups)}")
    n = len(subgroups[0])
    if n not in CONTROL_CONSTANTS:
        raise ValueError(f"subgroup size must be between 2 and 10, got {n}")
    for i, subgroup in enumerate(subgroups):
        if len(subgroup) != n:
            raise ValueError(f"subgroup {i} has {len(subgroup)} values; all subgroups must have {n}")
    data = np.asarray(subgroups, dtype=float)
    _check_finite("subgroups", data)
    return data


def _check_baseline(baseline: tuple[float, float]) -> tuple[float, float]:
    centre, sigma = map(float, baseline)
    if not (math.isfinite(centre) and math.isfinite(sigma) and sigma > 0.0):
        raise ValueError(f"baseline must be a finite (centre, sigma) with sigma > 0, got {baseline}")
    return centre, sigma
