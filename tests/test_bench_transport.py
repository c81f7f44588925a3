"""`pouchline bench transport` end to end on a few frames: every case runs, the report has the
issue's keys, and pouchline's transport loses nothing silently."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pouchline.station.bench import run


def test_transport_bench_reports_every_case_and_no_silent_drop(tmp_path: Path) -> None:
    report = run(frames=24, raw_frames=8, paced_frames=12, rate=120.0)
    report.save(tmp_path / "transport.json")
    saved = json.loads((tmp_path / "transport.json").read_text())
    assert saved["bench"] == "transport" and len(saved["results"]) == 12
    assert {"fps_vs_imagezmq_reqrep_jpeg", "p99_vs_imagezmq_reqrep_jpeg", "passthrough_cpu_vs_decode_encode",
            "fps_vs_imagezmq_reqrep_jpeg_tcp"} <= set(saved["ratios"])
    assert saved["figures"]["silent_drops"] == 0
    ours = [row for row in saved["results"] if row["system"] in ("pouchline", "pouchline_tcp")]
    assert len(ours) == 6
    saturated = [row for row in saved["results"] if row["mode"] == "saturation"]
    assert all(len(row["runs_frames_per_s"]) == 3 and min(row["runs_frames_per_s"]) <= round(row["frames_per_s"])
               <= max(row["runs_frames_per_s"]) for row in saturated)  # the median of three runs
    paced = [row for row in saved["results"] if row["mode"] == "paced"]
    assert all(len(row["runs_p99_ms"]) == 3 and sorted(row["runs_p99_ms"])[1] == round(row["p99_ms"], 3)
               for row in paced)  # the run with the median p99
    assert all(row["received"] == row["offered"] for row in ours)
    assert all(math.isfinite(value) and value > 0 for value in saved["ratios"].values())
