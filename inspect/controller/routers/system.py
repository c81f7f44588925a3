"""Health, readiness, Prometheus metrics, the models in use, and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from sqlalchemy import func, select, text

from pouchline.inspect.controller.deps import page, DbSession, Operator, Page, Pages, get_runtime
from pouchline.inspect.controller.runtime import Runtime
from pouchline.inspect.controller.schema import Alarm, AuditEntry, Cell, Inspection, Lot
from pouchline.inspect.metrics import PrometheusText

router = APIRouter(tags=["system"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """The database answers and the intake runs: ready for verdicts."""
    try:
        with runtime.db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:  # any driver error means not ready
        return JSONResponse({"status": "database unavailable", "detail": str(error)[:200]}, status_code=503)
    return JSONResponse({"status": "ready", "verdicts": runtime.receiver.endpoint, "publish": runtime.publisher.endpoint})


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(runtime: RuntimeDep, session: DbSession) -> str:
    """Prometheus text format: cells by decision, lots by disposition, open alarms, intake counters."""
    out = PrometheusText()
    out.family("pouchline_controller_cells", "gauge", "Cells stored, by decision.")
    for decision, count in session.execute(select(Cell.decision, func.count()).group_by(Cell.decision)):
        out.sample("pouchline_controller_cells", count, {"decision": decision})
    out.family("pouchline_controller_lots", "gauge", "Lots by disposition.")
    for disposition, count in session.execute(select(Lot.disposition, func.count()).group_by(Lot.disposition)):
        out.sample("pouchline_controller_lots", count, {"disposition": disposition})
    out.family("pouchline_controller_open_alarms", "gauge", "Alarms not acknowledged.")
    out.sample("pouchline_controller_open_alarms",
               session.scalar(select(func.count()).where(Alarm.acknowledged_at.is_(None))) or 0)
    out.family("pouchline_controller_events_total", "counter", "Verdicts stored, duplicates, refusals, no-verdict rejects.")
    for key, value in sorted(runtime.counts.items()):
        out.sample("pouchline_controller_events_total", value, {"event": key})
    out.family("pouchline_controller_published_total", "counter", "Messages published to the line.")
    for key, value in sorted(runtime.publisher.counts.items()):
        out.sample("pouchline_controller_published_total", value, {"channel": key})
    return out.text()


class ModelInUse(BaseModel):
    version: str | None
    sha256: str | None
    inspections: int
    last_seen: datetime | None


@router.get("/api/v1/models", response_model=list[ModelInUse])
def models(session: DbSession, _: Operator) -> list[ModelInUse]:
    """The models that judged the stored cells, newest first."""
    rows = session.execute(select(Inspection.model_version, Inspection.model_sha256, func.count(),
                                  func.max(Cell.received_at)).join(Cell)
                           .group_by(Inspection.model_version, Inspection.model_sha256)).all()
    found = [ModelInUse(version=v, sha256=s, inspections=n, last_seen=t) for v, s, n, t in rows if s is not None]
    return sorted(found, key=lambda m: m.last_seen or datetime.min, reverse=True)


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    reason: str
    detail: dict[str, Any]


@router.get("/api/v1/audit", response_model=Page[AuditOut])
def audit_log(session: DbSession, _: Operator, pages: Pages,
              action: Annotated[str | None, Query(max_length=64)] = None,
              subject: Annotated[str | None, Query(max_length=200)] = None) -> Page[AuditOut]:
    query = select(AuditEntry)
    if action:
        query = query.where(AuditEntry.action == action)
    if subject:
        query = query.where(AuditEntry.subject == subject)
    rows, total = page(session, query, pages, AuditEntry.id.desc())
    return Page[AuditOut](items=[AuditOut(id=r.id, at=r.at, actor=r.actor, action=r.action, subject=r.subject,
                                          reason=r.reason, detail=r.detail) for r in rows],
                          total=total, limit=pages.limit, offset=pages.offset)
