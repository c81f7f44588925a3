"""`pouchline bench pipeline` end to end on a few frames: every case runs, the report has the
issue's keys, and every offered frame gets a verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pouchline.inspect.pipelinebench import run


def test_pipeline_bench_reports_floor_pipeline_and_latency(tmp_path: Path) -> None:
    report = run(frames=60, paced_frames=60, rate=30.0, workers=1, floor_s=1.0)
    report.save(tmp_path / "pipeline.json")
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert saved["bench"] == "pipeline" and len(saved["results"]) == 3
    assert set(saved["ratios"]) == {"throughput_vs_floor"}
    figures = saved["figures"]
    assert figures["frames_without_verdict"] == 0
    assert {"floor_fps", "pipeline_fps", "p99_latency_ms_at_60fps", "p50_latency_ms_at_60fps"} <= set(figures)
    assert all(math.isfinite(figures[key]) and figures[key] > 0 for key in ("floor_fps", "pipeline_fps",
                                                                            "p99_latency_ms_at_60fps"))
    assert 0 < saved["ratios"]["throughput_vs_floor"] < 2
