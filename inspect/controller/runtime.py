"""The controller's moving parts, started once in the app's lifespan and stopped with it.

- the database (migrated on start), the image store, the publisher, the `Ledger`;
- the verdict intake: a `VerdictReceiver` on its own thread, storing each cell verdict
  (committed, images fsynced) before acknowledging it;
- the deadline watch: announced cells without a verdict become REJECT ``no_verdict``;
- the retention sweep for audit images.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import zmq

from pouchline.inspect.controller.database import Database
from pouchline.inspect.controller.ledger import Ledger
from pouchline.inspect.controller.publish import Publisher
from pouchline.inspect.controller.settings import ControllerSettings
from pouchline.inspect.controller.store import ImageStore, StoreError
from pouchline.inspect.sinks import VerdictReceiver
from pouchline.inspect.verdicts import CellVerdict

log = logging.getLogger(__name__)

_SWEEP_INTERVAL_S = 3600.0


class Runtime:
    """Everything the API handlers reach through ``app.state.runtime``."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.resolved_database_url())
        self.db.migrate()
        self.store = ImageStore(settings.data_dir / "images")
        self.context = zmq.Context()
        self.publisher = Publisher(settings.publish, settings.webhook, self.context)
        self.ledger = Ledger(self.db, self.store, self.publisher, deadline_s=settings.deadline_s,
                             spc_subgroup=settings.spc_subgroup, spc_rate_subgroup=settings.spc_rate_subgroup)
        self.counts: Counter[str] = Counter()
        self.receiver = VerdictReceiver(settings.verdicts, self._store, self.context)
        self.started = time.time()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._intake, name="verdict-intake", daemon=True),
                         threading.Thread(target=self._watch, name="deadline-watch", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _store(self, verdict: CellVerdict, attachments: list[memoryview]) -> None:
        new = self.ledger.record(verdict, attachments)
        self.counts["verdicts_stored" if new else "verdicts_duplicate"] += 1

    def _intake(self) -> None:
        while not self._stop.is_set():
            try:
                self.receiver.poll(0.1)
            except StoreError as error:  # not acknowledged: the collector sends it again
                self.counts["verdicts_refused"] += 1
                log.error("verdict not stored: %s", error)
            except Exception:  # a database outage must not end the intake; the collector resends
                self.counts["verdicts_failed"] += 1
                log.exception("verdict not stored")
                time.sleep(0.5)

    def _watch(self) -> None:
        next_sweep = 0.0
        while not self._stop.wait(0.05):
            try:
                self.counts["no_verdict_rejects"] += self.ledger.expire()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + _SWEEP_INTERVAL_S
                    self.counts["audit_images_expired"] += self.store.expire(self.settings.audit_retention_days)
            except Exception:
                log.exception("deadline watch failed; retrying")
                time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.receiver.close()
        self.publisher.close()
        self.context.term()
        self.db.close()
