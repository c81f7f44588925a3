"""Alarms: list, filter, acknowledge."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from pydantic import BaseModel
from sqlalchemy import select

from pouchline.inspect.controller.deps import page, DbSession, Operator, Page, Pages
from pouchline.inspect.controller.ledger import audit, utcnow
from pouchline.inspect.controller.schema import Alarm

router = APIRouter(prefix="/api/v1/alarms", tags=["alarms"])


class AlarmOut(BaseModel):
    id: int
    kind: str
    subject: str
    message: str
    raised_at: datetime
    acknowledged_by: str | None
    acknowledged_at: datetime | None


def _out(alarm: Alarm) -> AlarmOut:
    return AlarmOut(id=alarm.id, kind=alarm.kind, subject=alarm.subject, message=alarm.message,
                    raised_at=alarm.raised_at, acknowledged_by=alarm.acknowledged_by,
                    acknowledged_at=alarm.acknowledged_at)


@router.get("", response_model=Page[AlarmOut])
def list_alarms(session: DbSession, _: Operator, pages: Pages,
                kind: Annotated[str | None, Query(max_length=64)] = None,
                open_only: Annotated[bool, Query(alias="open")] = False) -> Page[AlarmOut]:
    query = select(Alarm)
    if kind:
        query = query.where(Alarm.kind == kind)
    if open_only:
        query = query.where(Alarm.acknowledged_at.is_(None))
    alarms, total = page(session, query, pages, Alarm.id.desc())
    return Page[AlarmOut](items=[_out(a) for a in alarms], total=total, limit=pages.limit, offset=pages.offset)


@router.post("/{alarm_id}/acknowledge", response_model=AlarmOut)
def acknowledge(alarm_id: Annotated[int, PathParam(ge=1, le=2**53)], session: DbSession, who: Operator) -> AlarmOut:
    alarm = session.get(Alarm, alarm_id)
    if alarm is None:
        raise HTTPException(404, f"no alarm {alarm_id}")
    if alarm.acknowledged_at is None:
        alarm.acknowledged_by, alarm.acknowledged_at = who.name, utcnow()
        audit(session, who.name, "alarm_acknowledged", f"alarm {alarm_id}", alarm.message)
        session.commit()  # committed before the reply: the caller may act on it at once
    return _out(alarm)
