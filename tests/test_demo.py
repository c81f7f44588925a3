"""`pouchline demo --duration 60` from a clean data directory: a whole line, checked from its
database, its API and the process table."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from controllerkit import free_port  # noqa: E402

from pouchline.inspect.demo import DEMO_PASSWORD, DEMO_USER, DRIFTING_BATCH  # noqa: E402


def _processes() -> dict[tuple[int, str], int]:
    """(pid, start time) -> parent pid, from /proc (the start time tells a reused pid apart)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[(int(stat.parent.name), fields[19])] = int(fields[1])
    return found


def _children(parent: int) -> set[tuple[int, str]]:
    return {process for process, ppid in _processes().items() if ppid == parent}


def test_demo_runs_a_whole_line_and_leaves_nothing_behind(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    http = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-c", "from pouchline.inspect.cli import main; main()", "demo", "--data-dir", str(data),
               "--duration", "60", "--http", http, "--json", str(tmp_path / "summary.json")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "120"})
    children: set[tuple[int, str]] = set()
    decided_via_api = None
    try:
        deadline = time.monotonic() + 200
        client = httpx.Client(base_url=f"http://{http}", timeout=5)
        while process.poll() is None and time.monotonic() < deadline:
            children |= _children(process.pid)
            if decided_via_api is None:
                try:
                    if client.post("/api/v1/session", json={"name": DEMO_USER, "password": DEMO_PASSWORD}).status_code == 200:
                        lots = client.get("/api/v1/lots", params={"state": "closed"}).json()["items"]
                        if any(lot["disposition"] in ("accept", "reject") for lot in lots):
                            decided_via_api = lots
                except httpx.HTTPError:
                    pass
            time.sleep(1.0)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"http://{http}/" in output and DEMO_USER in output and DEMO_PASSWORD in output
    assert decided_via_api, "no lot was decided while the demo ran (seen through the API)"
    assert children, "the demo started no worker processes"
    deadline = time.monotonic() + 5  # helpers such as multiprocessing's resource tracker exit right after
    while (left := children & set(_processes())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert Path(summary["data_dir"]).parent == data
    database = sqlite3.connect(Path(summary["data_dir"]) / "controller.db")
    cells = dict(database.execute("SELECT decision, count(*) FROM cells GROUP BY decision").fetchall())
    assert cells.get("pending", 0) == 0, cells  # every produced cell has a disposition
    assert sum(cells.values()) == summary["cells"] >= 200  # two stations at 5 cells/s for 60 s
    assert cells.get("reject", 0) > 0 and cells.get("pass", 0) > cells.get("reject", 0)
    halves = database.execute("SELECT decision, reasons FROM cells c WHERE (SELECT count(*) FROM inspections i "
                              "WHERE i.cell_id = c.id) != 2").fetchall()
    # a top and a side view per cell; a station stopped between the two views of a cell rejects it
    assert len(halves) <= 2 and all(d == "reject" and "missing_view" in r for d, r in halves), halves
    decided = database.execute("SELECT count(*) FROM lots WHERE state = 'closed' AND disposition IN "
                               "('accept', 'reject', 'hold')").fetchone()[0]
    assert decided >= 2
    # every lot is in the summary once: by its disposition, or open while it has none
    assert sum(summary["lots"].values()) == database.execute("SELECT count(*) FROM lots").fetchone()[0]
    alarms = database.execute("SELECT kind, subject FROM alarms WHERE kind LIKE 'spc_%'").fetchall()
    assert any(subject.endswith(DRIFTING_BATCH) for _, subject in alarms), alarms  # the drift was caught
    assert summary["spc_alarm"] and summary["p99_latency_ms"] is not None
    assert database.execute("PRAGMA integrity_check").fetchone()[0] == "ok"  # a clean shutdown, no corrupt database


def test_ctrl_c_stops_the_demo_cleanly(tmp_path: Path) -> None:
    http = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-c", "from pouchline.inspect.cli import main; main()", "demo", "--data-dir",
               str(tmp_path / "demo"), "--http", http, "--stations", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            children |= _children(process.pid)
            try:
                if httpx.get(f"http://{http}/readyz", timeout=1).status_code == 200 and len(children) >= 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        time.sleep(3)  # a few cells go through
        children |= _children(process.pid)
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "stopping: stations, workers, controller" in output
    deadline = time.monotonic() + 5
    while (left := children & set(_processes())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"
    (run_dir,) = (tmp_path / "demo").iterdir()  # the run's own directory
    database = sqlite3.connect(run_dir / "controller.db")
    assert database.execute("SELECT count(*) FROM cells").fetchone()[0] > 0
    assert database.execute("SELECT count(*) FROM cells WHERE decision = 'pending'").fetchone()[0] == 0


def test_a_second_run_in_the_same_data_dir_reports_its_own_cells(tmp_path: Path) -> None:
    """The stations are seeded, so runs repeat cell ids: each run gets its own database, and its
    summary counts what it decided, not what an earlier run left behind."""
    data, summaries = tmp_path / "demo", []
    for run in range(2):
        command = [sys.executable, "-c", "from pouchline.inspect.cli import main; main()", "demo", "--data-dir", str(data),
                   "--duration", "8", "--stations", "1", "--http", f"127.0.0.1:{free_port()}",
                   "--json", str(tmp_path / f"summary{run}.json")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        summaries.append(json.loads((tmp_path / f"summary{run}.json").read_text()))
    first, second = (Path(summary["data_dir"]) for summary in summaries)
    assert first != second and first.parent == second.parent == data
    for summary, run_dir in zip(summaries, (first, second), strict=True):
        database = sqlite3.connect(run_dir / "controller.db")
        recorded = database.execute("SELECT count(*), min(received_at) FROM cells").fetchone()
        assert summary["cells"] == recorded[0] > 0
    started = sqlite3.connect(second / "controller.db").execute("SELECT min(received_at) FROM cells").fetchone()[0]
    ended = sqlite3.connect(first / "controller.db").execute("SELECT max(received_at) FROM cells").fetchone()[0]
    assert started > ended, "the second run's cells are its own"
