"""The QA web UI in a real Chromium (Debian's package, driven by Playwright) against a real
controller: sign in, watch a lot fill, review flagged cells with the keyboard, override a held
lot with a reason, find it in the audit log. Screenshots go to ``$POUCHLINE_TEST_ARTIFACTS/ui``
(default ``test-artifacts/ui``)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Page, expect, sync_playwright

sys.path.insert(0, str(Path(__file__).parent))
from controllerkit import Line, RunningController, cell_verdict, make_settings, seed_users  # noqa: E402

from pouchline.datasets.synth import SynthConfig, render_cell  # noqa: E402
from pouchline.inspect.overlay import rgba_png  # noqa: E402
from pouchline.station.service import Station  # noqa: E402
from test_station import station_config  # noqa: E402

ARTIFACTS = Path(os.environ.get("POUCHLINE_TEST_ARTIFACTS", "test-artifacts")) / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def page() -> Iterator[Page]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        yield context.new_page()
        browser.close()


def synthetic(count: int, *, seed: int, rate: float) -> dict:
    return {"kind": "synthetic", "seed": seed, "count": count, "cells_per_s": rate, "size": [320, 240]}


def _layer(width: int, height: int) -> bytes:
    layer = np.zeros((height // 4, width // 4, 4), np.uint8)
    layer[40:80, 50:110] = (255, 40, 0, 150)
    return rgba_png(layer)


def test_qa_reviews_a_lot_in_the_browser(tmp_path: Path, page: Page) -> None:
    station = Station(station_config([{"name": name, "cells": "source", "source": synthetic(1000, seed=i + 1, rate=2)}
                                      for i, name in enumerate(("top", "side"))])).start()
    assert station.status_server is not None
    settings = make_settings(tmp_path / "data", deadline_s=30.0, stations=[station.status_server.address])
    seed_users(settings)
    controller = RunningController(settings)
    line = Line(controller)
    try:
        tokens = controller.tokens()
        admin, mes = controller.client(tokens.admin), controller.client(tokens.qa)
        policy = {"kind": "threshold", "reject_rate_pct": 30, "hold_rate_pct": 10, "max_swelling_mm": 3.0}
        assert admin.put("/api/v1/products/PL-5000", json={"name": "PL-5000", "policy": policy}).status_code == 200
        assert mes.post("/api/v1/lots", json={"code": "LOT-UI", "product": "PL-5000", "expected_quantity": 12}
                        ).status_code == 201
        frames = [render_cell(SynthConfig(count=12, seed=21, views=("top",), size=(640, 480), defect_rate=0.0), i)[0]
                  for i in range(3)]

        # sign in as QA
        page.goto(controller.base_url)
        page.get_by_label("User").fill("quinn")
        page.get_by_label("Password").fill("wrong password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#login-error")).to_contain_text("wrong user name or password")
        page.get_by_label("Password").fill("correct horse battery")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_contain_text("quinn (qa)")

        # watch the lot fill, live
        def feed() -> None:
            corners = [[120, 110], [520, 110], [520, 370], [120, 370]]
            cells = [cell_verdict(f"c-{i}", lot="LOT-UI", decision="reject" if i in (3, 7) else "pass",
                                  reasons=["swollen"] if i in (3, 7) else [], swelling=0.9 if i in (3, 7) else 0.1,
                                  image=frames[i % 3]["image_bytes"] if i in (0, 3, 7) else False,
                                  overlay=_layer(640, 480) if i in (3, 7) else None,
                                  regions=[[[200, 160], [440, 160], [440, 320], [200, 320]]] if i in (3, 7) else None,
                                  corners=corners) for i in range(12)]
            for cell in cells:
                line.send(cell)

        feeder = threading.Thread(target=feed)
        feeder.start()
        expect(page.locator("#cells-hour")).to_have_text("12", timeout=20_000)
        feeder.join()
        expect(page.locator("#review-queue")).to_have_text("2")
        expect(page.locator("#feed tr")).to_have_count(12)
        page.screenshot(path=str(ARTIFACTS / "1-dashboard.png"), full_page=True)

        # review both flagged cells with the keyboard: confirm one, call the other a false alarm
        page.get_by_role("link", name="Review").click()
        expect(page.locator("h3").first).to_contain_text("st1/LOT-UI/c-3")
        expect(page.locator("#regions polygon.region")).to_have_count(1)
        expect(page.locator("#overlay")).to_be_visible()
        page.keyboard.press("o")
        expect(page.locator("#overlay")).to_be_hidden()
        page.keyboard.press("o")
        page.keyboard.press("+")
        page.screenshot(path=str(ARTIFACTS / "2-review.png"), full_page=True)
        page.keyboard.press("c")
        expect(page.locator("h3").first).to_contain_text("st1/LOT-UI/c-7")
        page.keyboard.press("f")
        expect(page.locator("#queue-empty")).to_be_visible()
        operator = controller.client(tokens.operator)
        reviewed = {c["cell"]: c["review_state"] for c in operator.get("/api/v1/cells", params={"lot": "LOT-UI"}).json()["items"]}
        assert reviewed["c-3"] == "confirmed" and reviewed["c-7"] == "false_alarm"

        # the lot: 2 of 12 rejected is over the 10 % hold line; QA overrides with a reason
        page.get_by_role("link", name="Lots").click()
        page.get_by_role("link", name="LOT-UI").click()
        expect(page.locator("#lot-disposition")).to_have_text("hold")
        page.locator("#override").click()
        page.locator("select[name=disposition]").select_option("accept")
        page.locator("#override-submit").click()  # no reason yet: the browser refuses the empty field
        expect(page.locator("#dialog")).to_be_visible()
        page.locator("textarea[name=reason]").fill("c-7 was a false alarm; one swollen cell removed by hand")
        page.locator("#override-submit").click()
        expect(page.locator("#lot-disposition")).to_have_text("accept")
        page.screenshot(path=str(ARTIFACTS / "3-lot.png"), full_page=True)

        # and the override is in the audit log, with who and why
        page.get_by_role("link", name="Audit log").click()
        row = page.locator("#audit tbody tr").filter(has_text="lot_override")
        expect(row).to_have_count(1)
        expect(row).to_contain_text("quinn")
        expect(row).to_contain_text("one swollen cell removed by hand")
        page.screenshot(path=str(ARTIFACTS / "4-audit.png"), full_page=True)

        page.get_by_role("link", name="SPC").click()
        expect(page.locator("h2")).to_contain_text("SPC — PL-5000")
        expect(page.locator("svg.chart")).to_have_count(2)  # X-bar and R of 12 cells in subgroups of 5; p needs more
        expect(page.locator("svg.chart").first.locator("circle")).to_have_count(2)
        expect(page.locator("main")).not_to_contain_text("[object")
        page.screenshot(path=str(ARTIFACTS / "5-spc.png"), full_page=True)
        page.get_by_role("link", name="Cameras").click()
        expect(page.locator("img.live")).to_have_count(2)  # the station's two cameras, live
        expect(page.locator("img.live").first).to_have_js_property("naturalWidth", 320, timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "6-cameras.png"), full_page=True)
    finally:
        line.close()
        controller.stop()
        station.stop()
