"""Lot sampling plans (ISO 2859-1 / ANSI Z1.4) and control charts with the Western Electric rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pouchline.inspect.controller.sampling import AQLS, LEVELS, SamplingPlan, code_letter, plan
from pouchline.inspect.controller.spc import CONTROL_CONSTANTS, p_chart, western_electric, xbar_r_chart

LETTERS = "ABCDEFGHJKLMNPQR"
SAMPLE_SIZES = (2, 3, 5, 8, 13, 20, 32, 50, 80, 125, 200, 315, 500, 800, 1250, 2000)

# --- sampling: Table I ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lot_size", "level", "letter"),
    [
        (2, "II", "A"),
        (8, "II", "A"),
        (9, "II", "B"),
        (501, "II", "J"),
        (1200, "II", "J"),
        (1201, "II", "K"),
        (3200, "II", "K"),
        (3201, "II", "L"),
        (500000, "II", "P"),
        (500001, "II", "Q"),
        (2, "III", "B"),
        (1201, "I", "H"),
        (1201, "III", "L"),
        (10**7, "I", "N"),
        (10**7, "III", "R"),
    ],
)
def test_code_letter_known_rows(lot_size: int, level: str, letter: str) -> None:
    assert code_letter(lot_size, level) == letter


def test_each_lot_size_range_ends_where_table_i_says() -> None:
    """At level II every range has its own letter, so each printed range end is a letter change."""
    range_ends = (8, 15, 25, 50, 90, 150, 280, 500, 1200, 3200, 10000, 35000, 150000, 500000)
    for row, end in enumerate(range_ends):
        assert code_letter(end) == LETTERS[row]
        assert code_letter(end + 1) == LETTERS[row + 1]


def test_level_is_ii_by_default() -> None:
    assert code_letter(100) == code_letter(100, "II") == "F"
    assert LEVELS == ("I", "II", "III")


# --- sampling: Table II-A ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lot_size", "aql", "letter", "n", "ac", "re"),
    [
        (2000, 2.5, "K", 125, 7, 8),
        (2000, 0.65, "K", 125, 2, 3),
        (2000, 1.0, "K", 125, 3, 4),
        (1000, 1.0, "J", 80, 2, 3),
        (1000, 2.5, "J", 80, 5, 6),
        (400, 2.5, "H", 50, 3, 4),
        (200, 2.5, "G", 32, 2, 3),
        (5000, 1.5, "L", 200, 7, 8),
        (100000, 0.65, "N", 500, 7, 8),
    ],
)
def test_known_plans(lot_size: int, aql: float, letter: str, n: int, ac: int, re: int) -> None:
    assert plan(lot_size, aql) == SamplingPlan(lot_size, "II", aql, letter, n, ac, re)


@pytest.mark.parametrize(
    ("lot_size", "aql", "level", "letter", "n", "ac", "re"),
    [
        (15, 1.0, "I", "A", 13, 0, 1),  # A at 1.0: down past B, C, D to E's plan
        (200, 0.65, "II", "G", 20, 0, 1),  # up to F's plan
        (200, 1.0, "II", "G", 50, 1, 2),  # down to H's plan
        (5000, 10, "II", "L", 125, 21, 22),  # up to K's plan
        (600000, 10, "II", "Q", 125, 21, 22),  # up past five arrows to K's plan
        (8, 10, "II", "A", 5, 1, 2),  # A at 10 has no row above: down past B to C's plan
        (600000, 0.010, "III", "R", 1250, 0, 1),  # up to Q's plan
        (600000, 0.015, "III", "R", 800, 0, 1),  # R at 0.015 has no row below: up past Q to P's plan
    ],
)
def test_arrows_lead_to_another_rows_plan_and_sample_size(
    lot_size: int, aql: float, level: str, letter: str, n: int, ac: int, re: int
) -> None:
    result = plan(lot_size, aql, level)
    assert (result.code_letter, result.sample_size, result.accept, result.reject) == (letter, n, ac, re)


@pytest.mark.parametrize(
    ("lot_size", "aql", "ac", "re"),
    [
        (5, 1.0, 0, 1),  # A -> E's plan, n = 13 > 5
        (10, 0.10, 0, 1),  # B -> K's plan, n = 125 > 10
        (80, 0.010, 0, 1),  # E -> Q's plan, n = 1250 > 80
        (13, 1.0, 0, 1),  # B -> E's plan, n = 13 = lot size
    ],
)
def test_inspects_the_whole_lot_when_the_plan_is_larger(lot_size: int, aql: float, ac: int, re: int) -> None:
    result = plan(lot_size, aql)
    assert (result.sample_size, result.accept, result.reject) == (lot_size, ac, re)


def _diagonal_plan(row: int, column: int) -> tuple[int, int, int]:
    """Table II-A by its published structure, written independently of the module's data.

    Cells along a diagonal (one code letter down, one AQL column left) hold the same plan; the
    diagonal through A/6.5 holds 0/1, the next is an up arrow, then a down arrow, then 1/2, 2/3,
    3/4, 5/6, 7/8, 10/11, 14/15, 21/22, and up arrows beyond. Arrows that would leave the table
    (A/10 up, R/0.015 down) point the other way.
    """
    ladder = [(0, 1), "up", "down", (1, 2), (2, 3), (3, 4), (5, 6), (7, 8), (10, 11), (14, 15), (21, 22)]

    def cell(r: int, c: int) -> tuple[int, int] | str:
        diagonal = r + c - 14
        found = "down" if diagonal < 0 else "up" if diagonal >= len(ladder) else ladder[diagonal]
        if (r, found) in ((0, "up"), (15, "down")):
            return "down" if found == "up" else "up"
        return found

    step = 1 if cell(row, column) == "down" else -1
    while isinstance(found := cell(row, column), str):
        row += step
    ac, re = found
    return SAMPLE_SIZES[row], ac, re


def test_every_cell_of_table_ii_a_matches_its_diagonal() -> None:
    """A double entry of all 256 cells, to catch a mistyped cell in the module's table."""
    range_starts = (2, 9, 16, 26, 51, 91, 151, 281, 501, 1201, 3201, 10001, 35001, 150001, 500001)
    lots = {code_letter(first): first for first in range_starts}
    for row, letter in enumerate(LETTERS):
        lot_size, level = (lots[letter], "II") if letter in lots else (500001, "III")
        for column, aql in enumerate(AQLS):
            n, ac, re = _diagonal_plan(row, column)
            result = plan(lot_size, aql, level)
            assert result.code_letter == letter
            expected = (min(n, lot_size), ac, re)
            assert (result.sample_size, result.accept, result.reject) == expected, (letter, aql)


def test_aql_series() -> None:
    assert AQLS[0] == 0.010 and AQLS[-1] == 10.0 and len(AQLS) == 16
    assert list(AQLS) == sorted(AQLS)


# --- sampling: decide ----------------------------------------------------------------------------


def test_decide_rejects_early_and_accepts_only_a_complete_sample() -> None:
    k = plan(2000, 2.5)  # n = 125, Ac 7, Re 8
    assert k.decide(0, 0) == "continue"
    assert k.decide(7, 124) == "continue"
    assert k.decide(8, 40) == "reject"
    assert k.decide(7, 125) == "accept"
    assert k.decide(8, 125) == "reject"
    assert k.decide(0, 125) == "accept"


def test_decide_on_a_zero_acceptance_plan() -> None:
    p = plan(200, 0.65)  # n = 20, Ac 0, Re 1
    assert p.decide(1, 1) == "reject"
    assert p.decide(0, 19) == "continue"
    assert p.decide(0, 20) == "accept"


@pytest.mark.parametrize(
    ("defectives", "inspected", "match"), [(-1, 5, "negative"), (2, -1, "negative"), (6, 5, "exceed")]
)
def test_decide_refuses_impossible_counts(defectives: int, inspected: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan(2000, 2.5).decide(defectives, inspected)


# --- sampling: bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("lot_size", [1, 0, -5])
def test_lot_size_below_two_is_refused(lot_size: int) -> None:
    with pytest.raises(ValueError, match="lot size must be at least 2"):
        plan(lot_size, 1.0)
    with pytest.raises(ValueError, match="lot size"):
        code_letter(lot_size)


@pytest.mark.parametrize("level", ["IV", "S-1", "ii", ""])
def test_unknown_level_is_refused(level: str) -> None:
    with pytest.raises(ValueError, match="inspection level"):
        plan(1000, 1.0, level)


@pytest.mark.parametrize("aql", [0.5, 0.1001, 15, 0])
def test_aql_outside_the_series_is_refused_with_the_allowed_values(aql: float) -> None:
    with pytest.raises(ValueError, match="not in the standard series") as error:
        plan(1000, aql)
    assert "0.010" in str(error.value) and "0.65" in str(error.value) and "10" in str(error.value)


# --- spc: p-chart --------------------------------------------------------------------------------


def test_p_chart_limits_by_hand() -> None:
    """p = 47 / 2350 = 0.02; sigma_i = sqrt(0.02 * 0.98 / n_i); the lower limit floors at 0 for small n."""
    chart = p_chart([2, 0, 5, 40], [50, 100, 200, 2000])
    assert chart.kind == "p"
    assert [p.value for p in chart.points] == pytest.approx([0.04, 0.0, 0.025, 0.02])
    assert [p.centre for p in chart.points] == pytest.approx([0.02] * 4)
    assert [p.sigma for p in chart.points] == pytest.approx([0.019799, 0.014, 0.0098995, 0.0031305], abs=1e-7)
    assert [p.ucl for p in chart.points] == pytest.approx([0.0793970, 0.062, 0.0496985, 0.0293915], abs=1e-7)
    assert [p.lcl for p in chart.points] == pytest.approx([0.0, 0.0, 0.0, 0.0106085], abs=1e-7)
    assert [p.n for p in chart.points] == [50, 100, 200, 2000]
    assert chart.points[1].zone(2) == pytest.approx((0.02 - 0.028, 0.02 + 0.028))
    assert chart.violations == []


def test_p_chart_caps_the_upper_limit_at_one() -> None:
    chart = p_chart([1, 1], [2, 2])  # p = 0.5, sigma = 0.354, 3 sigma = 1.06
    assert [(p.lcl, p.ucl) for p in chart.points] == [(0.0, 1.0), (0.0, 1.0)]


def test_p_chart_against_a_baseline_rate() -> None:
    chart = p_chart([1, 5], [100, 100], baseline_p=0.01)  # sigma = sqrt(0.0099 / 100) = 0.0099499
    assert [p.centre for p in chart.points] == [0.01, 0.01]
    assert chart.points[0].ucl == pytest.approx(0.0398496, abs=1e-7)
    assert [(v.rule, v.index, v.side) for v in chart.violations if v.rule == 1] == [(1, 1, "above")]


def test_p_chart_catches_a_jump_in_defect_rate() -> None:
    rng = np.random.default_rng(11)
    sizes = rng.integers(200, 401, 40)
    defectives = np.concatenate([rng.binomial(sizes[:20], 0.02), rng.binomial(sizes[20:], 0.06)])
    chart = p_chart(defectives.tolist(), sizes.tolist(), baseline_p=0.02)
    after = [v for v in chart.violations if v.index >= 20]
    assert after and after[0].index <= 22 and after[0].side == "above"


# --- spc: X-bar/R chart --------------------------------------------------------------------------


def test_xbar_r_limits_for_n5_by_hand() -> None:
    """Means 11, 9, 10 and ranges 1, 2, 3: X-double-bar 10, R-bar 2, A2 = 0.577, D3 = 0, D4 = 2.114."""
    xbar, r = xbar_r_chart([[11, 11, 11, 11.5, 10.5], [8, 9, 10, 9, 9], [8.5, 10, 11.5, 10, 10]])
    assert (xbar.kind, r.kind) == ("xbar", "r")
    assert [p.value for p in xbar.points] == pytest.approx([11, 9, 10])
    assert [p.value for p in r.points] == pytest.approx([1, 2, 3])
    first = xbar.points[0]
    assert (first.centre, first.lcl, first.ucl, first.n) == pytest.approx((10.0, 8.846, 11.154, 5))
    assert first.sigma == pytest.approx(0.577 * 2 / 3)
    assert (r.points[0].centre, r.points[0].lcl, r.points[0].ucl) == pytest.approx((2.0, 0.0, 4.228))


def test_xbar_r_limits_for_n4_by_hand() -> None:
    """Means 2 and 3, ranges 2 and 2: X-double-bar 2.5, R-bar 2, A2 = 0.729, D4 = 2.282."""
    xbar, r = xbar_r_chart([[1, 2, 3, 2], [2, 3, 4, 3]])
    assert (xbar.points[1].lcl, xbar.points[1].ucl) == pytest.approx((1.042, 3.958))
    assert (r.points[1].centre, r.points[1].lcl, r.points[1].ucl) == pytest.approx((2.0, 0.0, 4.564))


def test_r_chart_lower_limit_is_positive_from_n7() -> None:
    _, r = xbar_r_chart([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 8]])  # R-bar = 7
    assert (r.points[0].lcl, r.points[0].ucl) == pytest.approx((0.076 * 7, 1.924 * 7))


def test_xbar_r_against_a_baseline() -> None:
    """Baseline (10, 0.5): X-bar limits 8.5 .. 11.5; process sigma 0.5 sqrt(5), R centre d2 times that."""
    xbar, r = xbar_r_chart([[11, 11, 11, 11.5, 10.5], [8, 9, 10, 9, 9]], baseline=(10.0, 0.5))
    assert (xbar.points[0].centre, xbar.points[0].lcl, xbar.points[0].ucl) == (10.0, 8.5, 11.5)
    assert xbar.points[0].sigma == 0.5
    r_centre = 2.326 * 0.5 * math.sqrt(5)  # 2.6005
    assert (r.points[0].centre, r.points[0].ucl) == pytest.approx((r_centre, 2.114 * r_centre))
    assert r.points[0].sigma == pytest.approx((2.114 - 1) / 3 * r_centre)


def test_control_constants_agree_with_their_definitions() -> None:
    """A2 = 3 / (d2 sqrt(n)) and D3 = max(0, 2 - D4): a cross-check of the typed-in table."""
    assert sorted(CONTROL_CONSTANTS) == list(range(2, 11))
    for n, k in CONTROL_CONSTANTS.items():
        assert k.A2 == pytest.approx(3 / (k.d2 * math.sqrt(n)), abs=2e-3), n
        assert k.D3 == pytest.approx(max(0.0, 2 - k.D4), abs=1e-3), n
    assert (CONTROL_CONSTANTS[5].A2, CONTROL_CONSTANTS[5].D3, CONTROL_CONSTANTS[5].D4) == (0.577, 0.0, 2.114)
    assert (CONTROL_CONSTANTS[4].A2, CONTROL_CONSTANTS[4].D3, CONTROL_CONSTANTS[4].D4) == (0.729, 0.0, 2.282)


def test_drifting_supplier_batch_is_caught_against_the_baseline() -> None:
    """Swelling 0.30 mm, sigma 0.08 mm, n = 5; from subgroup 20 the mean creeps up 0.05 mm per subgroup."""
    rng = np.random.default_rng(1)
    drift = np.concatenate([np.zeros(20), 0.05 * np.arange(1, 21)])
    subgroups = rng.normal(0.30, 0.08, (40, 5)) + drift[:, None]
    xbar, _ = xbar_r_chart(subgroups.tolist(), baseline=(0.30, 0.08 / math.sqrt(5)))
    assert xbar.violations, "the drift went unnoticed"
    first = xbar.violations[0]
    assert 20 <= first.index <= 24 and first.side == "above"


def test_stable_process_raises_few_false_alarms() -> None:
    rng = np.random.default_rng(7)
    xbar, r = xbar_r_chart(rng.normal(0.30, 0.08, (100, 5)).tolist())
    assert len(xbar.violations) <= 5 and len(r.violations) <= 5
    sizes = rng.integers(200, 401, 100)
    assert len(p_chart(rng.binomial(sizes, 0.02).tolist(), sizes.tolist()).violations) <= 5


def test_chart_to_json_is_plain_json() -> None:
    xbar, _ = xbar_r_chart([[0, 0], [0, 0], [10, 10]], baseline=(0.0, 1.0))
    data = json.loads(json.dumps(xbar.to_json()))
    assert data["kind"] == "xbar"
    assert data["points"][2] == {
        "value": 10.0, "centre": 0.0, "lcl": -3.0, "ucl": 3.0, "sigma": 1.0, "n": 2,
        "zone1": [-1.0, 1.0], "zone2": [-2.0, 2.0],
    }  # fmt: skip
    assert data["violations"] == [
        {"rule": 1, "index": 2, "side": "above", "message": "rule 1: 1 point above 3σ at subgroup 2"}
    ]


# --- spc: Western Electric rules -----------------------------------------------------------------


def _fired(values: list[float]) -> set[tuple[int, int, str]]:
    """The (rule, index, side) that fire on a unit chart: centre 0, sigma 1 everywhere."""
    violations = western_electric(values, [0.0] * len(values), [1.0] * len(values))
    return {(v.rule, v.index, v.side) for v in violations}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 0, 3.5, 0], {(1, 2, "above")}),
        ([0, -3.2], {(1, 1, "below")}),
        ([0, 2.5, 0, 2.5, 0], {(2, 3, "above")}),
        ([-2.5, -2.5], {(2, 1, "below")}),
        ([1.5, 1.5, 0, 1.5, 1.5], {(3, 4, "above")}),
        ([-1.5, -1.5, -1.5, 0.5, -1.5], {(3, 4, "below")}),
        ([0.5] * 8, {(4, 7, "above")}),
        ([-0.5] * 9, {(4, 7, "below"), (4, 8, "below")}),
    ],
)
def test_each_rule_fires_where_its_pattern_completes(values: list[float], expected: set) -> None:
    assert _fired(values) == expected


@pytest.mark.parametrize(
    "values",
    [
        [0, 2.99, 0, 0, -2.99, 0],  # rule 1: never beyond 3 sigma
        [0, 3.0, 0],  # rule 1: exactly on the limit is not beyond it
        [0, 2.5, 0, 0, 2.5, 0],  # rule 2: 1 of 3 beyond 2 sigma
        [2.5, -2.5, 0],  # rule 2: 2 of 3, but on opposite sides
        [1.5, 1.5, 0, 0, 1.5, 1.5],  # rule 3: 3 of 5 beyond 1 sigma
        [1.5, 1.5, -1.5, 1.5, 0],  # rule 3: 4 of 5, but not on the same side
        [0.5] * 7 + [-0.5],  # rule 4: 7 in a row
        [0.5] * 4 + [0.0] + [0.5] * 4,  # rule 4: a point on the centre line breaks the run
    ],
)
def test_no_rule_fires_on_a_pattern_that_just_misses(values: list[float]) -> None:
    assert _fired(values) == set()


def test_rules_use_each_points_own_sigma() -> None:
    """As on a p-chart: the same value is beyond 3 sigma where sigma is small, inside where it is large."""
    found = western_electric([0.05, 0.05, 0.05], [0.02] * 3, [0.011, 0.009, 0.011])
    assert [(v.rule, v.index) for v in found] == [(1, 1), (2, 1), (2, 2)]


def test_each_rule_and_index_is_reported_once_with_a_readable_message() -> None:
    values = [0, 2.5, 2.5, 3.5, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5]
    found = western_electric(values, [0.0] * len(values), [1.0] * len(values))
    assert len({(v.rule, v.index) for v in found}) == len(found)
    rule2 = next(v for v in found if v.rule == 2)
    assert rule2.message == "rule 2: 2 of 3 points above 2σ ending at subgroup 2"
    rule4 = next(v for v in found if v.rule == 4)
    assert rule4.message == "rule 4: 8 points in a row above the centre line ending at subgroup 8"
    assert [v.index for v in found] == sorted(v.index for v in found)


# --- spc: bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("defectives", "sizes", "baseline_p", "match"),
    [
        ([1, -1], [10, 10], None, "defectives must not be negative"),
        ([1, 2], [10, -10], None, "sizes must not be negative"),
        ([11, 0], [10, 10], None, "defectives exceed the subgroup size at subgroup 0"),
        ([0, 0], [10, 0], None, "subgroup 1 has size 0"),
        ([1, math.nan], [10, 10], None, "NaN"),
        ([1, 2, 3], [10, 10], None, "mismatched lengths"),
        ([], [], None, "non-empty"),
        ([1.5, 2], [10, 10], None, "whole numbers"),
        ([1, 2], [10, 10], 0.0, "baseline_p"),
        ([1, 2], [10, 10], 1.2, "baseline_p"),
    ],
)
def test_p_chart_refuses_bad_input(
    defectives: list[float], sizes: list[float], baseline_p: float | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        p_chart(defectives, sizes, baseline_p)


@pytest.mark.parametrize(
    ("subgroups", "baseline", "match"),
    [
        ([[1, 2, 3]], None, "at least 2 subgroups"),
        ([[1, 2, 3], [1, 2]], None, "subgroup 1 has 2 values; all subgroups must have 3"),
        ([[1], [2]], None, "between 2 and 10"),
        ([list(range(11))] * 2, None, "between 2 and 10"),
        ([[1, 2], [3, math.nan]], None, "NaN"),
        ([[1, 2], [3, 4]], (0.0, 0.0), "sigma > 0"),
        ([[1, 2], [3, 4]], (math.inf, 1.0), "finite"),
    ],
)
def test_xbar_r_chart_refuses_bad_input(
    subgroups: list[list[float]], baseline: tuple[float, float] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        xbar_r_chart(subgroups, baseline)


@pytest.mark.parametrize(
    ("values", "centres", "sigmas", "match"),
    [
        ([1, 2], [0], [1, 1], "mismatched lengths"),
        ([1, math.nan], [0, 0], [1, 1], "values contains a NaN"),
        ([1, 2], [0, 0], [1, -1], "sigmas must not be negative"),
    ],
)
def test_western_electric_refuses_bad_input(
    values: list[float], centres: list[float], sigmas: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        western_electric(values, centres, sigmas)
