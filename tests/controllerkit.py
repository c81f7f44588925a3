"""Real controllers for tests: a uvicorn server on a free port, SQLite or a private PostgreSQL.

`PostgresCluster` runs its own PostgreSQL (Debian's `postgresql` package: initdb into a
temporary directory, as the `postgres` user, on a free port), so tests never touch a
system database and need no setup beyond the package.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from pouchline.inspect.controller.app import create_app
from pouchline.inspect.controller.database import Database
from pouchline.inspect.controller.routers.admin import add_user
from pouchline.inspect.controller.settings import ControllerSettings, load_settings

PASSWORD = "correct horse battery"


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
