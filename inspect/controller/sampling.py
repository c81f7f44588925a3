"""ISO 2859-1 / ANSI/ASQ Z1.4 single sampling plans for normal inspection.

A lot of pouch cells is released on a sample, not on every cell, so the plan must be the one the
standard gives: customers write the AQL into the contract, and the producer's and consumer's risks
they agreed to are those of the standard's plans, not of a plan that merely looks similar.

The two tables are therefore kept as data, laid out like the printed ones, so a reviewer can check
them cell by cell against the page: Table I (lot size -> sample size code letter) and Table II-A
(code letter -> sample size and, per AQL, acceptance number Ac and rejection number Re). The arrows
of Table II-A are kept as arrows and resolved by the rule printed under the table ("use the first
sampling plan below/above the arrow"), because following an arrow changes the sample size as well
as Ac/Re; a table that stored only Ac/Re would silently inspect the wrong number of cells.

Only the AQLs up to 10 are encoded: the larger ones (15 ... 1000) are defined in nonconformities per
hundred units, whereas the line counts defective cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Decision = Literal["accept", "reject", "continue"]
Arrow = Literal["↓", "↑"]
Cell = tuple[int, int] | Arrow  # (Ac, Re), or an arrow to the plan to use instead

_DN: Final = "↓"  # use the first sampling plan below the arrow
_UP: Final = "↑"  # use the first sampling plan above the arrow
_STEP: Final[dict[str, int]] = {_DN: 1, _UP: -1}

_AQL_LABELS: Final = (
    "0.010", "0.015", "0.025", "0.040", "0.065", "0.10", "0.15", "0.25",
    "0.40", "0.65", "1.0", "1.5", "2.5", "4.0", "6.5", "10",
)  # fmt: skip
AQLS: Final[tuple[float, ...]] = tuple(float(label) for label in _AQL_LABELS)
"""The AQLs (percent defective) of Table II-A's columns, in the standard's preferred series."""

LEVELS: Final = ("I", "II", "III")
"""General inspection levels; II is the standard's default, III inspects more, I less."""

# Table I, general inspection levels: (lot size from, to (None: and over), code letter for I, II, III).
_TABLE_I: Final[tuple[tuple[int, int | None, tuple[str, str, str]], ...]] = (
    (2, 8, ("A", "A", "B")),
    (9, 15, ("A", "B", "C")),
    (16, 25, ("B", "C", "D")),
    (26, 50, ("C", "D", "E")),
    (51, 90, ("C", "E", "F")),
    (91, 150, ("D", "F", "G")),
    (151, 280, ("E", "G", "H")),
    (281, 500, ("F", "H", "J")),
    (501, 1200, ("G", "J", "K")),
    (1201, 3200, ("H", "K", "L")),
    (3201, 10000, ("J", "L", "M")),
    (10001, 35000, ("K", "M", "N")),
    (35001, 150000, ("L", "N", "P")),
    (150001, 500000, ("M", "P", "Q")),
    (500001, None, ("N", "Q", "R")),
)

# Table II-A, the sample size of each code letter's row.
SAMPLE_SIZES: Final[dict[str, int]] = {
    "A": 2, "B": 3, "C": 5, "D": 8, "E": 13, "F": 20, "G": 32, "H": 50,
    "J": 80, "K": 125, "L": 200, "M": 315, "N": 500, "P": 800, "Q": 1250, "R": 2000,
}  # fmt: skip
_LETTERS: Final = tuple(SAMPLE_SIZES)

# Table II-A, single sampling, normal inspection: one row per code letter, one cell per AQL in AQLS.
# The cells at A/10 and R/0.015 cannot hold the arrow their diagonal has (there is no row above A,
# none below R), so they point the other way: A/10 leads to C's plan (5, 1/2) and R/0.015 to P's
# (800, 0/1), as in published resolutions of the table.
_TABLE_II_A: Final[dict[str, tuple[Cell, ...]]] = {
    #     0.010   0.015   0.025   0.040   0.065   0.10    0.15    0.25
    #     0.40    0.65    1.0     1.5     2.5     4.0     6.5     10
    "A": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,
          _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    (0, 1), _DN),
    "B": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,
          _DN,    _DN,    _DN,    _DN,    _DN,    (0, 1), _UP,    _DN),
    "C": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,
          _DN,    _DN,    _DN,    _DN,    (0, 1), _UP,    _DN,    (1, 2)),
    "D": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,
          _DN,    _DN,    _DN,    (0, 1), _UP,    _DN,    (1, 2), (2, 3)),
    "E": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,
          _DN,    _DN,    (0, 1), _UP,    _DN,    (1, 2), (2, 3), (3, 4)),
    "F": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,
          _DN,    (0, 1), _UP,    _DN,    (1, 2), (2, 3), (3, 4), (5, 6)),
    "G": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,
          (0, 1), _UP,    _DN,    (1, 2), (2, 3), (3, 4), (5, 6), (7, 8)),
    "H": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    _DN,    (0, 1),
          _UP,    _DN,    (1, 2), (2, 3), (3, 4), (5, 6), (7, 8), (10, 11)),
    "J": (_DN,    _DN,    _DN,    _DN,    _DN,    _DN,    (0, 1), _UP,
          _DN,    (1, 2), (2, 3), (3, 4), (5, 6), (7, 8), (10, 11), (14, 15)),
    "K": (_DN,    _DN,    _DN,    _DN,    _DN,    (0, 1), _UP,    _DN,
          (1, 2), (2, 3), (3, 4), (5, 6), (7, 8), (10, 11), (14, 15), (21, 22)),
    "L": (_DN,    _DN,    _DN,    _DN,    (0, 1), _UP,    _DN,    (1, 2),
          (2, 3), (3, 4), (5, 6), (7, 8), (10, 11), (14, 15), (21, 22), _UP),
    "M": (_DN,    _DN,    _DN,    (0, 1), _UP,    _DN,    (1, 2), (2, 3),
          (3, 4), (5, 6), (7, 8), (10, 11), (14, 15), (21, 22), _UP,  _UP),
    "N": (_DN,    _DN,    (0, 1), _UP,    _DN,    (1, 2), (2, 3), (3, 4),
          (5, 6), (7, 8), (10, 11), (14, 15), (21, 22), _UP,  _UP,    _UP),
    "P": (_DN,    (0, 1), _UP,    _DN,    (1, 2), (2, 3), (3, 4), (5, 6),
          (7, 8), (10, 11), (14, 15), (21, 22), _UP,  _UP,    _UP,    _UP),
    "Q": ((0, 1), _UP,    _DN,    (1, 2), (2, 3), (3, 4), (5, 6), (7, 8),
          (10, 11), (14, 15), (21, 22), _UP,  _UP,    _UP,    _UP,    _UP),
    "R": (_UP,    _UP,    (1, 2), (2, 3), (3, 4), (5, 6), (7, 8), (10, 11),
          (14, 15), (21, 22), _UP,  _UP,    _UP,    _UP,    _UP,    _UP),
}  # fmt: skip


@dataclass(frozen=True)
class SamplingPlan:
    """The plan for one lot: inspect ``sample_size`` cells, accept on <= ``accept`` defectives.

    ``code_letter`` is Table I's letter for the lot; ``sample_size`` is already the size of the plan
    the arrows lead to, capped at the lot size (100 % inspection, with the same Ac/Re) so that the
    line never waits for cells that do not exist.
    """

    lot_size: int
    level: str
    aql: float
    code_letter: str
    sample_size: int
    accept: int
    reject: int

    def decide(self, defectives: int, inspected: int) -> Decision:
        """The lot's fate after ``inspected`` sample cells showed ``defectives`` defective ones.

        A lot is rejected as soon as the rejection number is reached, since no later cell can undo
        it and the line should stop feeding a bad lot; it is accepted only once the whole sample has
        been inspected, since an early acceptance would inspect fewer cells than the plan's risks assume.
        """
        if defectives < 0 or inspected < 0:
            raise ValueError(f"counts must not be negative: defectives={defectives}, inspected={inspected}")
        if defectives > inspected:
            raise ValueError(f"defectives ({defectives}) cannot exceed inspected cells ({inspected})")
        if defectives >= self.reject:
            return "reject"
        if inspected >= self.sample_size and defectives <= self.accept:
            return "accept"
        return "continue"


def code_letter(lot_size: int, level: str = "II") -> str:
    """Table I's sample size code letter for a lot, at a general inspection level."""
    _check_lot_size(lot_size)
    if level not in LEVELS:
        raise ValueError(f"unknown inspection level {level!r}; expected one of {', '.join(LEVELS)}")
    letters = next(row for first, last, row in _TABLE_I if first <= lot_size <= (last or lot_size))
    return letters[LEVELS.index(level)]


def plan(lot_size: int, aql: float, level: str = "II") -> SamplingPlan:
    """The single sampling plan (normal inspection) for a lot at an AQL and inspection level."""
    letter = code_letter(lot_size, level)
    column = _aql_column(aql)
    plan_letter, (accept, reject) = _follow_arrows(letter, column)
    sample_size = min(SAMPLE_SIZES[plan_letter], lot_size)
    return SamplingPlan(lot_size, level, AQLS[column], letter, sample_size, accept, reject)


def _check_lot_size(lot_size: int) -> None:
    if lot_size < 2:
        raise ValueError(f"lot size must be at least 2 (the smallest range of Table I), got {lot_size}")


def _aql_column(aql: float) -> int:
    """Table II-A's column of an AQL; other values would need a plan the standard does not give."""
    if aql not in AQLS:
        raise ValueError(f"AQL {aql} is not in the standard series; allowed: {', '.join(_AQL_LABELS)}")
    return AQLS.index(aql)


def _follow_arrows(letter: str, column: int) -> tuple[str, tuple[int, int]]:
    """The code letter whose plan applies, and its (Ac, Re), after following any arrow in the cell.

    An arrow means "the first sampling plan below (above) the arrow": walk down (up) the column,
    past further arrows, to the first cell with Ac/Re. That row's sample size then applies.
    """
    row = _LETTERS.index(letter)
    cell = _TABLE_II_A[letter][column]
    step = _STEP[cell] if isinstance(cell, str) else 0
    while isinstance(cell, str):
        row += step
        if not 0 <= row < len(_LETTERS):
            raise RuntimeError(f"Table II-A: the arrow at {letter}/{_AQL_LABELS[column]} leads off the table")
        cell = _TABLE_II_A[_LETTERS[row]][column]
    return _LETTERS[row], cell
