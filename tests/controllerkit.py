"""Real controllers for tests: a uvicorn server on a free port, SQLite or a private PostgreSQL.

`PostgresCluster` runs its own PostgreSQL (Debian's `postgresql` package: initdb into a
temporary directory, as the `postgres` user, on a free port), so tests never touch a
system database and need no setup beyond the package.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import uvicorn
import zmq

from pouchline.inspect.aggregate import CellAggregator, Decided
from pouchline.inspect.controller.app import create_app
from pouchline.inspect.controller.database import Database
from pouchline.inspect.controller.routers.admin import add_user
from pouchline.inspect.controller.settings import ControllerSettings, load_settings
from pouchline.inspect.sinks import ControllerLink
from pouchline.inspect.verdicts import FrameVerdict, attachment

PASSWORD = "correct horse battery"
JPEG = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresCluster:
    """A throwaway PostgreSQL server; `url` is a SQLAlchemy URL to a fresh database."""

    def __init__(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not binaries:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
        self.bin = Path(binaries[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="pouchline-pg-"))
        self.port = free_port()
        os.chmod(self.root, 0o777)
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w",
                          "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self._databases = 0

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=120)

    def new_database(self) -> str:
        self._databases += 1
        name = f"pouchline_{self._databases}"
        self._as_postgres(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Tokens:
    admin: str
    qa: str
    operator: str


def make_settings(data_dir: Path, database_url: str | None = None, **overrides: object) -> ControllerSettings:
    return load_settings(None, data_dir=data_dir, database_url=database_url, http=f"127.0.0.1:{free_port()}",
                         verdicts=f"tcp://127.0.0.1:{free_port()}", publish=f"tcp://127.0.0.1:{free_port()}",
                         **overrides)


def seed_users(settings: ControllerSettings) -> None:
    """An admin, a QA engineer and an operator, all with `PASSWORD`."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url())
    db.migrate()
    with db.session() as session:
        for name, role in (("ada", "admin"), ("quinn", "qa"), ("otto", "operator")):
            add_user(session, name, role, PASSWORD, "test")
    db.close()


class RunningController:
    """The controller app on a real uvicorn server in a thread."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        host, _, port = settings.http.rpartition(":")
        self.base_url = f"http://{settings.http}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=int(port), log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("controller did not start")
            time.sleep(0.05)

    @property
    def runtime(self):  # type: ignore[no-untyped-def]
        return self.app.state.runtime

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def login(self, name: str, password: str = PASSWORD) -> tuple[httpx.Client, str]:
        """A client holding a session cookie, and the session's CSRF token."""
        client = self.client()
        reply = client.post("/api/v1/session", json={"name": name, "password": password})
        reply.raise_for_status()
        return client, reply.json()["csrf"]

    def tokens(self) -> Tokens:
        admin, csrf = self.login("ada")
        made = {}
        for role in ("admin", "qa", "operator"):
            reply = admin.post("/api/v1/tokens", json={"name": f"{role}-token", "role": role},
                               headers={"X-CSRF-Token": csrf})
            reply.raise_for_status()
            made[role] = reply.json()["token"]
        return Tokens(**made)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def cell_verdict(cell: str, *, lot: str = "LOT-1", decision: str = "pass", reasons: list[str] | None = None,
                 swelling: float | None = 0.1, t_capture: float | None = None, image: bool | bytes = False,
                 overlay: bytes | None = None, regions: list | None = None, corners: list | None = None) -> Decided:
    """A one-view cell verdict as the collector makes it; ``image`` True attaches a small JPEG,
    bytes attach those (and ``overlay`` a heat-map layer)."""
    parts = [] if image is False else [JPEG if image is True else image]
    if overlay is not None:
        parts.append(overlay)
    attachments = [attachment("image" if index == 0 else "overlay", "top", data, index) for index, data in enumerate(parts)]
    frame = FrameVerdict(station="st1", camera="top", lot=lot, cell=cell, view="top", views=1,
                         seq=int(cell.rsplit("-", 1)[-1]) if cell[-1].isdigit() else 0,
                         t_capture=t_capture or time.time(), status="ok", decision=decision, reasons=reasons or [],
                         probs={"swollen": 0.9 if "swollen" in (reasons or []) else 0.01}, swelling_mm=swelling,
                         regions=regions or [], cell_corners=corners, worker="w0", attachments=attachments)
    decided = CellAggregator(deadline_s=5).add(frame, parts, time.time())
    assert decided is not None
    return decided


class Line:
    """The inspection side's link to the controller, and the reject gate's subscription."""

    def __init__(self, controller: RunningController) -> None:
        self.context = zmq.Context()
        self.link = ControllerLink(self.context, controller.settings.verdicts, ack_timeout_s=0.5)
        self.gate = self.context.socket(zmq.SUB)
        self.gate.setsockopt(zmq.SUBSCRIBE, b"")
        self.gate.connect(controller.settings.publish)
        time.sleep(0.2)  # the subscription reaches the publisher

    def send(self, *cells: Decided) -> None:
        for decided in cells:
            self.link.send(decided)
        deadline = time.monotonic() + 20
        while self.link.unacked and time.monotonic() < deadline:
            self.link.tick()
            time.sleep(0.02)
        assert not self.link.unacked, "the controller did not acknowledge every verdict"

    def messages(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, dict]]:
        got = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            if self.gate.poll(50):
                topic, body = self.gate.recv_multipart()
                got.append((topic.decode(), json.loads(body)))
        return got

    def close(self) -> None:
        self.link.close()
        self.gate.close(linger=0)
        self.context.term()
