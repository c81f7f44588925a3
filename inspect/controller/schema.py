"""The controller's tables (SQLAlchemy 2). Alembic migrations create them; this is their shape.

Cells are keyed by ``station/lot/cell`` (unique), so a verdict delivered twice is recognised.
The audit log is append-only: the migrations install triggers that refuse UPDATE and DELETE
on it, on SQLite and PostgreSQL alike, so not even a bug in this code can rewrite history.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class Line(Base):
    """A production line and the stations on it."""

    __tablename__ = "lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    stations: Mapped[list[Any]] = mapped_column(default=list)


class Product(Base):
    """A cell type: its spec and the lot policy that decides its lots."""

    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # length/width/thickness in mm
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict)  # LotPolicy as JSON


class SupplierBatch(Base):
    __tablename__ = "supplier_batches"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    supplier: Mapped[str] = mapped_column(String(128))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))


class Lot(Base):
    __tablename__ = "lots"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    supplier_batch_id: Mapped[int | None] = mapped_column(ForeignKey("supplier_batches.id"))
    line_id: Mapped[int | None] = mapped_column(ForeignKey("lines.id"))
    expected_quantity: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="open")  # open, closed
    disposition: Mapped[str] = mapped_column(String(16), default="pending")  # pending, accept, reject, hold
    disposition_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    decided_at: Mapped[datetime | None]

    product: Mapped[Product] = relationship()
    supplier_batch: Mapped[SupplierBatch | None] = relationship()


class Cell(Base):
    """One cell and what the line was told to do with it."""

    __tablename__ = "cells"
    __table_args__ = (Index("ix_cells_lot_decision", "lot_id", "decision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)  # station/lot/cell
    station: Mapped[str] = mapped_column(String(64), index=True)
    cell: Mapped[str] = mapped_column(String(64))
    lot_id: Mapped[int] = mapped_column(ForeignKey("lots.id"), index=True)
    t_capture: Mapped[datetime]
    decision: Mapped[str] = mapped_column(String(8))  # pass, reject
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    source: Mapped[str] = mapped_column(String(16))  # verdict, deadline (no verdict in time)
    flagged_kinds: Mapped[list[Any]] = mapped_column(default=list)  # model flags: swollen, deformed, anomaly
    swelling_mm: Mapped[float | None] = mapped_column(Float)
    published_at: Mapped[datetime | None]
    review_state: Mapped[str] = mapped_column(String(16), default="none")  # none, pending, confirmed, false_alarm
    received_at: Mapped[datetime]

    lot: Mapped[Lot] = relationship()
    inspections: Mapped[list[Inspection]] = relationship(back_populates="cell_row", order_by="Inspection.camera")


class Inspection(Base):
    """One view's verdict, as the inspection service sent it."""

    __tablename__ = "inspections"
    __table_args__ = (UniqueConstraint("cell_id", "camera", "view"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id"), index=True)
    camera: Mapped[str] = mapped_column(String(64))
    view: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    decision: Mapped[str] = mapped_column(String(8))
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    probs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    anomaly: Mapped[float | None] = mapped_column(Float)
    swelling_mm: Mapped[float | None] = mapped_column(Float)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(200))
    worker: Mapped[str] = mapped_column(String(64))
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    overlay_sha256: Mapped[str | None] = mapped_column(String(64))
    verdict: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the whole FrameVerdict, attachments listed

    cell_row: Mapped[Cell] = relationship(back_populates="inspections")


class Review(Base):
    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id"), index=True)
    user: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # confirmed, false_alarm, skipped
    kinds: Mapped[list[Any]] = mapped_column(default=list)  # defect kinds QA confirms
    note: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime]


class Alarm(Base):
    __tablename__ = "alarms"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)  # spc_rule_1, lot_rejected, no_verdict, ...
    subject: Mapped[str] = mapped_column(String(200))  # product/batch/lot/station it is about
    message: Mapped[str] = mapped_column(Text)
    raised_at: Mapped[datetime]
    acknowledged_by: Mapped[str | None] = mapped_column(String(64))
    acknowledged_at: Mapped[datetime | None]


class AuditEntry(Base):
    """Who did what, when and why. Append-only (database triggers refuse changes)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(64))  # a user, a token's name, or 'controller'
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # operator, qa, admin
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    disabled: Mapped[bool] = mapped_column(default=False)


class ApiToken(Base):
    """A machine's credential (station, worker, MES). Only the SHA-256 of the token is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[list[Any]] = mapped_column(default=list)  # e.g. ["lots:write", "verdicts:read"]
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
