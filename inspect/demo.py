"""`pouchline demo`: a whole line on this machine, in one command.

The line controller (SQLite in the data directory, web UI), inspection workers with the
shipped INT8 model, and N synthetic stations, each a top and a side camera at ~5 cells/s with a
realistic defect rate. Lots are announced as an MES would; after ``drift_after_s`` the supplier
batch changes and its material slowly swells, so the controller's SPC raises an alarm while
the cells are still in spec. Ctrl-C (or ``--duration``) shuts everything down in order:
stations stop and hand over what they hold, workers finish, the collector decides what is
open, the controller stores the last verdicts; no process is left behind.
"""

from __future__ import annotations

import signal
from contextlib import nullcontext
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import func, select

from pouchline.inspect.config import InspectConfig
from pouchline.inspect.controller.app import create_app
from pouchline.inspect.controller.ledger import audit, utcnow
from pouchline.inspect.controller.lotpolicy import LotPolicy
from pouchline.inspect.controller.routers.admin import add_user
from pouchline.inspect.controller.schema import Alarm, Cell, Lot, Product, SupplierBatch, User
from pouchline.inspect.controller.settings import ControllerSettings
from pouchline.inspect.service import InspectService
from pouchline.station.config import StationConfig
from pouchline.station.service import Station

DEMO_USER = "demo"
DEMO_PASSWORD = "pouchline-demo"
PRODUCT = "PL-5000"
STABLE_BATCH, DRIFTING_BATCH = "SB-ACME-0417", "SB-ACME-0418"
_MES = "demo-mes"
_SEED = 100


@dataclass
class DemoOptions:
    data_dir: Path = Path("pouchline-demo")
    stations: int = 2
    cells_per_s: float = 5.0
    defect_rate: float = 0.04
    lot_size: int = 50
    drift_after_s: float = 20.0
    http: str = "127.0.0.1:8300"
    workers: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def drift_after_cells(self) -> int:
        return int(self.drift_after_s * self.cells_per_s)


class Demo:
    """The running line: `start`, `status`, `stop`."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.stations = [Station(self._station_config(index)) for index in range(options.stations)]
        settings = ControllerSettings(
            data_dir=options.data_dir, http=options.http, verdicts="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*",
            stations=[station.status_server.address for station in self.stations if station.status_server],
        )
        self.app = create_app(settings)
        host, _, port = options.http.rpartition(":")
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=int(port), log_level="warning",
                                                    access_log=False))
        self._server_thread = threading.Thread(target=self.server.run, name="controller", daemon=True)
        self._mes_thread = threading.Thread(target=self._mes, name="demo-mes", daemon=True)
        self.inspection: InspectService | None = None
        self.started = time.monotonic()
        self._running: list[Station] = []

    def _station_config(self, index: int) -> StationConfig:
        options = self.options
        source = {"kind": "synthetic", "seed": _SEED + index, "cells_per_s": options.cells_per_s,
                  "defect_rate": options.defect_rate, "views": ["top", "side"], "lot_size": options.lot_size,
                  "drift_after": options.drift_after_cells}
        return StationConfig.model_validate({
            "name": f"demo-st{index + 1}", "bind": "tcp://127.0.0.1:0", "status": "127.0.0.1:0",
            "cameras": [{"name": "cam", "view": "top", "cells": "source", "source": source}],
        })

    # -- start -----------------------------------------------------------------------------

    def start(self) -> Demo:
        self._server_thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self._server_thread.is_alive():
                raise RuntimeError(f"the controller did not start on {self.options.http} (is the port in use?)")
            time.sleep(0.05)
        self._seed()
        self._mes_once()
        runtime = self.app.state.runtime
        config = InspectConfig(
            stations=[station.server.endpoint for station in self.stations], collect="tcp://127.0.0.1:0", http=None,
            controller=runtime.receiver.endpoint, audit_rate=0.05, cell_deadline_s=3.0,
            **({"workers": self.options.workers} if self.options.workers else {}),
        )
        self.inspection = InspectService(config).start()
        assert self.inspection.collector is not None
        deadline = time.monotonic() + 120
        while len(self.inspection.collector.workers) < len(self.inspection.names):
            if time.monotonic() > deadline:
                raise RuntimeError("inspection workers did not come up")
            time.sleep(0.1)
        for station in self.stations:
            self._running.append(station.start())
        self.started = time.monotonic()
        self._mes_thread.start()
        return self

    def _session(self):  # type: ignore[no-untyped-def]
        return self.app.state.runtime.db.session()

    def _seed(self) -> None:
        """The demo user, the product with its lot policy, two supplier batches."""
        with self._session() as session:
            if session.scalar(select(User).where(User.name == DEMO_USER)) is None:
                add_user(session, DEMO_USER, "admin", DEMO_PASSWORD, _MES)
            product = session.scalar(select(Product).where(Product.name == PRODUCT))
            if product is None:
                policy = LotPolicy(kind="threshold", reject_rate_pct=12.0, hold_rate_pct=8.0, max_swelling_mm=2.0)
                product = Product(name=PRODUCT, spec={"length_mm": 80.0, "width_mm": 50.0, "thickness_mm": 5.0},
                                  policy=policy.model_dump())
                session.add(product)
                session.flush()
                audit(session, _MES, "product_saved", PRODUCT)
            for code in (STABLE_BATCH, DRIFTING_BATCH):
                if session.scalar(select(SupplierBatch).where(SupplierBatch.code == code)) is None:
                    session.add(SupplierBatch(code=code, supplier="ACME Cells", product_id=product.id))

    def _mes(self) -> None:
        while not self.options.stop.wait(1.0):
            self._mes_once()

    def _mes_once(self) -> None:
        """Announce the lots the stations will fill next, as the MES would, with their supplier batch."""
        options = self.options
        produced = max(0.0, time.monotonic() - self.started) * options.cells_per_s
        with self._session() as session:
            product = session.scalar(select(Product).where(Product.name == PRODUCT))
            batches = {b.code: b.id for b in session.scalars(select(SupplierBatch))}
            assert product is not None
            for index in range(options.stations):
                first = int(produced // options.lot_size)
                for lot_index in range(max(0, first - 1), first + 3):
                    code = f"s{_SEED + index}-lot{lot_index:04d}"
                    if session.scalar(select(Lot).where(Lot.code == code)) is not None:
                        continue
                    drifting = (lot_index + 1) * options.lot_size > options.drift_after_cells
                    session.add(Lot(code=code, product_id=product.id, expected_quantity=options.lot_size,
                                    supplier_batch_id=batches[DRIFTING_BATCH if drifting else STABLE_BATCH],
                                    created_at=utcnow()))
                    audit(session, _MES, "lot_created", code, batch=DRIFTING_BATCH if drifting else STABLE_BATCH)

    # -- report ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Cells, rejects, lots by disposition, alarms by kind, capture-to-decision latency."""
        with self._session() as session:
            decisions = dict(session.execute(select(Cell.decision, func.count()).group_by(Cell.decision)).all())
            # A lot is counted by its disposition once it has one: a reject can be final while the
            # lot is still open (too many rejects already); "open" are the lots still undecided.
            lots = dict(session.execute(select(Lot.disposition, func.count()).group_by(Lot.disposition)).all())
            open_lots = lots.get("pending", 0)
            alarms = dict(session.execute(select(Alarm.kind, func.count()).group_by(Alarm.kind)).all())
            rows = session.execute(select(Cell.t_capture, Cell.published_at).where(
                Cell.source == "verdict", Cell.published_at.is_not(None)).order_by(Cell.id.desc()).limit(2000)).all()
        latency = [(_aware(p) - _aware(t)).total_seconds() * 1000 for t, p in rows]
        sent = sum(station.server.stats().get("sent", 0) for station in self.stations)
        return {
            "elapsed_s": round(time.monotonic() - self.started, 1), "frames_sent": sent,
            "cells": sum(decisions.values()), "passed": decisions.get("pass", 0), "rejected": decisions.get("reject", 0),
            "pending": decisions.get("pending", 0), "lots": {"accept": lots.get("accept", 0), "reject": lots.get("reject", 0),
                                                            "hold": lots.get("hold", 0), "open": open_lots},
            "alarms": alarms, "spc_alarm": any(kind.startswith("spc_") for kind in alarms),
            "p50_latency_ms": round(float(np.percentile(latency, 50)), 1) if latency else None,
            "p99_latency_ms": round(float(np.percentile(latency, 99)), 1) if latency else None,
        }

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> dict[str, Any]:
        """In order: stations, workers and collector, the controller's last verdicts, the server."""
        self.options.stop.set()
        for station in self._running:
            station.stop()
        if self.inspection is not None:
            self.inspection.stop()
        time.sleep(0.5)  # the last acknowledged verdicts are stored; announced-but-unjudged cells expire
        final = self.status()
        self.server.should_exit = True
        self._server_thread.join(30)
        for station in self.stations:
            if station not in self._running:
                station.server.close(grace_s=0)  # built but never started: its sockets still close
        return final


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _table(status: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 1))
    lots = status["lots"]
    spc = ", ".join(f"{k} {v}" for k, v in status["alarms"].items()) or "none"
    for label, value in (
        ("running", f"{status['elapsed_s']:.0f} s, {status['frames_sent']} frames sent"),
        ("cells", f"{status['cells']} ({status['passed']} pass, {status['rejected']} reject, {status['pending']} pending)"),
        ("lots", f"{lots['accept']} accepted, {lots['reject']} rejected, {lots['hold']} on hold, {lots['open']} open"),
        ("alarms", spc),
        ("latency", f"p50 {status['p50_latency_ms']} ms, p99 {status['p99_latency_ms']} ms (capture to decision)"),
    ):
        table.add_row(f"[bold]{label}[/bold]", value)
    return table


def fresh_run_dir(parent: Path) -> Path:
    """A new directory under ``parent`` for one run's database and images.

    The demo's stations are seeded, so every run makes the same cell ids: in a database that
    already held them the controller would take the new verdicts for redeliveries of the old
    ones, record nothing new and the summary would report an earlier run. Earlier runs stay
    where they are."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp, attempt = time.strftime("run-%Y%m%dT%H%M%S"), 0
    while True:
        path = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:  # a run started in the same second
            attempt += 1


def run(options: DemoOptions, duration_s: float | None, console: Console) -> dict[str, Any]:
    """Start the line in a fresh run directory under ``options.data_dir``, show its status until
    Ctrl-C/SIGTERM or ``duration_s``, stop it, return the summary (with the run directory)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: options.stop.set())
    options = replace(options, data_dir=fresh_run_dir(options.data_dir))
    console.print(f"starting the demo line in {options.data_dir} (controller, inspection workers, "
                  f"{options.stations} stations) ...")
    demo = Demo(options)
    try:
        demo.start()
        console.print(f"[bold]open http://{options.http}/[/bold]  user [bold]{DEMO_USER}[/bold]  password "
                      f"[bold]{DEMO_PASSWORD}[/bold]   (Ctrl-C stops everything)")
        console.print(f"the supplier batch changes to {DRIFTING_BATCH} after {options.drift_after_s:.0f} s; its "
                      "material drifts until SPC raises an alarm")
        end = None if duration_s is None else time.monotonic() + duration_s
        live = Live(_table(demo.status()), console=console, refresh_per_second=2) if console.is_terminal else nullcontext()
        with live:
            while not options.stop.wait(1.0):
                if isinstance(live, Live):
                    live.update(_table(demo.status()))
                if end is not None and time.monotonic() >= end:
                    break
    finally:
        console.print("stopping: stations, workers, controller ...")
        summary = demo.stop()
    console.print(_table(summary))
    return {**summary, "data_dir": str(options.data_dir)}
