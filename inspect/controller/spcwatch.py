"""SPC on the stored cells: charts per product and supplier batch, and alarms as subgroups close.

The swelling estimate is charted as X-bar/R in subgroups of ``spc_subgroup`` consecutive
cells, the reject rate as a p-chart in subgroups of ``spc_rate_subgroup`` cells. Limits come
from the product's first `PHASE_ONE` subgroups (its approved baseline) and then stay fixed,
so a supplier batch whose material slowly changes drifts against them instead of dragging
them along; every batch's chart uses its product's baseline. Western Electric rules raise
an alarm the moment a subgroup completes a pattern, before any cell fails its spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pouchline.inspect.controller.schema import Cell, Lot, Product, SupplierBatch
from pouchline.inspect.controller.spc import CONTROL_CONSTANTS, Chart, p_chart, xbar_r_chart

#: Subgroups of a product that set its baseline; no alarms before they are in.
PHASE_ONE = 20


@dataclass(frozen=True)
class Series:
    swelling: list[float]  # per inspected cell, capture order
    rejected: list[bool]


def series(session: Session, product_id: int, batch_id: int | None = None) -> Series:
    query = (select(Cell.swelling_mm, Cell.decision).join(Lot, Cell.lot_id == Lot.id)
             .where(Lot.product_id == product_id, Cell.decision != "pending", Cell.source == "verdict")
             .order_by(Cell.t_capture, Cell.id))
    if batch_id is not None:
        query = query.where(Lot.supplier_batch_id == batch_id)
    rows = session.execute(query).all()
    return Series([r.swelling_mm for r in rows if r.swelling_mm is not None], [r.decision == "reject" for r in rows])


def _chunks(values: list[Any], size: int) -> list[list[Any]]:
    return [values[i : i + size] for i in range(0, len(values) - size + 1, size)]


def baselines(product: Series, subgroup: int, rate_subgroup: int) -> tuple[tuple[float, float] | None, float | None]:
    """(centre, sigma of subgroup means) for X-bar and the rate for p, once phase one is complete."""
    groups = _chunks(product.swelling, subgroup)[:PHASE_ONE]
    xbar = None
    if len(groups) == PHASE_ONE:
        chart, _ = xbar_r_chart(groups)
        spread = chart.points[0].sigma or CONTROL_CONSTANTS[subgroup].A2 * 1e-3
        xbar = (chart.points[0].centre, spread)
    rates = _chunks(product.rejected, rate_subgroup)[:PHASE_ONE]
    p = None
    if len(rates) == PHASE_ONE:
        defective, total = sum(sum(g) for g in rates), sum(len(g) for g in rates)
        p = (defective + 0.5) / (total + 1.0)  # never exactly 0 or 1: a clean start still has limits
    return xbar, p


def charts(session: Session, product: Product, batch: SupplierBatch | None, subgroup: int,
           rate_subgroup: int) -> dict[str, Chart]:
    """X-bar, R and p charts of ``product`` (or of one of its supplier batches)."""
    whole = series(session, product.id)
    data = whole if batch is None else series(session, product.id, batch.id)
    xbar_base, p_base = baselines(whole, subgroup, rate_subgroup)
    found: dict[str, Chart] = {}
    groups = _chunks(data.swelling, subgroup)
    if len(groups) >= 2:
        found["xbar"], found["r"] = xbar_r_chart(groups, xbar_base)
    rates = _chunks(data.rejected, rate_subgroup)
    if len(rates) >= 2:
        found["p"] = p_chart([sum(g) for g in rates], [len(g) for g in rates], p_base)
    return found


def _count(session: Session, product_id: int, batch_id: int | None, with_swelling: bool) -> int:
    query = (select(func.count()).select_from(Cell).join(Lot, Cell.lot_id == Lot.id)
             .where(Lot.product_id == product_id, Cell.decision != "pending", Cell.source == "verdict"))
    if batch_id is not None:
        query = query.where(Lot.supplier_batch_id == batch_id)
    if with_swelling:
        query = query.where(Cell.swelling_mm.is_not(None))
    return session.scalar(query) or 0


def new_violations(session: Session, cell: Cell, subgroup: int, rate_subgroup: int) -> list[tuple[str, str, str]]:
    """(alarm kind, subject, message) for every rule broken by a subgroup this cell completed,
    once the product's baseline is in place. Cheap unless a subgroup closed (two counts)."""
    lot = session.get(Lot, cell.lot_id)
    assert lot is not None
    closes = {"xbar": cell.swelling_mm is not None
              and _count(session, lot.product_id, lot.supplier_batch_id, True) % subgroup == 0,
              "p": _count(session, lot.product_id, lot.supplier_batch_id, False) % rate_subgroup == 0}
    closes["r"] = closes["xbar"]
    if not any(closes.values()):
        return []
    product = session.get(Product, lot.product_id)
    assert product is not None
    batch = session.get(SupplierBatch, lot.supplier_batch_id) if lot.supplier_batch_id else None
    xbar_base, p_base = baselines(series(session, product.id), subgroup, rate_subgroup)
    armed = {"xbar": xbar_base is not None, "r": xbar_base is not None, "p": p_base is not None}
    subject = f"{product.name}/{batch.code if batch else '-'}"
    found = []
    for name, chart in charts(session, product, batch, subgroup, rate_subgroup).items():
        if closes[name] and armed[name]:
            last = len(chart.points) - 1
            found += [(f"spc_{name}_rule_{v.rule}", subject, f"{name} chart of {subject}: {v.message}")
                      for v in chart.violations if v.index == last]
    return found
