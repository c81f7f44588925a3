"""Lots: create, list, detail, close, override, CSV export."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from pouchline.datasets.records import check_identifier
from pouchline.inspect.controller.deps import page, QA, DbSession, Operator, Page, Pages, get_runtime
from pouchline.inspect.controller.ledger import audit, utcnow
from pouchline.inspect.controller.runtime import Runtime
from pouchline.inspect.controller.schema import Cell, Lot, Product, SupplierBatch

router = APIRouter(prefix="/api/v1/lots", tags=["lots"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class LotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=64, description="Lot id, as the line and the stations name it.")
    product: str = Field(description="Product name.")
    supplier_batch: str | None = Field(None, description="Supplier batch code.")
    expected_quantity: int = Field(ge=1, le=10_000_000, description="Cells in the lot; it closes when all are in.")


class LotOut(BaseModel):
    code: str
    product: str
    supplier_batch: str | None
    expected_quantity: int
    state: str
    disposition: str
    disposition_reason: str
    cells: int
    rejected: int
    pending: int
    created_at: datetime
    closed_at: datetime | None
    decided_at: datetime | None


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disposition: Literal["accept", "reject", "hold"]
    reason: str = Field(min_length=5, max_length=2000, description="Mandatory: why QA decides against the policy.")


def lot_out(session: DbSession, lot: Lot) -> LotOut:
    counts = dict(session.execute(select(Cell.decision, func.count()).where(Cell.lot_id == lot.id)
                                  .group_by(Cell.decision)).all())
    return LotOut(code=lot.code, product=lot.product.name,
                  supplier_batch=lot.supplier_batch.code if lot.supplier_batch else None,
                  expected_quantity=lot.expected_quantity, state=lot.state, disposition=lot.disposition,
                  disposition_reason=lot.disposition_reason, cells=sum(counts.values()),
                  rejected=counts.get("reject", 0), pending=counts.get("pending", 0), created_at=lot.created_at,
                  closed_at=lot.closed_at, decided_at=lot.decided_at)


def _lot(session: DbSession, code: str) -> Lot:
    lot = session.scalar(select(Lot).where(Lot.code == code))
    if lot is None:
        raise HTTPException(404, f"no lot {code!r}")
    return lot


@router.post("", status_code=201, response_model=LotOut)
def create_lot(body: LotCreate, session: DbSession, who: QA) -> LotOut:
    try:
        check_identifier(body.code, "code")
    except ValueError as error:
        raise HTTPException(422, str(error)) from error
    if session.scalar(select(Lot).where(Lot.code == body.code)) is not None:
        raise HTTPException(409, f"lot {body.code!r} exists")
    product = session.scalar(select(Product).where(Product.name == body.product))
    if product is None:
        raise HTTPException(422, f"no product {body.product!r}")
    batch = None
    if body.supplier_batch is not None:
        batch = session.scalar(select(SupplierBatch).where(SupplierBatch.code == body.supplier_batch))
        if batch is None:
            raise HTTPException(422, f"no supplier batch {body.supplier_batch!r}")
    lot = Lot(code=body.code, product_id=product.id, supplier_batch_id=batch.id if batch else None,
              expected_quantity=body.expected_quantity, created_at=utcnow())
    session.add(lot)
    audit(session, who.name, "lot_created", body.code, product=body.product, expected=body.expected_quantity)
    session.commit()  # committed before the reply: the caller may act on it at once
    session.refresh(lot)
    return lot_out(session, lot)


@router.get("", response_model=Page[LotOut])
def list_lots(session: DbSession, _: Operator, pages: Pages,
              state: Annotated[Literal["open", "closed"] | None, Query()] = None,
              disposition: Annotated[Literal["pending", "accept", "reject", "hold"] | None, Query()] = None,
              product: Annotated[str | None, Query(max_length=64)] = None) -> Page[LotOut]:
    query = select(Lot)
    if state:
        query = query.where(Lot.state == state)
    if disposition:
        query = query.where(Lot.disposition == disposition)
    if product:
        query = query.join(Product).where(Product.name == product)
    lots, total = page(session, query, pages, Lot.id.desc())
    return Page[LotOut](items=[lot_out(session, lot) for lot in lots], total=total, limit=pages.limit,
                        offset=pages.offset)


@router.get("/{code}", response_model=LotOut)
def get_lot(code: str, session: DbSession, _: Operator) -> LotOut:
    return lot_out(session, _lot(session, code))


@router.post("/{code}/close", response_model=LotOut)
def close_lot(code: str, runtime: RuntimeDep, session: DbSession, who: QA) -> LotOut:
    _lot(session, code)
    runtime.ledger.close_lot(code, who.name)
    session.expire_all()
    return lot_out(session, _lot(session, code))


@router.post("/{code}/override", response_model=LotOut)
def override_lot(code: str, body: Override, runtime: RuntimeDep, session: DbSession, who: QA) -> LotOut:
    _lot(session, code)
    try:
        runtime.ledger.override_lot(code, body.disposition, body.reason, who.name)
    except ValueError as error:
        raise HTTPException(422, str(error)) from error
    session.expire_all()
    return lot_out(session, _lot(session, code))


@router.get("/{code}/cells.csv", response_class=StreamingResponse)
def export_cells(code: str, session: DbSession, _: Operator) -> StreamingResponse:
    lot = _lot(session, code)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cell", "station", "t_capture", "decision", "reasons", "flags", "swelling_mm", "review"])
    for cell in session.scalars(select(Cell).where(Cell.lot_id == lot.id).order_by(Cell.t_capture, Cell.id)):
        writer.writerow([cell.cell, cell.station, cell.t_capture.isoformat(), cell.decision, ";".join(cell.reasons),
                         ";".join(cell.flagged_kinds), "" if cell.swelling_mm is None else f"{cell.swelling_mm:.3f}",
                         cell.review_state])
    return StreamingResponse(iter([buffer.getvalue()]), media_type="text/csv",
                             headers={"Content-Disposition": f'attachment; filename="{code}-cells.csv"'})
