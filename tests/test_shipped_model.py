"""The shipped detector in models/: loads with onnxruntime alone and sees obvious defects."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pouchline.datasets.domain import load_domain
from pouchline.datasets.render import render_top
from pouchline.datasets.scene import Deformation, sample_scene, sample_deformation
from pouchline.datasets.spec import CellSpec
from pouchline.models.inference import Inferencer
from pouchline.models.metadata import load_metadata

MODELS = Path(__file__).resolve().parent.parent / "models"
FP32, INT8 = MODELS / "pouchline-detector.onnx", MODELS / "pouchline-detector.int8.onnx"
SPEC, DOMAIN = CellSpec(), load_domain("default")


def _cells() -> tuple[list[np.ndarray], list[str]]:
    """12 flat good cells, 12 badly swollen cells and 36 clearly dented cells, rendered fresh."""
    images, truth = [], []
    for index in range(36):
        base = sample_scene(4242, index, spec=SPEC, domain=DOMAIN, defect_rate=0.0)
        flat = replace(base, swelling_mm=0.0, deformations=())
        if index < 12:
            images += [render_top(flat).image, render_top(replace(flat, swelling_mm=2.5)).image]
            truth += ["ok", "swollen"]
        dent: Deformation = sample_deformation(np.random.default_rng(index), SPEC, "dent", 1.5)
        images.append(render_top(replace(flat, deformations=(dent,))).image)
        truth.append("deformed")
    return images, truth


def test_shipped_files_are_small_and_described() -> None:
    files = [FP32, INT8, FP32.with_suffix(".json"), INT8.with_suffix(".json")]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) < 10 * 1024 * 1024
    fp32, int8 = load_metadata(FP32), load_metadata(INT8)
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert fp32.training["held_out_kinds"] and fp32.training["data_sha256"] == int8.training["data_sha256"]
    assert (MODELS / "MODEL_CARD.md").read_text().count("| ") > 20


@pytest.mark.parametrize("model", [FP32, INT8], ids=["fp32", "int8"])
def test_shipped_model_sees_obvious_defects(model: Path) -> None:
    images, truth = _cells()
    predictions = Inferencer(model, threads=2).predict(images)
    assert all(p.status == "ok" for p in predictions)
    caught = {"swollen": 0, "deformed": 0}
    for prediction, label in zip(predictions, truth):
        defects = set(prediction.flagged) - {"anomaly"}
        if label == "ok":
            assert not defects, f"flat good cell flagged {prediction.flagged} {prediction.probs}"
            assert prediction.swelling_mm < 0.3
        else:
            caught[label] += label in defects
    # Every badly swollen cell; dents at 5x the limit are not all caught yet (issue #3 is open
    # on deformed recall), but a model that misses more than one in twelve is broken. (Judged
    # on 36 dents: on 12, a sound model misses two about one time in eight.)
    assert caught["swollen"] == 12 and caught["deformed"] >= 33, caught
    swollen = [p.swelling_mm for p, label in zip(predictions, truth) if label == "swollen"]
    assert abs(float(np.mean(swollen)) - 2.5) < 0.3
