"""Where verdicts become decisions, stored before anyone is told.

`Ledger` owns the rules: a cell verdict is stored (cell, views, images) in one transaction,
then the cell's disposition is published; a cell whose verdict comes after its deadline,
or never (a cell announced by the line and never judged), is a REJECT with reason
``no_verdict``, never a PASS; each stored cell re-evaluates its lot under the product's
policy, and a lot that turns to REJECT publishes a lot-reject command and raises an alarm.
Everything a person or the controller decides goes to the audit log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pouchline.inspect.controller.database import Database
from pouchline.inspect.controller.lotpolicy import LotCounts, LotPolicy, decide
from pouchline.inspect.controller.publish import Publisher
from pouchline.inspect.controller.spcwatch import new_violations
from pouchline.inspect.controller.schema import Alarm, AuditEntry, Cell, Inspection, Lot, Product, Review
from pouchline.inspect.controller.store import ImageStore, StoreError
from pouchline.inspect.verdicts import CellVerdict

log = logging.getLogger(__name__)

DEFAULT_PRODUCT = "default"
CONTROLLER = "controller"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def audit(session: Session, actor: str, action: str, subject: str, reason: str = "", **detail: Any) -> None:
    session.add(AuditEntry(at=utcnow(), actor=actor, action=action, subject=subject, reason=reason, detail=detail))


def raise_alarm(session: Session, kind: str, subject: str, message: str) -> Alarm | None:
    """A new alarm, unless the same kind is already open on the same subject (a drifting batch
    breaks a rule at every subgroup: one alarm until someone acknowledges it, not a flood)."""
    if session.scalar(select(Alarm.id).where(Alarm.kind == kind, Alarm.subject == subject,
                                             Alarm.acknowledged_at.is_(None)).limit(1)) is not None:
        return None
    alarm = Alarm(kind=kind, subject=subject, message=message, raised_at=utcnow())
    session.add(alarm)
    audit(session, CONTROLLER, "alarm", subject, message, kind=kind)
    log.info("alarm %s on %s: %s", kind, subject, message)
    return alarm


class Ledger:
    """The controller's decisions; thread-safe (one lock around each decision)."""

    def __init__(self, db: Database, store: ImageStore, publisher: Publisher, *, deadline_s: float,
                 spc_subgroup: int = 5, spc_rate_subgroup: int = 50) -> None:
        self.db = db
        self.spc_subgroup = spc_subgroup
        self.spc_rate_subgroup = spc_rate_subgroup
        self.store = store
        self.publisher = publisher
        self.deadline = timedelta(seconds=deadline_s)
        self._lock = threading.Lock()

    # -- cells --------------------------------------------------------------------------

    def record(self, verdict: CellVerdict, attachments: Sequence[bytes | memoryview]) -> bool:
        """Store one cell verdict (idempotent); True when it was new. Publishes after the commit."""
        now = utcnow()
        with self._lock, self.db.session() as session:
            cell = session.scalar(select(Cell).where(Cell.key == verdict.cell_id))
            if cell is not None and cell.inspections:
                return False  # a redelivery: stored already, acknowledge again
            self._store_images(verdict, attachments)
            lot = self._lot(session, verdict.lot)
            late = now > _at(verdict.t_capture) + self.deadline
            fresh = cell is None
            if cell is None:
                cell = Cell(key=verdict.cell_id, station=verdict.station, cell=verdict.cell, lot_id=lot.id,
                            t_capture=_at(verdict.t_capture), decision="pending", source="verdict", received_at=now)
                session.add(cell)
            self._add_inspections(cell, verdict)
            flags = sorted({r for f in verdict.frames for r in f.reasons if f.status == "ok"})
            cell.flagged_kinds = flags
            cell.swelling_mm = max((f.swelling_mm for f in verdict.frames if f.swelling_mm is not None), default=None)
            cell.received_at = now
            publish = cell.decision == "pending"
            if publish:
                if late:
                    cell.decision, cell.reasons, cell.source = "reject", ["no_verdict"], "deadline"
                else:
                    cell.decision, cell.reasons = verdict.decision, list(verdict.reasons)
                cell.published_at = now
            else:  # already rejected by the deadline: the late verdict is kept, the decision stands
                cell.reasons = list(dict.fromkeys([*cell.reasons, "late_verdict"]))
            cell.review_state = "pending" if flags and verdict.decision == "reject" else "none"
            session.flush()
            lot_message = self._evaluate_lot(session, lot)
            for kind, subject, text in new_violations(session, cell, self.spc_subgroup, self.spc_rate_subgroup):
                raise_alarm(session, kind, subject, text)
            message = self._cell_message(cell, verdict.lot) if publish else None
        if message is not None:
            self.publisher.publish(f"cell.{verdict.station}", message)
        if lot_message is not None:
            self.publisher.publish(f"lot.{lot_message['lot']}", lot_message)
        return fresh

    def _store_images(self, verdict: CellVerdict, attachments: Sequence[bytes | memoryview]) -> None:
        shelf = "audit" if verdict.audit else "keep"
        for frame in verdict.frames:
            for item in frame.attachments:
                try:
                    self.store.put(attachments[item.part], item.sha256, item.media_type, shelf)
                except (StoreError, IndexError) as error:
                    raise StoreError(f"cell {verdict.cell_id}, attachment {item.part}: {error}") from error

    @staticmethod
    def _add_inspections(cell: Cell, verdict: CellVerdict) -> None:
        for frame in verdict.frames:
            images = {item.kind: item.sha256 for item in frame.attachments}
            cell.inspections.append(Inspection(
                camera=frame.camera, view=frame.view, seq=frame.seq, status=frame.status, decision=frame.decision,
                reasons=list(frame.reasons), probs=dict(frame.probs), anomaly=frame.anomaly,
                swelling_mm=frame.swelling_mm, model_sha256=frame.model.sha256 if frame.model else None,
                model_version=frame.model.version if frame.model else None, worker=frame.worker,
                image_sha256=images.get("image"), overlay_sha256=images.get("overlay"),
                verdict=frame.model_dump(mode="json"),
            ))

    @staticmethod
    def _cell_message(cell: Cell, lot: str) -> dict[str, Any]:
        return {"type": "cell", "station": cell.station, "lot": lot, "cell": cell.cell, "decision": cell.decision.upper(),
                "reasons": cell.reasons, "t_capture": cell.t_capture.timestamp(),
                "published_at": cell.published_at.timestamp() if cell.published_at else None}

    def expect(self, station: str, lot: str, cell: str, t_capture: float, actor: str) -> Cell:
        """The line announces a cell: if no verdict comes by its deadline it is rejected."""
        key = f"{station}/{lot}/{cell}"
        with self._lock, self.db.session() as session:
            row = session.scalar(select(Cell).where(Cell.key == key))
            if row is None:
                row = Cell(key=key, station=station, cell=cell, lot_id=self._lot(session, lot).id,
                           t_capture=_at(t_capture), decision="pending", source="verdict", received_at=utcnow())
                session.add(row)
                audit(session, actor, "cell_expected", key)
            return row

    def expire(self) -> int:
        """Reject every announced cell whose deadline passed without a verdict; how many."""
        now = utcnow()
        messages = []
        with self._lock, self.db.session() as session:
            overdue = session.scalars(select(Cell).where(Cell.decision == "pending")).all()
            for cell in overdue:
                t_capture = cell.t_capture if cell.t_capture.tzinfo else cell.t_capture.replace(tzinfo=UTC)
                if now <= t_capture + self.deadline:
                    continue
                cell.decision, cell.reasons, cell.source, cell.published_at = "reject", ["no_verdict"], "deadline", now
                raise_alarm(session, "no_verdict", cell.key, f"no verdict for {cell.key} within "
                                                             f"{self.deadline.total_seconds():.1f} s: rejected")
                session.flush()
                lot = session.get(Lot, cell.lot_id)
                assert lot is not None
                messages.append((f"cell.{cell.station}", self._cell_message(cell, lot.code)))
                lot_message = self._evaluate_lot(session, lot)
                if lot_message is not None:
                    messages.append((f"lot.{lot.code}", lot_message))
        for topic, message in messages:
            self.publisher.publish(topic, message)
        return sum(1 for topic, _ in messages if topic.startswith("cell."))

    # -- lots ---------------------------------------------------------------------------

    def _lot(self, session: Session, code: str) -> Lot:
        lot = session.scalar(select(Lot).where(Lot.code == code))
        if lot is not None:
            return lot
        product = session.scalar(select(Product).where(Product.name == DEFAULT_PRODUCT))
        if product is None:
            product = Product(name=DEFAULT_PRODUCT, spec={}, policy=LotPolicy().model_dump())
            session.add(product)
            session.flush()
        try:
            with session.begin_nested():  # the lot may be created through the API at this very moment
                lot = Lot(code=code, product_id=product.id, expected_quantity=0, created_at=utcnow())
                session.add(lot)
        except IntegrityError:
            found = session.scalar(select(Lot).where(Lot.code == code))
            assert found is not None
            return found
        raise_alarm(session, "unknown_lot", code, f"verdicts for lot {code}, which nobody created: filed under "
                                                  f"product {product.name!r} with its policy")
        return lot

    def lot_counts(self, session: Session, lot: Lot) -> LotCounts:
        rows = session.execute(select(Cell.decision, Cell.swelling_mm, Cell.review_state).where(
            Cell.lot_id == lot.id, Cell.decision != "pending").order_by(Cell.t_capture, Cell.id)).all()
        swellings = [row.swelling_mm for row in rows if row.swelling_mm is not None]
        return LotCounts(expected=lot.expected_quantity, decisions=[row.decision == "reject" for row in rows],
                         max_swelling_mm=max(swellings) if swellings else None,
                         unreviewed_flags=sum(row.review_state == "pending" for row in rows),
                         closed=lot.state == "closed")

    def _evaluate_lot(self, session: Session, lot: Lot) -> dict[str, Any] | None:
        """Apply the policy; a change to a final state is stored, audited and returned for publishing."""
        counts = self.lot_counts(session, lot)
        if lot.state == "open" and lot.expected_quantity and len(counts.decisions) >= lot.expected_quantity:
            lot.state, lot.closed_at = "closed", utcnow()
            audit(session, CONTROLLER, "lot_closed", lot.code, "expected quantity reached")
            counts = self.lot_counts(session, lot)
        if lot.disposition in ("accept", "reject") and lot.decided_at is not None:
            return None  # decided (by the policy or by QA): later cells do not reopen it
        decision = decide(LotPolicy.model_validate(lot.product.policy), counts)
        if decision.disposition == lot.disposition:
            lot.disposition_reason = decision.reason
            return None
        lot.disposition, lot.disposition_reason = decision.disposition, decision.reason
        if decision.disposition == "pending":
            return None
        if decision.disposition in ("accept", "reject"):
            lot.decided_at = utcnow()
        audit(session, CONTROLLER, f"lot_{decision.disposition}", lot.code, decision.reason)
        if decision.disposition == "reject":
            raise_alarm(session, "lot_rejected", lot.code, f"lot {lot.code} rejected: {decision.reason}")
        return {"type": "lot", "lot": lot.code, "disposition": decision.disposition.upper(), "reason": decision.reason,
                "by": CONTROLLER}

    def close_lot(self, code: str, actor: str) -> Lot:
        with self._lock, self.db.session() as session:
            lot = self._existing_lot(session, code)
            if lot.state != "closed":
                lot.state, lot.closed_at = "closed", utcnow()
                audit(session, actor, "lot_closed", code)
            message = self._evaluate_lot(session, lot)
        if message is not None:
            self.publisher.publish(f"lot.{code}", message)
        return lot

    def override_lot(self, code: str, disposition: str, reason: str, actor: str) -> Lot:
        """QA decides a lot against (or ahead of) the policy; the reason is mandatory and audited."""
        if disposition not in ("accept", "reject", "hold"):
            raise ValueError(f"disposition {disposition!r}: use accept, reject or hold")
        if len(reason.strip()) < 5:
            raise ValueError("an override needs a reason of at least 5 characters")
        with self._lock, self.db.session() as session:
            lot = self._existing_lot(session, code)
            before = lot.disposition
            lot.disposition, lot.disposition_reason = disposition, f"override by {actor}: {reason.strip()}"
            lot.decided_at = utcnow() if disposition != "hold" else None
            audit(session, actor, "lot_override", code, reason.strip(), before=before, after=disposition)
        self.publisher.publish(f"lot.{code}", {"type": "lot", "lot": code, "disposition": disposition.upper(),
                                               "reason": reason.strip(), "by": actor})
        return lot

    @staticmethod
    def _existing_lot(session: Session, code: str) -> Lot:
        lot = session.scalar(select(Lot).where(Lot.code == code))
        if lot is None:
            raise KeyError(f"no lot {code!r}")
        return lot

    # -- reviews --------------------------------------------------------------------------

    def review(self, key: str, outcome: str, actor: str, kinds: list[str], note: str) -> Cell:
        """QA's call on a flagged cell; a lot waiting on reviews is evaluated again."""
        if outcome not in ("confirmed", "false_alarm", "skipped"):
            raise ValueError(f"outcome {outcome!r}: use confirmed, false_alarm or skipped")
        with self._lock, self.db.session() as session:
            cell = session.scalar(select(Cell).where(Cell.key == key))
            if cell is None:
                raise KeyError(f"no cell {key!r}")
            session.add(Review(cell_id=cell.id, user=actor, outcome=outcome, kinds=kinds, note=note, at=utcnow()))
            if outcome != "skipped":
                cell.review_state = outcome
            audit(session, actor, f"review_{outcome}", key, note, kinds=kinds)
            session.flush()
            lot = session.get(Lot, cell.lot_id)
            assert lot is not None
            message = self._evaluate_lot(session, lot)
        if message is not None:
            self.publisher.publish(f"lot.{message['lot']}", message)
        return cell

    def counts(self) -> dict[str, int]:
        with self.db.session() as session:
            rows = session.execute(select(Cell.decision, func.count()).group_by(Cell.decision)).all()
        return {decision: count for decision, count in rows}
