"""SPC on the stored cells: charts per product and supplier batch, and alarms as subgroups close.

The swelling estimate is charted as X-bar/R in subgroups of ``spc_subgroup`` consecutive
cells, the reject rate as a p-chart in subgroups of ``spc_rate_subgroup`` cells. Limits come
from the product's first `PHASE_ONE` subgroups (its approved baseline) and then stay fixed,
so a supplier batch whose material slowly changes drifts against them instead of dragging
them along; every batch's chart uses its product's baseline. Western Electric rules raise
an alarm the moment a subgroup completes a pattern, before any cell fails its spec.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pouchline.inspect.controller.schema import Cell, Lot, Product, SupplierBatch
from pouchline.inspect.controller.spc import CONTROL_CONSTANTS, Chart, p_chart, xbar_r_chart

#: Subgroups of a product that set its baseline; no alarms before they are in.
PHASE_ONE = 20


#: Subgroups an alarm check looks at: enough for every Western Electric pattern (8 in a row),
#: so checking a closed subgroup costs the same on the first day and after a year.
CHECK_SUBGROUPS = 10


def _inspected(product_id: int, batch_id: int | None, column: Any) -> Select[Any]:
    """``column`` of the product's (or batch's) inspected cells: decided from a verdict, not by a deadline."""
    query = (select(column).select_from(Cell).join(Lot, Cell.lot_id == Lot.id)
             .where(Lot.product_id == product_id, Cell.decision != "pending", Cell.source == "verdict"))
    return query if batch_id is None else query.where(Lot.supplier_batch_id == batch_id)


def _values(session: Session, query: Select[Any], first: int | None, last: int | None) -> list[Any]:
    """The query's values in capture order: all, the first ``first`` or the last ``last``."""
    if last is not None:
        return list(session.scalars(query.order_by(Cell.t_capture.desc(), Cell.id.desc()).limit(last)))[::-1]
    return list(session.scalars(query.order_by(Cell.t_capture, Cell.id).limit(first)))


def swellings(session: Session, product_id: int, batch_id: int | None = None, *, first: int | None = None,
              last: int | None = None) -> list[float]:
    query = _inspected(product_id, batch_id, Cell.swelling_mm).where(Cell.swelling_mm.is_not(None))
    return _values(session, query, first, last)


def rejections(session: Session, product_id: int, batch_id: int | None = None, *, first: int | None = None,
               last: int | None = None) -> list[bool]:
    return [decision == "reject" for decision in _values(session, _inspected(product_id, batch_id, Cell.decision),
                                                         first, last)]


def _chunks(values: list[Any], size: int) -> list[list[Any]]:
    return [values[i : i + size] for i in range(0, len(values) - size + 1, size)]


def baselines(session: Session, product_id: int, subgroup: int,
              rate_subgroup: int) -> tuple[tuple[float, float] | None, float | None]:
    """(centre, sigma of subgroup means) for X-bar and the rate for p, once phase one is complete."""
    groups = _chunks(swellings(session, product_id, first=PHASE_ONE * subgroup), subgroup)
    xbar = None
    if len(groups) == PHASE_ONE:
        chart, _ = xbar_r_chart(groups)
        spread = chart.points[0].sigma or CONTROL_CONSTANTS[subgroup].A2 * 1e-3
        xbar = (chart.points[0].centre, spread)
    rates = _chunks(rejections(session, product_id, first=PHASE_ONE * rate_subgroup), rate_subgroup)
    p = None
    if len(rates) == PHASE_ONE:
        defective, total = sum(sum(g) for g in rates), sum(len(g) for g in rates)
        p = (defective + 0.5) / (total + 1.0)  # never exactly 0 or 1: a clean start still has limits
    return xbar, p


def charts(session: Session, product: Product, batch: SupplierBatch | None, subgroup: int,
           rate_subgroup: int, *, last_subgroups: int | None = None) -> dict[str, Chart]:
    """X-bar, R and p charts of ``product`` (or of one of its supplier batches); only the last
    ``last_subgroups`` subgroups of each when given (the series must then end on a subgroup)."""
    batch_id = None if batch is None else batch.id
    xbar_base, p_base = baselines(session, product.id, subgroup, rate_subgroup)
    found: dict[str, Chart] = {}
    tail = None if last_subgroups is None else last_subgroups * subgroup
    groups = _chunks(swellings(session, product.id, batch_id, last=tail), subgroup)
    if len(groups) >= 2:
        found["xbar"], found["r"] = xbar_r_chart(groups, xbar_base)
    tail = None if last_subgroups is None else last_subgroups * rate_subgroup
    rates = _chunks(rejections(session, product.id, batch_id, last=tail), rate_subgroup)
    if len(rates) >= 2:
        found["p"] = p_chart([sum(g) for g in rates], [len(g) for g in rates], p_base)
    return found


def _numbered(message: str, index: int) -> str:
    """A violation message of the checked tail, with the subgroup's number in the whole chart."""
    return re.sub(r"subgroup \d+$", f"subgroup {index}", message)


def _count(session: Session, product_id: int, batch_id: int | None, with_swelling: bool) -> int:
    query = _inspected(product_id, batch_id, func.count())
    if with_swelling:
        query = query.where(Cell.swelling_mm.is_not(None))
    return session.scalar(query) or 0


def new_violations(session: Session, cell: Cell, subgroup: int, rate_subgroup: int) -> list[tuple[str, str, str]]:
    """(alarm kind, subject, message) for every rule broken by a subgroup this cell completed,
    once the product's baseline is in place. Two counts unless a subgroup closed; then the
    baseline and the last `CHECK_SUBGROUPS` subgroups, never the whole history."""
    lot = session.get(Lot, cell.lot_id)
    assert lot is not None
    totals = {"xbar": _count(session, lot.product_id, lot.supplier_batch_id, True) if cell.swelling_mm is not None else 0,
              "p": _count(session, lot.product_id, lot.supplier_batch_id, False)}
    closes = {"xbar": cell.swelling_mm is not None and totals["xbar"] % subgroup == 0,
              "p": totals["p"] % rate_subgroup == 0}
    totals["r"], closes["r"] = totals["xbar"], closes["xbar"]
    if not any(closes.values()):
        return []
    product = session.get(Product, lot.product_id)
    assert product is not None
    batch = session.get(SupplierBatch, lot.supplier_batch_id) if lot.supplier_batch_id else None
    xbar_base, p_base = baselines(session, product.id, subgroup, rate_subgroup)
    armed = {"xbar": xbar_base is not None, "r": xbar_base is not None, "p": p_base is not None}
    sizes = {"xbar": subgroup, "r": subgroup, "p": rate_subgroup}
    subject = f"{product.name}/{batch.code if batch else '-'}"
    found = []
    for name, chart in charts(session, product, batch, subgroup, rate_subgroup, last_subgroups=CHECK_SUBGROUPS).items():
        if closes[name] and armed[name]:
            last = len(chart.points) - 1
            offset = totals[name] // sizes[name] - len(chart.points)  # subgroups before the checked tail
            found += [(f"spc_{name}_rule_{v.rule}", subject, f"{name} chart of {subject}: {_numbered(v.message, offset + v.index)}")
                      for v in chart.violations if v.index == last]
    return found
