"""Cells and their verdicts, the review queue, announced cells, and their images."""

from __future__ import annotations

import csv
import io
import tempfile
import zipfile
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from pouchline.datasets.records import check_identifier
from pouchline.inspect.controller.deps import page, QA, DbSession, Operator, Page, Pages, get_runtime
from pouchline.inspect.controller.runtime import Runtime
from pouchline.inspect.controller.schema import Cell, Inspection, Lot, Review
from pouchline.inspect.controller.store import StoreError

router = APIRouter(prefix="/api/v1", tags=["cells"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class InspectionOut(BaseModel):
    camera: str
    view: str
    status: str
    decision: str
    reasons: list[str]
    probs: dict[str, float]
    anomaly: float | None
    swelling_mm: float | None
    model_version: str | None
    model_sha256: str | None
    image: str | None = Field(description="Image id (SHA-256): GET /api/v1/images/{id}.")
    overlay: str | None = Field(description="Heat-map layer id (SHA-256).")
    regions: list[Any]
    cell_corners: list[Any] | None


class CellOut(BaseModel):
    key: str
    station: str
    lot: str
    cell: str
    t_capture: datetime
    decision: str
    reasons: list[str]
    source: str
    flags: list[str]
    swelling_mm: float | None
    review_state: str
    inspections: list[InspectionOut]


class Expected(BaseModel):
    model_config = ConfigDict(extra="forbid")

    station: str
    lot: str
    cell: str
    t_capture: float = Field(ge=0, le=4_102_444_800, description="Capture (trigger) time, Unix seconds (before 2100).")


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: Literal["confirmed", "false_alarm", "skipped"]
    kinds: list[str] = Field(default_factory=list, max_length=8, description="Defect kinds QA sees (confirmed).")
    note: str = Field("", max_length=2000)


def _inspection_out(row: Inspection) -> InspectionOut:
    verdict = row.verdict or {}
    return InspectionOut(camera=row.camera, view=row.view, status=row.status, decision=row.decision,
                         reasons=row.reasons, probs=row.probs, anomaly=row.anomaly, swelling_mm=row.swelling_mm,
                         model_version=row.model_version, model_sha256=row.model_sha256, image=row.image_sha256,
                         overlay=row.overlay_sha256, regions=verdict.get("regions", []),
                         cell_corners=verdict.get("cell_corners"))


def cell_out(cell: Cell) -> CellOut:
    return CellOut(key=cell.key, station=cell.station, lot=cell.lot.code, cell=cell.cell, t_capture=cell.t_capture,
                   decision=cell.decision, reasons=cell.reasons, source=cell.source, flags=cell.flagged_kinds,
                   swelling_mm=cell.swelling_mm, review_state=cell.review_state,
                   inspections=[_inspection_out(row) for row in cell.inspections])


@router.get("/cells", response_model=Page[CellOut])
def list_cells(session: DbSession, _: Operator, pages: Pages,
               lot: Annotated[str | None, Query(max_length=64)] = None,
               station: Annotated[str | None, Query(max_length=64)] = None,
               decision: Annotated[Literal["pending", "pass", "reject"] | None, Query()] = None,
               flag: Annotated[str | None, Query(max_length=64, description="Model flag: swollen, deformed, ...")] = None,
               review: Annotated[Literal["none", "pending", "confirmed", "false_alarm"] | None, Query()] = None,
               since: Annotated[datetime | None, Query()] = None,
               until: Annotated[datetime | None, Query()] = None) -> Page[CellOut]:
    query = select(Cell)
    if lot:
        query = query.join(Lot).where(Lot.code == lot)
    if station:
        query = query.where(Cell.station == station)
    if decision:
        query = query.where(Cell.decision == decision)
    if review:
        query = query.where(Cell.review_state == review)
    if since:
        query = query.where(Cell.t_capture >= since)
    if until:
        query = query.where(Cell.t_capture < until)
    rows = session.scalars(query.order_by(Cell.t_capture.desc(), Cell.id.desc())).all() if flag else None
    if rows is not None:  # JSON list membership, portable across SQLite and PostgreSQL
        matching = [cell for cell in rows if flag in cell.flagged_kinds]
        return Page[CellOut](items=[cell_out(c) for c in matching[pages.offset : pages.offset + pages.limit]],
                             total=len(matching), limit=pages.limit, offset=pages.offset)
    cells, total = page(session, query, pages, Cell.t_capture.desc(), Cell.id.desc())
    return Page[CellOut](items=[cell_out(c) for c in cells], total=total, limit=pages.limit, offset=pages.offset)


@router.get("/cells/{station}/{lot}/{cell}", response_model=CellOut)
def get_cell(station: str, lot: str, cell: str, session: DbSession, _: Operator) -> CellOut:
    row = session.scalar(select(Cell).where(Cell.key == f"{station}/{lot}/{cell}"))
    if row is None:
        raise HTTPException(404, f"no cell {station}/{lot}/{cell}")
    return cell_out(row)


@router.post("/cells/expected", status_code=202, response_model=CellOut)
def expect_cell(body: Expected, runtime: RuntimeDep, session: DbSession, who: QA) -> CellOut:
    """The line announces a cell at the station: no verdict by the deadline -> REJECT ``no_verdict``."""
    try:
        for name in ("station", "lot", "cell"):
            check_identifier(getattr(body, name), name)
    except ValueError as error:
        raise HTTPException(422, str(error)) from error
    runtime.ledger.expect(body.station, body.lot, body.cell, body.t_capture, who.name)
    row = session.scalar(select(Cell).where(Cell.key == f"{body.station}/{body.lot}/{body.cell}"))
    assert row is not None
    return cell_out(row)


@router.post("/cells/{station}/{lot}/{cell}/review", response_model=CellOut)
def review_cell(station: str, lot: str, cell: str, body: ReviewIn, runtime: RuntimeDep, session: DbSession,
                who: QA) -> CellOut:
    try:
        runtime.ledger.review(f"{station}/{lot}/{cell}", body.outcome, who.name, body.kinds, body.note)
    except KeyError as error:
        raise HTTPException(404, str(error)) from error
    row = session.scalar(select(Cell).where(Cell.key == f"{station}/{lot}/{cell}"))
    assert row is not None
    session.refresh(row)
    return cell_out(row)


@router.get("/reviews/queue", response_model=Page[CellOut])
def review_queue(session: DbSession, _: Operator, pages: Pages,
                 lot: Annotated[str | None, Query(max_length=64)] = None,
                 station: Annotated[str | None, Query(max_length=64)] = None,
                 flag: Annotated[str | None, Query(max_length=64)] = None,
                 since: Annotated[datetime | None, Query()] = None) -> Page[CellOut]:
    """Flagged cells waiting for QA, oldest first; filters by lot, station, defect kind, date."""
    query = select(Cell).where(Cell.review_state == "pending")
    if lot:
        query = query.join(Lot).where(Lot.code == lot)
    if station:
        query = query.where(Cell.station == station)
    if since:
        query = query.where(Cell.t_capture >= since)
    cells = [c for c in session.scalars(query.order_by(Cell.t_capture, Cell.id)) if not flag or flag in c.flagged_kinds]
    return Page[CellOut](items=[cell_out(c) for c in cells[pages.offset : pages.offset + pages.limit]],
                         total=len(cells), limit=pages.limit, offset=pages.offset)


@router.get("/reviews/reference", response_model=CellOut | None)
def reference_cell(session: DbSession, _: Operator,
                   station: Annotated[str | None, Query(max_length=64)] = None) -> CellOut | None:
    """The latest passed cell with a stored image (an audit sample): what a good cell looks like now."""
    query = (select(Cell).join(Inspection).where(Cell.decision == "pass", Inspection.image_sha256.is_not(None))
             .order_by(Cell.id.desc()).limit(1))
    if station:
        query = query.where(Cell.station == station)
    found = session.scalar(query)
    return None if found is None else cell_out(found)


@router.get("/images/{image_id}", response_class=FileResponse)
def get_image(image_id: str, runtime: RuntimeDep, _: Operator) -> FileResponse:
    """A stored image by its SHA-256 (anything else, e.g. a path, is 404)."""
    try:
        path = runtime.store.find(image_id)
    except StoreError:
        path = None
    if path is None:
        raise HTTPException(404, "no such image")
    return FileResponse(path, media_type="image/jpeg" if path.suffix == ".jpg" else "image/png",
                        headers={"Cache-Control": "private, max-age=86400, immutable"})


@router.get("/reviews/export.zip", response_class=StreamingResponse)
def export_reviewed(runtime: RuntimeDep, session: DbSession, _: Operator,
                    lot: Annotated[str | None, Query(max_length=64)] = None) -> StreamingResponse:
    """QA's decisions as a dataset for retraining: ``labels.csv`` (path,label) and the images, the
    layout `pouchline dataset import` reads. Confirmed cells are labelled with the kinds QA saw (or
    the model's flags), false alarms ``ok``."""
    query = select(Cell).where(Cell.review_state.in_(("confirmed", "false_alarm")))
    if lot:
        query = query.join(Lot).where(Lot.code == lot)
    buffer = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
    rows = []
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for cell in session.scalars(query.order_by(Cell.id)):
            review = session.scalar(select(Review).where(Review.cell_id == cell.id, Review.outcome != "skipped")
                                    .order_by(Review.id.desc()))
            kinds = (review.kinds if review and review.kinds else cell.flagged_kinds) or ["defect"]
            labels = ["ok"] if cell.review_state == "false_alarm" else [k for k in kinds if k != "anomaly"] or ["defect"]
            for row in cell.inspections:
                path = runtime.store.find(row.image_sha256) if row.image_sha256 else None
                if path is None:
                    continue
                name = f"images/{row.image_sha256}{path.suffix}"
                archive.write(path, name)
                rows.append((name, ";".join(labels), cell.key, row.camera))
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["path", "label", "cell", "camera"])
        writer.writerows(rows)
        archive.writestr("labels.csv", table.getvalue())
    buffer.seek(0)
    return StreamingResponse(buffer, media_type="application/zip",
                             headers={"Content-Disposition": 'attachment; filename="reviewed.zip"'})


class VerdictOut(BaseModel):
    cell: str
    camera: str
    view: str
    status: str
    decision: str
    reasons: list[str]
    worker: str
    model_version: str | None
    received_at: datetime


class DispositionOut(BaseModel):
    cell: str
    decision: str
    reasons: list[str]
    source: str = Field(description="'verdict', or 'deadline' when no verdict came in time.")
    t_capture: datetime
    published_at: datetime | None


@router.get("/verdicts", response_model=Page[VerdictOut])
def list_verdicts(session: DbSession, _: Operator, pages: Pages,
                  station: Annotated[str | None, Query(max_length=64)] = None,
                  status: Annotated[str | None, Query(max_length=32)] = None,
                  model: Annotated[str | None, Query(max_length=64, description="Model sha256.")] = None) -> Page[VerdictOut]:
    """Each view's verdict as the inspection service sent it, newest first."""
    query = select(Inspection, Cell).join(Cell)
    if station:
        query = query.where(Cell.station == station)
    if status:
        query = query.where(Inspection.status == status)
    if model:
        query = query.where(Inspection.model_sha256 == model)
    rows, total = page(session, query, pages, Inspection.id.desc())
    return Page[VerdictOut](items=[VerdictOut(cell=c.key, camera=i.camera, view=i.view, status=i.status,
                                              decision=i.decision, reasons=i.reasons, worker=i.worker,
                                              model_version=i.model_version, received_at=c.received_at)
                                   for i, c in rows], total=total, limit=pages.limit, offset=pages.offset)


@router.get("/dispositions", response_model=Page[DispositionOut])
def list_dispositions(session: DbSession, _: Operator, pages: Pages,
                      station: Annotated[str | None, Query(max_length=64)] = None,
                      source: Annotated[Literal["verdict", "deadline"] | None, Query()] = None) -> Page[DispositionOut]:
    """What the line was told per cell (PASS/REJECT and why), newest first."""
    query = select(Cell).where(Cell.published_at.is_not(None))
    if station:
        query = query.where(Cell.station == station)
    if source:
        query = query.where(Cell.source == source)
    cells, total = page(session, query, pages, Cell.published_at.desc(), Cell.id.desc())
    return Page[DispositionOut](items=[DispositionOut(cell=c.key, decision=c.decision, reasons=c.reasons, source=c.source,
                                                      t_capture=c.t_capture, published_at=c.published_at) for c in cells],
                                total=total, limit=pages.limit, offset=pages.offset)
