"""The line controller on a real uvicorn server, over a real SQLite file and a real PostgreSQL.

Verdicts arrive over real ZeroMQ sockets from the inspection service's own `ControllerLink`;
decisions are read from a real SUB socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy
import zmq

sys.path.insert(0, str(Path(__file__).parent))
from controllerkit import (  # noqa: E402
    JPEG,
    PASSWORD,
    Line,
    PostgresCluster,
    RunningController,
    Tokens,
    cell_verdict,
    free_port,
    make_settings,
    seed_users,
)

from pouchline.inspect.controller.database import Database  # noqa: E402
from pouchline.inspect.sinks import ControllerLink  # noqa: E402



@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def controller(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningController]:
    url = request.getfixturevalue("postgres").new_database() if request.param == "postgres" else None
    settings = make_settings(tmp_path / "data", url, deadline_s=3.0)
    seed_users(settings)
    running = RunningController(settings)
    yield running
    running.stop()


@pytest.fixture
def tokens(controller: RunningController) -> Tokens:
    return controller.tokens()


@pytest.fixture
def line(controller: RunningController) -> Iterator[Line]:
    connected = Line(controller)
    yield connected
    connected.close()


def create_product_and_lot(controller: RunningController, tokens: Tokens, lot: str, quantity: int,
                           policy: dict | None = None) -> None:
    admin, qa = controller.client(tokens.admin), controller.client(tokens.qa)
    product = {"name": "PL-5000", "spec": {"thickness_mm": 5.0}, "policy": policy or {"kind": "threshold",
               "reject_rate_pct": 10.0, "hold_rate_pct": 5.0, "max_swelling_mm": 1.5}}
    assert admin.put("/api/v1/products/PL-5000", json=product).status_code == 200
    assert admin.post("/api/v1/supplier-batches", json={"code": "SB-7", "supplier": "Acme", "product": "PL-5000"}
                      ).status_code in (201, 409)
    reply = qa.post("/api/v1/lots", json={"code": lot, "product": "PL-5000", "supplier_batch": "SB-7",
                                          "expected_quantity": quantity})
    assert reply.status_code == 201, reply.text


# -- storage ------------------------------------------------------------------------------------


def test_migrations_give_wal_and_an_append_only_audit_log(controller: RunningController) -> None:
    engine = controller.runtime.db.engine
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("SELECT count(*) FROM audit_log").scalar() >= 3  # the seeded users
    for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"), engine.begin() as connection:
            connection.exec_driver_sql(statement)


# -- verdicts in, decisions out ------------------------------------------------------------------


def test_verdicts_are_stored_once_published_and_their_images_served(controller: RunningController, tokens: Tokens,
                                                                   line: Line) -> None:
    create_product_and_lot(controller, tokens, "LOT-1", 10)
    good, bad = cell_verdict("c-1"), cell_verdict("c-2", decision="reject", reasons=["swollen"], swelling=0.8,
                                                   image=True)
    line.send(good, bad)
    line.send(bad)  # a redelivery after a lost ack: recognised, not stored twice
    published = line.messages(2)
    assert [(t, m["cell"], m["decision"]) for t, m in published] == [("cell.st1", "c-1", "PASS"),
                                                                     ("cell.st1", "c-2", "REJECT")]
    operator = controller.client(tokens.operator)
    cells = operator.get("/api/v1/cells", params={"lot": "LOT-1"}).json()
    assert cells["total"] == 2
    detail = operator.get("/api/v1/cells/st1/LOT-1/c-2").json()
    assert detail["decision"] == "reject" and detail["flags"] == ["swollen"] and detail["review_state"] == "pending"
    image_id = detail["inspections"][0]["image"]
    image = operator.get(f"/api/v1/images/{image_id}")
    assert image.status_code == 200 and image.content == JPEG and image.headers["content-type"] == "image/jpeg"
    for probe in ("..%2F..%2Fsecret.key", "../../secret.key", "0" * 64, "%2Fetc%2Fpasswd"):
        assert operator.get(f"/api/v1/images/{probe}").status_code == 404
    assert controller.runtime.counts["verdicts_stored"] == 2 and controller.runtime.counts["verdicts_duplicate"] >= 1
    flagged = operator.get("/api/v1/cells", params={"flag": "swollen"}).json()
    assert [c["cell"] for c in flagged["items"]] == ["c-2"]


def test_no_verdict_by_the_deadline_rejects_and_a_late_verdict_does_not_pass_it(
        controller: RunningController, tokens: Tokens, line: Line) -> None:
    qa = controller.client(tokens.qa)
    reply = qa.post("/api/v1/cells/expected", json={"station": "st1", "lot": "LOT-9", "cell": "c-5",
                                                    "t_capture": time.time()})
    assert reply.status_code == 202 and reply.json()["decision"] == "pending"
    (topic, message), = line.messages(1, timeout_s=8)  # after deadline_s = 3
    assert message["cell"] == "c-5" and message["decision"] == "REJECT" and message["reasons"] == ["no_verdict"]
    line.send(cell_verdict("c-5", lot="LOT-9"))  # the verdict comes too late: a pass, but the gate was told REJECT
    stale = cell_verdict("c-6", lot="LOT-9", t_capture=time.time() - 10)  # never announced and already late
    line.send(stale)
    late = line.messages(1, timeout_s=3)
    assert [(m["cell"], m["decision"], m["reasons"]) for _, m in late] == [("c-6", "REJECT", ["no_verdict"])]
    cell = controller.client(tokens.operator).get("/api/v1/cells/st1/LOT-9/c-5").json()
    assert cell["decision"] == "reject" and cell["reasons"] == ["no_verdict", "late_verdict"]
    assert len(cell["inspections"]) == 1  # the late verdict is kept
    alarms = controller.client(tokens.operator).get("/api/v1/alarms", params={"kind": "no_verdict"}).json()
    assert alarms["total"] == 1
    told = controller.client(tokens.operator).get("/api/v1/dispositions", params={"source": "deadline"}).json()
    assert sorted(d["cell"] for d in told["items"]) == ["st1/LOT-9/c-5", "st1/LOT-9/c-6"]
    verdicts = controller.client(tokens.operator).get("/api/v1/verdicts", params={"station": "st1"}).json()
    assert verdicts["total"] == 2 and {v["cell"] for v in verdicts["items"]} == {"st1/LOT-9/c-5", "st1/LOT-9/c-6"}


def test_a_lot_over_its_reject_rate_is_rejected_and_qa_overrides_with_a_reason(
        controller: RunningController, tokens: Tokens, line: Line) -> None:
    create_product_and_lot(controller, tokens, "LOT-2", 20)
    line.send(*[cell_verdict(f"c-{i}", lot="LOT-2", decision="reject" if i < 3 else "pass",
                             reasons=["deformed"] if i < 3 else []) for i in range(20)])
    lot_messages = [m for t, m in line.messages(23) if t == "lot.LOT-2"]
    assert [m["disposition"] for m in lot_messages] == ["REJECT"]  # 3 of 20 > 10 %, decided at the third
    operator, qa = controller.client(tokens.operator), controller.client(tokens.qa)
    lot = operator.get("/api/v1/lots/LOT-2").json()
    assert lot["disposition"] == "reject" and lot["state"] == "closed" and lot["cells"] == 20 and lot["rejected"] == 3
    assert operator.post("/api/v1/lots/LOT-2/override", json={"disposition": "accept", "reason": "rework"}
                         ).status_code == 403
    assert qa.post("/api/v1/lots/LOT-2/override", json={"disposition": "accept", "reason": ""}).status_code == 422
    reply = qa.post("/api/v1/lots/LOT-2/override", json={"disposition": "accept",
                                                         "reason": "defects were a camera fault, re-inspected by hand"})
    assert reply.status_code == 200 and reply.json()["disposition"] == "accept"
    audit = operator.get("/api/v1/audit", params={"subject": "LOT-2"}).json()["items"]
    actions = [entry["action"] for entry in audit]
    assert actions[:2] == ["lot_override", "lot_closed"] and {"lot_reject", "alarm", "lot_created"} <= set(actions)
    assert audit[0]["actor"] == "qa-token" and "camera fault" in audit[0]["reason"]
    assert audit[0]["detail"] == {"before": "reject", "after": "accept"}
    csv_text = operator.get("/api/v1/lots/LOT-2/cells.csv").text.splitlines()
    assert csv_text[0].startswith("cell,station") and len(csv_text) == 21


def test_hold_while_flagged_cells_await_review_then_accept(controller: RunningController, tokens: Tokens,
                                                          line: Line) -> None:
    create_product_and_lot(controller, tokens, "LOT-3", 10, {"kind": "threshold", "reject_rate_pct": 20,
                                                             "hold_rate_pct": 15, "review_flagged": True})
    line.send(*[cell_verdict(f"c-{i}", lot="LOT-3", decision="reject" if i == 4 else "pass",
                             reasons=["swollen"] if i == 4 else []) for i in range(10)])
    operator, qa = controller.client(tokens.operator), controller.client(tokens.qa)
    assert operator.get("/api/v1/lots/LOT-3").json()["disposition"] == "hold"
    queue = operator.get("/api/v1/reviews/queue", params={"lot": "LOT-3"}).json()
    assert [c["cell"] for c in queue["items"]] == ["c-4"]
    reply = qa.post("/api/v1/cells/st1/LOT-3/c-4/review", json={"outcome": "confirmed", "kinds": ["swollen"]})
    assert reply.status_code == 200 and reply.json()["review_state"] == "confirmed"
    lot = operator.get("/api/v1/lots/LOT-3").json()
    assert lot["disposition"] == "accept", lot  # 1 of 10 rejected: under the 15 % hold line, nothing left to review
    assert ("lot.LOT-3", "ACCEPT") in [(t, m.get("disposition")) for t, m in line.messages(12)]


def test_an_iso_2859_sampling_plan_decides_the_lot(controller: RunningController, tokens: Tokens, line: Line) -> None:
    # 1,500 cells at level II is code K: n = 125; at AQL 0.65, Ac 2 / Re 3
    create_product_and_lot(controller, tokens, "LOT-4", 1500, {"kind": "sampling", "aql": 0.65, "level": "II",
                                                               "max_swelling_mm": None})
    for start in range(0, 125, 25):  # made as they are sent: each verdict well inside its deadline
        line.send(*[cell_verdict(f"c-{i}", lot="LOT-4", decision="reject" if i in (3, 50) else "pass",
                                 reasons=["swollen"] if i in (3, 50) else []) for i in range(start, start + 25)])
    lot = controller.client(tokens.operator).get("/api/v1/lots/LOT-4").json()
    assert lot["disposition"] == "accept" and "n=125" in lot["disposition_reason"] and "Ac=2" in lot["disposition_reason"], lot["disposition_reason"]


# -- security -------------------------------------------------------------------------------------


def test_authentication_roles_and_csrf(controller: RunningController, tokens: Tokens) -> None:
    anonymous = controller.client()
    assert anonymous.get("/api/v1/lots").status_code == 401
    assert controller.client("plt_not-a-token").get("/api/v1/lots").status_code == 401
    assert anonymous.get("/healthz").status_code == 200
    operator = controller.client(tokens.operator)
    assert operator.get("/api/v1/lots").status_code == 200
    assert operator.post("/api/v1/supplier-batches", json={"code": "X", "supplier": "Y", "product": "Z"}
                         ).status_code == 403
    assert controller.client(tokens.qa).get("/api/v1/users").status_code == 403
    session, csrf = controller.login("ada")
    body = {"name": "PL-1", "spec": {}, "policy": {"kind": "threshold"}}
    assert session.put("/api/v1/products/PL-1", json=body).status_code == 403  # cookie without CSRF token
    assert session.put("/api/v1/products/PL-1", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert session.put("/api/v1/products/PL-1", json=body, headers={"X-CSRF-Token": csrf}).status_code == 200
    cookie = session.cookies.jar
    assert any(c.has_nonstandard_attr("HttpOnly") for c in cookie)
    bad = {"name": "PL-1", "spec": {}, "policy": {"kind": "threshold", "reject_rate_pct": 1, "hold_rate_pct": 5}}
    reply = session.put("/api/v1/products/PL-1", json=bad, headers={"X-CSRF-Token": csrf})
    assert reply.status_code == 422 and "hold_rate_pct" in reply.text
    reply = session.put("/api/v1/products/PL-1", json={**body, "polcy": {}}, headers={"X-CSRF-Token": csrf})
    assert reply.status_code == 422 and "polcy" in reply.text


def test_login_failures_are_rate_limited(controller: RunningController) -> None:
    client = controller.client()
    codes = [client.post("/api/v1/session", json={"name": "otto", "password": "wrong password"}).status_code
             for _ in range(controller.settings.login_attempts_per_minute + 1)]
    assert codes[:-1] == [401] * controller.settings.login_attempts_per_minute and codes[-1] == 429
    assert client.post("/api/v1/session", json={"name": "otto", "password": PASSWORD}).status_code == 429
    assert controller.client().post("/api/v1/session", json={"name": "quinn", "password": PASSWORD}).status_code == 200


def test_health_readiness_metrics(controller: RunningController, tokens: Tokens, line: Line) -> None:
    line.send(cell_verdict("c-1", lot="LOT-M"))
    client = controller.client()
    assert client.get("/readyz").json()["status"] == "ready"
    metrics = client.get("/metrics").text
    assert 'pouchline_controller_cells{decision="pass"} 1' in metrics
    assert 'pouchline_controller_events_total{event="verdicts_stored"} 1' in metrics
    alarms = controller.client(tokens.operator).get("/api/v1/alarms", params={"kind": "unknown_lot"}).json()
    assert alarms["items"][0]["subject"] == "LOT-M"  # verdicts for a lot nobody created: filed and flagged


# -- a crash mid-lot ---------------------------------------------------------------------------------


def test_controller_killed_mid_lot_loses_no_acknowledged_verdict(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", deadline_s=30.0)
    seed_users(settings)
    command = [sys.executable, "-c", "from pouchline.inspect.cli import main; main()", "controller", "run",
               "--data-dir", str(settings.data_dir)]
    env = {**os.environ, "POUCHLINE_CONTROLLER_HTTP": settings.http, "POUCHLINE_CONTROLLER_VERDICTS": settings.verdicts,
           "POUCHLINE_CONTROLLER_PUBLISH": settings.publish, "POUCHLINE_CONTROLLER_DEADLINE_S": "30"}

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{settings.http}/readyz", timeout=1).status_code == 200:
                    return process
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(process.stderr.read().decode() if process.stderr else "no start")

    context = zmq.Context()
    link = ControllerLink(context, settings.verdicts, ack_timeout_s=0.3)
    acked: set[str] = set()
    process = start()
    try:
        for index in range(200):
            link.send(cell_verdict(f"c-{index}", lot="LOT-K"))
            link.tick()
            if index == 100:
                process.send_signal(signal.SIGKILL)  # mid-lot, mid-stream
                process.wait()
                process = start()
            acked = {f"st1/LOT-K/c-{i}" for i in range(index + 1)} - set(link.unacked)
        deadline = time.monotonic() + 30
        while link.unacked and time.monotonic() < deadline:
            link.tick()
            time.sleep(0.05)
        assert not link.unacked
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        link.close()
        context.term()
    db = Database(settings.resolved_database_url())
    with db.engine.connect() as connection:
        keys = {row[0] for row in connection.exec_driver_sql("SELECT key FROM cells")}
    db.close()
    assert acked <= keys and len(keys) == 200  # every acknowledged verdict survived, and the lot went on


def test_a_drifting_supplier_batch_raises_an_spc_alarm_before_cells_fail(controller: RunningController,
                                                                          tokens: Tokens, line: Line) -> None:
    admin, qa = controller.client(tokens.admin), controller.client(tokens.qa)
    create_product_and_lot(controller, tokens, "LOT-A", 100)  # baseline: batch SB-7, in control
    assert admin.post("/api/v1/supplier-batches", json={"code": "SB-8", "supplier": "Acme", "product": "PL-5000"}
                      ).status_code == 201
    assert qa.post("/api/v1/lots", json={"code": "LOT-B", "product": "PL-5000", "supplier_batch": "SB-8",
                                         "expected_quantity": 200}).status_code == 201
    rng = np.random.default_rng(4)
    for start in range(0, 100, 25):
        line.send(*[cell_verdict(f"a-{i}", lot="LOT-A", swelling=float(0.10 + rng.normal(0, 0.02)))
                    for i in range(start, start + 25)])
    operator = controller.client(tokens.operator)
    assert operator.get("/api/v1/alarms", params={"kind": "spc_xbar_rule_1"}).json()["total"] == 0
    drift = [0.10 + 0.004 * i + float(rng.normal(0, 0.02)) for i in range(100)]  # the new material creeps up
    first_alarm = None
    for start in range(0, 100, 5):
        line.send(*[cell_verdict(f"b-{start + i}", lot="LOT-B", swelling=drift[start + i]) for i in range(5)])
        spc_alarms = [a for a in operator.get("/api/v1/alarms").json()["items"] if a["kind"].startswith("spc_xbar")]
        if spc_alarms:
            first_alarm = start + 5
            break
    assert first_alarm is not None, "the drift was never flagged"
    assert max(drift[:first_alarm]) < 1.0  # flagged while every cell was still far inside the 1.5 mm lot limit
    assert spc_alarms[-1]["subject"] == "PL-5000/SB-8"
    charts = operator.get("/api/v1/spc", params={"product": "PL-5000", "batch": "SB-8"}).json()["charts"]
    assert charts["xbar"]["violations"] and len(charts["xbar"]["points"]) == first_alarm // 5
    assert operator.get("/api/v1/spc", params={"product": "nope"}).status_code == 404


def test_the_openapi_spec_survives_schemathesis_without_a_server_error(controller: RunningController,
                                                                        tokens: Tokens) -> None:
    schemathesis = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    result = subprocess.run([schemathesis, "run", f"{controller.base_url}/openapi.json", "--checks", "not_a_server_error",
                             "-H", f"Authorization: Bearer {tokens.admin}", "--max-examples", "30", "--seed", "1",
                             "--exclude-path", "/api/v1/stream"],  # an endless event stream by design
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "generated" in result.stdout and " passed" in result.stdout


def test_the_models_and_the_migrations_describe_the_same_schema(controller: RunningController) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from pouchline.inspect.controller.schema import Base

    with controller.runtime.db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_read_only_tokens_and_lines(controller: RunningController, tokens: Tokens) -> None:
    admin = controller.client(tokens.admin)
    reply = admin.post("/api/v1/tokens", json={"name": "mes-reader", "role": "admin", "scopes": ["read"]})
    assert reply.status_code == 201
    reader = controller.client(reply.json()["token"])
    assert reader.get("/api/v1/users").status_code == 200
    refused = reader.put("/api/v1/lines/L1", json={"name": "L1", "stations": ["st1"]})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert admin.put("/api/v1/lines/L1", json={"name": "L1", "stations": ["st1", "st2"]}).status_code == 200
    assert reader.get("/api/v1/lines").json() == [{"name": "L1", "stations": ["st1", "st2"]}]
    with controller.runtime.db.engine.connect() as connection:
        stored = {row[0] for row in connection.exec_driver_sql("SELECT token_sha256 FROM api_tokens")}
    assert tokens.admin not in stored and all(len(value) == 64 for value in stored)  # only hashes at rest


def test_dispositions_reach_a_webhook_and_the_dashboard_sees_inspection_services(tmp_path: Path) -> None:
    import http.server
    import threading

    posted: list[tuple[str, dict]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posted.append((self.headers["X-Pouchline-Topic"], json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    from pouchline.inspect.config import InspectConfig
    from pouchline.inspect.service import InspectService

    inspection = InspectService(InspectConfig(stations=["tcp://127.0.0.1:9"], collect="tcp://127.0.0.1:0", workers=1,
                                              http=f"127.0.0.1:{free_port()}")).start()
    assert inspection.http is not None
    settings = make_settings(tmp_path / "data", webhook=f"http://127.0.0.1:{hook.server_address[1]}/line",
                             inspection=[inspection.http.address, "127.0.0.1:9"])
    seed_users(settings)
    controller = RunningController(settings)
    line = Line(controller)
    try:
        line.send(cell_verdict("c-1", lot="LOT-W", decision="reject", reasons=["swollen"]))
        deadline = time.monotonic() + 10
        while not posted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert posted[0][0] == "cell.st1" and posted[0][1]["decision"] == "REJECT" and posted[0][1]["cell"] == "c-1"
        operator = controller.client(controller.tokens().operator)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            services = operator.get("/api/v1/summary").json()["services"]
            if services[0].get("workers_alive") == 1:
                break
            time.sleep(0.2)
        assert services[0] == {"address": inspection.http.address, "reachable": True, "workers": 1, "workers_alive": 1,
                               "restarts": 0, "cells_per_s": 0.0}
        assert services[1]["reachable"] is False
    finally:
        line.close()
        controller.stop()
        inspection.stop()
        hook.shutdown()


def test_retention_expires_audit_images_and_keeps_flagged_ones(tmp_path: Path) -> None:
    import hashlib

    from pouchline.inspect.controller.store import ImageStore, StoreError

    store = ImageStore(tmp_path)
    old, kept = JPEG, JPEG + b"\x00"
    for data, shelf in ((old, "audit"), (kept, "keep")):
        store.put(data, hashlib.sha256(data).hexdigest(), "image/jpeg", shelf)
    now = time.time() + 31 * 86400
    assert store.expire(30, now=now) == 1
    assert store.find(hashlib.sha256(old).hexdigest()) is None and store.find(hashlib.sha256(kept).hexdigest())
    with pytest.raises(StoreError, match="do not match"):
        store.put(b"forged", hashlib.sha256(b"other").hexdigest(), "image/jpeg", "keep")
    with pytest.raises(StoreError, match="not an image id"):
        store.find("../../etc/passwd")
    promoted = store.put(kept + b"1", hashlib.sha256(kept + b"1").hexdigest(), "image/jpeg", "audit")
    assert promoted.parent.parent.name == "audit"
    again = store.put(kept + b"1", hashlib.sha256(kept + b"1").hexdigest(), "image/jpeg", "keep")
    assert again.parent.parent.name == "keep" and not promoted.exists()  # flagged later: kept for good


def test_reviewed_cells_export_as_an_importable_dataset(controller: RunningController, tokens: Tokens, line: Line,
                                                        tmp_path: Path) -> None:
    import io
    import zipfile

    from pouchline.datasets.synth import SynthConfig, render_cell

    frames = [render_cell(SynthConfig(count=2, seed=3, views=("top",), size=(320, 240)), i)[0]["image_bytes"]
              for i in range(2)]
    line.send(cell_verdict("c-1", lot="LOT-R", decision="reject", reasons=["swollen"], image=frames[0]),
              cell_verdict("c-2", lot="LOT-R", decision="reject", reasons=["deformed", "anomaly"], image=frames[1]))
    qa = controller.client(tokens.qa)
    assert qa.post("/api/v1/cells/st1/LOT-R/c-1/review", json={"outcome": "confirmed", "kinds": ["swollen"]}
                   ).status_code == 200
    assert qa.post("/api/v1/cells/st1/LOT-R/c-2/review", json={"outcome": "false_alarm"}).status_code == 200
    archive = controller.client(tokens.operator).get("/api/v1/reviews/export.zip", params={"lot": "LOT-R"})
    assert archive.status_code == 200
    zipfile.ZipFile(io.BytesIO(archive.content)).extractall(tmp_path / "reviewed")
    labels = (tmp_path / "reviewed" / "labels.csv").read_text().splitlines()
    assert len(labels) == 3 and labels[1].split(",")[1] == "swollen" and labels[2].split(",")[1] == "ok"
    command = [sys.executable, "-c", "from pouchline.inspect.cli import main; main()", "dataset", "import",
               str(tmp_path / "reviewed" / "labels.csv"), "--out", str(tmp_path / "dataset")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    check = subprocess.run(command[:3] + ["dataset", "validate", str(tmp_path / "dataset")], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_station_the_inspection_service_and_the_controller_end_to_end(tmp_path: Path) -> None:
    from test_inspect import synthetic
    from test_station import station_config

    from pouchline.inspect.config import InspectConfig
    from pouchline.inspect.service import InspectService
    from pouchline.station.service import Station

    settings = make_settings(tmp_path / "data", deadline_s=10.0)
    seed_users(settings)
    controller = RunningController(settings)
    station = Station(station_config([{"name": "cam", "cells": "source", "source": synthetic(30, rate=30)}])).start()
    inspection = InspectService(InspectConfig(stations=[station.server.endpoint], collect="tcp://127.0.0.1:0", workers=1,
                                              http=None, controller=settings.verdicts, audit_rate=0.2)).start()
    try:
        operator = controller.client(controller.tokens().operator)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and operator.get("/api/v1/cells").json()["total"] < 30:
            time.sleep(0.2)
        cells = operator.get("/api/v1/cells", params={"limit": 100}).json()["items"]
    finally:
        inspection.stop()
        station.stop()
        controller.stop()
    assert len(cells) == 30 and all(c["decision"] in ("pass", "reject") and c["source"] == "verdict" for c in cells)
    flagged = [c for c in cells if c["decision"] == "reject"]
    assert flagged and all(c["inspections"][0]["image"] and c["inspections"][0]["overlay"] for c in flagged)
    assert all(c["inspections"][0]["model_sha256"] for c in cells)
