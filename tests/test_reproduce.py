"""`pouchline model reproduce`, the one command that rebuilds the shipped models, end to end
at its quick-check scale: every step runs for real (render, train, export both precisions,
calibrate the pair, evaluate, write the card) on a fiftieth of the data, one epoch each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch", reason="reproducing needs the [train] extra (torch==2.13.0)")

from pouchline.datasets.manifest import DatasetReader  # noqa: E402
from pouchline.models.inference import Inferencer  # noqa: E402
from pouchline.models.reproduce import MODEL_NAME, SIDE_MODEL_NAME, reproduce  # noqa: E402


def test_quick_check_rebuilds_both_models_calibrated_as_a_pair(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    results = reproduce(out, work, epochs=1, scale=0.02)

    # Every shipped file loads: metadata checked against its file's hash and its graph.
    models = {name: [Inferencer(out / f"{name}{suffix}") for suffix in (".onnx", ".int8.onnx")]
              for name in (MODEL_NAME, SIDE_MODEL_NAME)}
    assert {m.meta.precision for m in models[MODEL_NAME]} == {"fp32", "int8"}
    assert {m.meta.input.view for m in models[SIDE_MODEL_NAME]} == {"side"}

    # The top model trains on more cells than the side one; the side's are the first of them,
    # so the views of a training cell still match by cell id.
    top = {record.cell for record in DatasetReader(work / "data" / "train")}
    side = {record.cell for record in DatasetReader(work / "data" / "train-side")}
    assert (len(top), len(side)) == (1000, 400) and side < top

    # Both precisions' pairs were calibrated together and evaluated cell by cell.
    for precision in ("fp32", "int8"):
        calibration = results[f"{precision}_calibration"]
        assert set(calibration["models"]) == {"top", "side"}
        pair = {m.meta.input.view: m.meta.sha256 for name in models for m in models[name] if m.meta.precision == precision}
        assert calibration["model_sha256"] == pair  # partners known by their graph's hash
        assert calibration["good_rejected"] <= calibration["target_frr"]
        assert results[f"{precision}_cells_test"]["unit"] == "cell"

    # A quick check keeps an INT8 file that misses the accuracy gate, and the card says so.
    card = (out / "MODEL_CARD.md").read_text()
    assert "| train | 1000 cells (top), 400 (side) |" in card
    forced = [results[key]["forced"] for key in ("export", "side_export") if "forced" in results[key]]
    assert all(message in card for message in forced)
    assert card.count("Not enforced (a quick check at scale 0.02)") == len(forced)
