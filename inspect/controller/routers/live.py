"""Live updates for the dashboard (Server-Sent Events) and the line's summary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select

from pouchline.inspect.controller.deps import Operator, get_runtime
from pouchline.inspect.controller.runtime import Runtime
from pouchline.inspect.controller.schema import Alarm, Cell, Inspection, Lot

router = APIRouter(prefix="/api/v1", tags=["live"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
_TICK_S = 1.0
_MAX_EVENTS = 50


def summary(runtime: Runtime) -> dict[str, Any]:
    """Cells/min, the defect rate of the last hour, open lots, open alarms, and each station's last verdict."""
    now = datetime.now(UTC)
    with runtime.db.session() as session:
        minute = session.scalar(select(func.count()).where(Cell.received_at >= now - timedelta(minutes=1),
                                                           Cell.decision != "pending")) or 0
        hour = dict(session.execute(select(Cell.decision, func.count()).where(
            Cell.received_at >= now - timedelta(hours=1)).group_by(Cell.decision)).all())
        open_lots = session.scalar(select(func.count()).where(Lot.state == "open")) or 0
        held = session.scalar(select(func.count()).where(Lot.disposition == "hold")) or 0
        alarms = session.scalar(select(func.count()).where(Alarm.acknowledged_at.is_(None))) or 0
        stations = session.execute(select(Cell.station, func.max(Cell.received_at), func.count())
                                   .group_by(Cell.station)).all()
        workers = session.execute(select(Inspection.worker, Inspection.camera, func.max(Inspection.id))
                                  .group_by(Inspection.worker, Inspection.camera)).all()
        queue = session.scalar(select(func.count()).where(Cell.review_state == "pending")) or 0
    judged = hour.get("pass", 0) + hour.get("reject", 0)
    return {
        "at": now.isoformat(), "cells_per_min": minute, "cells_last_hour": judged,
        "defect_rate_pct": round(100.0 * hour.get("reject", 0) / judged, 2) if judged else None,
        "open_lots": open_lots, "held_lots": held, "open_alarms": alarms, "review_queue": queue,
        "stations": [{"station": s, "last_verdict": t.isoformat() if t else None,
                      "age_s": round((now - (t if t.tzinfo else t.replace(tzinfo=UTC))).total_seconds(), 1) if t else None,
                      "cells": n} for s, t, n in stations],
        "cameras": sorted({f"{worker}:{camera}" for worker, camera, _ in workers}),
        "services": services(runtime.settings.inspection),
    }


def services(addresses: list[str]) -> list[dict[str, Any]]:
    """Each inspection service's workers, from its /status (a dead service says so, it does not hang the page)."""
    found = []
    for address in addresses:
        try:
            status = httpx.get(f"http://{address}/status", timeout=0.5).json()
        except (httpx.HTTPError, ValueError) as error:
            found.append({"address": address, "reachable": False, "detail": str(error)[:120]})
            continue
        workers = status.get("workers", {})
        collector = status.get("collector") or {}
        found.append({"address": address, "reachable": True, "workers": len(workers),
                      "workers_alive": sum(bool(w.get("alive")) for w in workers.values()),
                      "restarts": sum(int(w.get("restarts", 0)) for w in workers.values()),
                      "cells_per_s": collector.get("cells_per_s")})
    return found


def _since(runtime: Runtime, cell_id: int, alarm_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with runtime.db.session() as session:
        cells = session.execute(select(Cell.id, Cell.key, Cell.decision, Cell.reasons, Lot.code)
                                .join(Lot).where(Cell.id > cell_id, Cell.decision != "pending")
                                .order_by(Cell.id).limit(_MAX_EVENTS)).all()
        alarms = session.execute(select(Alarm.id, Alarm.kind, Alarm.subject, Alarm.message)
                                 .where(Alarm.id > alarm_id).order_by(Alarm.id).limit(_MAX_EVENTS)).all()
    return ([{"id": c.id, "key": c.key, "decision": c.decision, "reasons": c.reasons, "lot": c.code} for c in cells],
            [{"id": a.id, "kind": a.kind, "subject": a.subject, "message": a.message} for a in alarms])


@router.get("/summary")
def get_summary(runtime: RuntimeDep, _: Operator) -> dict[str, Any]:
    return summary(runtime)


@router.get("/stream", response_class=StreamingResponse)
async def stream(request: Request, runtime: RuntimeDep, _: Operator) -> StreamingResponse:
    """Server-Sent Events: a ``summary`` every second, ``cell`` and ``alarm`` events as they happen."""

    async def events() -> AsyncIterator[str]:
        def latest() -> tuple[int, int]:
            with runtime.db.session() as session:
                return (session.scalar(select(func.max(Cell.id))) or 0, session.scalar(select(func.max(Alarm.id))) or 0)

        cell_id, alarm_id = await run_in_threadpool(latest)
        while not await request.is_disconnected():
            cells, alarms = await run_in_threadpool(_since, runtime, cell_id, alarm_id)
            for cell in cells:
                cell_id = max(cell_id, cell["id"])
                yield f"event: cell\ndata: {json.dumps(cell)}\n\n"
            for alarm in alarms:
                alarm_id = max(alarm_id, alarm["id"])
                yield f"event: alarm\ndata: {json.dumps(alarm)}\n\n"
            yield f"event: summary\ndata: {json.dumps(await run_in_threadpool(summary, runtime))}\n\n"
            await asyncio.sleep(_TICK_S)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
