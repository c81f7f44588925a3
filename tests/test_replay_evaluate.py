"""Recording, replay and evaluation through the real pipeline (real station, sockets, workers, model)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).parent))
from test_station import FAST, free_port, station_config  # noqa: E402

from pouchline.datasets.record import record  # noqa: E402
from pouchline.datasets.synth import SynthConfig, synthesize  # noqa: E402
from pouchline.inspect.aggregate import Decided  # noqa: E402
from pouchline.inspect.config import SHIPPED_MODEL, InspectConfig  # noqa: E402
from pouchline.inspect.evaluation import evaluate_pipeline, replay_through_pipeline  # noqa: E402
from pouchline.inspect.service import InspectService  # noqa: E402
from pouchline.models.evaluate import evaluate  # noqa: E402
from pouchline.models.metadata import metadata_path  # noqa: E402
from pouchline.station.protocol import Frame  # noqa: E402
from pouchline.station.service import Station  # noqa: E402
from pouchline.station.transport import FrameClient, TransportSettings  # noqa: E402

CLI = [sys.executable, "-c", "from pouchline.inspect.cli import main; main()"]


def _synthetic(count: int) -> dict:
    return {"kind": "synthetic", "seed": 31, "count": count, "cells_per_s": 0, "defect_rate": 0.4, "size": [640, 480],
            "views": ["top"], "lot_size": 20}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("labelled") / "cells"
    synthesize(data, SynthConfig(count=160, seed=300, views=("top",), size=(640, 480), defect_rate=0.5), workers=1,
               progress=False)
    return data


def test_evaluate_through_the_pipeline_reproduces_the_offline_metrics(labelled: Path, tmp_path: Path) -> None:
    live = evaluate_pipeline(labelled, SHIPPED_MODEL, tmp_path / "report", workers=2)
    offline = evaluate(SHIPPED_MODEL, labelled, tmp_path / "offline", progress=False)
    metrics = live["runs"][0]["metrics"]
    assert metrics["cells_missing"] == 0 and metrics["images"] == offline["images"] == 160
    for name in ("swollen", "deformed"):
        assert abs(metrics[name]["recall"] - offline[name]["recall"]) <= 0.005, name
        assert abs(metrics[name]["auroc"] - offline[name]["auroc"]) <= 0.005, name
        assert 0 < metrics[name]["precision"] <= 1
    assert abs(metrics["false_reject_rate"] - offline["false_reject_rate"]) <= 0.005
    assert abs(metrics["swelling_mae_mm"] - offline["swelling_mae_mm"]) <= 0.005
    assert metrics["latency_ms"]["p99"] > 0 and metrics["cells_per_s"] > 0
    lots = live["runs"][0]["lots"]
    assert sum(lot["cells"] for lot in lots.values()) == 160
    assert {lot["disposition"] for lot in lots.values()} <= {"accept", "reject", "hold"}
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Lots under the policy" in page and (tmp_path / "report" / "pouchline-detector.int8-recall.png").stat().st_size
    assert json.loads((tmp_path / "report" / "evaluation.json").read_text())["runs"][0]["model_sha256"]


def test_compare_shows_the_cells_two_models_disagree_on_with_both_heat_maps(labelled: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict.onnx"  # the same graph, flagging at a much lower probability
    shutil.copy(SHIPPED_MODEL, strict)
    meta = json.loads(metadata_path(SHIPPED_MODEL).read_text())
    meta["thresholds"] = {name: 0.2 for name in meta["thresholds"]}
    metadata_path(strict).write_text(json.dumps(meta))
    result = subprocess.run(CLI + ["evaluate", str(labelled), "--report", str(tmp_path / "cmp"), "--compare", str(strict),
                                   "--workers", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "cmp" / "evaluation.json").read_text())
    assert summary["disagreements"], "a model flagging at 0.2 must disagree somewhere"
    page = (tmp_path / "cmp" / "report.html").read_text()
    first = summary["disagreements"][0]
    assert f"Disagreements: {len(summary['disagreements'])} cells" in page and first in page
    assert page.count('class="layer"') == 2 * len(summary["disagreements"])  # both heat maps per cell
    for name in set(re.findall(r'src="(images/[0-9a-f]{64}\.(?:png|jpg))"', page)):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    strict_metrics = summary["runs"][1]["metrics"]
    assert strict_metrics["false_reject_rate"] >= summary["runs"][0]["metrics"]["false_reject_rate"]


def _live_verdicts(count: int) -> dict[str, Decided]:
    decided: dict[str, Decided] = {}
    station = Station(station_config([{"name": "cam", "cells": "source", "source": _synthetic(count)}])).start()
    service = InspectService(InspectConfig(stations=[station.server.endpoint], collect="tcp://127.0.0.1:0", http=None,
                                           workers=1, transport=FAST, watch_model=False))
    assert service.collector is not None
    service.collector.on_cell = lambda item: decided.__setitem__(f"{item.verdict.lot}/{item.verdict.cell}", item)
    service.start()
    try:
        deadline = time.monotonic() + 60
        while len(decided) < count and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        service.stop()
        station.stop()
    return decided


def test_a_recorded_stream_replays_to_the_same_verdicts(tmp_path: Path) -> None:
    count = 40
    station = Station(station_config([{"name": "cam", "cells": "source", "source": _synthetic(count)}])).start()
    try:
        result = record([station.server.endpoint], tmp_path / "recording", count=count,
                        settings=TransportSettings(**FAST), progress=False)
    finally:
        station.stop()
    assert result.frames == count
    live = _live_verdicts(count)
    with Progress(disable=True) as progress:
        replayed = replay_through_pipeline(tmp_path / "recording", SHIPPED_MODEL, tmp_path / "replay", workers=1,
                                           keep_images=False, progress=progress)
    assert len(live) == len(replayed.cells) == count
    for verdict in replayed.cells.values():
        original = live[f"{verdict.lot}/{verdict.cell}"].verdict
        assert verdict.decision == original.decision and verdict.reasons == original.reasons, verdict.cell
        assert verdict.frames[0].probs == pytest.approx(original.frames[0].probs, abs=1e-6)
        assert verdict.frames[0].truth == original.frames[0].truth


def test_replay_command_serves_a_recording_like_a_station(labelled: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    process = subprocess.Popen(CLI + ["replay", str(labelled), "--speed", "max", "--bind", endpoint],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    frames: list[Frame] = []
    client = FrameClient([endpoint], name="t", settings=TransportSettings(**FAST))
    try:
        deadline = time.monotonic() + 60
        while len(frames) < 160 and time.monotonic() < deadline:
            frame = client.receive(0.2)
            if frame is not None:
                frames.append(frame)
                client.done(frame.header.key)
        output = process.communicate(timeout=30)[0]
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
    assert len(frames) == 160 and {f.header.cell for f in frames} == {f"s300-c{i:06d}" for i in range(160)}
    assert all(f.header.truth is not None and f.header.view == "top" for f in frames)
    assert process.returncode == 0 and "replayed 160 frames" in output, output
    bad = subprocess.run(CLI + ["replay", str(labelled / "nope"), "--speed", "max"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "nope" in bad.stdout + bad.stderr
