"""The metadata JSON that travels next to every ONNX file, and its checks against the graph.

Everything the runtime needs to use a model correctly is here: input size and colour
layout, how crops are made, class names, thresholds, the anomaly threshold, the swelling
calibration, where the training data came from, validation metrics and the SHA-256 of the
.onnx file. No torch: the runtime reads this.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

METADATA_VERSION = 1
OUTPUT_NAMES = ("probs", "heatmap", "swelling_mm", "anomaly")


class ModelError(Exception):
    """A model file or its metadata is missing, corrupt or inconsistent (the message says which)."""


class InputSpec(BaseModel):
    """What the graph's input is and how frames become it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("image", description="Graph input name.")
    layout: Literal["NHWC"] = Field("NHWC", description="Batch, height, width, channels.")
    dtype: Literal["uint8"] = Field("uint8", description="Pixel type; normalisation is inside the graph.")
    width: int = Field(gt=0, description="Crop width in pixels.")
    height: int = Field(gt=0, description="Crop height in pixels.")
    channels: Literal[1, 3] = Field(description="1 = grayscale (OpenCV BGR2GRAY), 3 = BGR.")
    mean: float = Field(description="Subtracted from pixels inside the graph (documentation).")
    std: float = Field(description="Divides pixels after the mean inside the graph (documentation).")
    aligned_crops: bool = Field(description="Frames are already aligned crops: resize only, no locate step.")
    view: str = Field(description="Camera view the model was trained on.")


class CalibrationRecord(BaseModel):
    """The cell-level record of `pouchline model calibrate`. The partner fields are typed because
    the runtime reads them (which models must run beside this one); the rest is the record
    people read (rule, data, cells, good cells each flag may reject) and is kept as written."""

    model_config = ConfigDict(extra="allow")

    models: dict[str, str] = Field(default_factory=dict, description="File name of each view's model calibrated together.")
    model_sha256: dict[str, str] | None = Field(
        None, description="SHA-256 of each view's model calibrated together (absent from records made before it was kept).")


class ModelMetadata(BaseModel):
    """Contents of ``MODEL.json`` next to ``MODEL.onnx``."""

    model_config = ConfigDict(extra="forbid")

    metadata_version: int = Field(METADATA_VERSION, description="Version of this metadata format.")
    name: str = Field(description="Model name.")
    version: str = Field(description="Model version (pouchline version + run seed).")
    precision: Literal["fp32", "int8"] = Field(description="Numeric precision of the graph.")
    sha256: str = Field(description="SHA-256 of the .onnx file.")
    input: InputSpec
    outputs: list[str] = Field(min_length=1, description="Names of the `probs` columns.")
    multilabel: bool = Field(description="probs are independent sigmoids (True) or a softmax (False).")
    mirror_average: bool = Field(
        False, description="The graph scores each crop together with its mirror image across the long axis and "
                           "reports the pair's average (probabilities, heat map, swelling; the anomaly score is the "
                           "crop's own): twice the compute of one pass. Top views; never side views.")
    thresholds: dict[str, float] = Field(
        description="Per-output probability above which a cell is flagged (multi-label); empty for multi-class models."
    )
    anomaly_threshold: float = Field(description="Anomaly score above which a cell is flagged as unusual.")
    target_frr: float = Field(description="False-reject rate on good validation cells the thresholds were set at.")
    calibration: CalibrationRecord = Field(
        default_factory=CalibrationRecord,
        description="How the thresholds were set when not by training alone: the cell-level record of "
                    "`pouchline model calibrate` (rule, models, data, cells, good cells each flag may reject).",
    )
    heatmap_stride: int = Field(gt=0, description="Crop pixels per heat-map cell.")
    has_swelling: bool = Field(description="The swelling_mm output was trained (else meaningless).")
    swelling_calibration: dict[str, float] = Field(
        description="Linear correction (scale, offset) fitted on validation, applied inside the graph."
    )
    nominal_thickness_mm: float | None = Field(None, description="Cell spec's nominal thickness, for swelling %.")
    swelling_limit_mm: float | None = Field(None, description="Spec limit above which a cell is swollen.")
    training: dict[str, Any] = Field(description="Data hash, dataset source, seed, epochs, held-out kinds.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Validation metrics of this file.")
    created: str = Field(description="UTC time of export (ISO 8601).")


def metadata_path(model: Path) -> Path:
    """``MODEL.onnx`` -> ``MODEL.json``."""
    return model.with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_metadata(model: Path, *, verify_hash: bool = True) -> ModelMetadata:
    """Metadata of a model file, checked: present, valid, and describing this very file."""
    if not model.is_file():
        raise ModelError(f"{model}: model file not found")
    path = metadata_path(model)
    if not path.is_file():
        raise ModelError(f"{path}: metadata JSON missing (every .onnx travels with one)")
    try:
        meta = ModelMetadata.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    except ValidationError as exc:
        problems = "; ".join(f"field '{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
        raise ModelError(f"{path}: {problems}") from exc
    if verify_hash:
        actual = file_sha256(model)
        if actual != meta.sha256:
            raise ModelError(f"{model}: SHA-256 {actual[:12]}... does not match its metadata ({meta.sha256[:12]}...)")
    return meta


def check_graph(model: Path, meta: ModelMetadata, inputs: list[Any], outputs: list[Any]) -> None:
    """Compare an onnxruntime session's inputs/outputs with the metadata; errors name the field."""
    if len(inputs) != 1:
        raise ModelError(f"{model}: graph has {len(inputs)} inputs; pouchline models have one")
    graph_in = inputs[0]
    expected = ["batch", meta.input.height, meta.input.width, meta.input.channels]
    if graph_in.name != meta.input.name:
        raise ModelError(f"{model}: graph input is '{graph_in.name}', metadata field 'input.name' says '{meta.input.name}'")
    shape = list(graph_in.shape)
    if len(shape) != 4 or any(isinstance(s, int) and s != e for s, e in zip(shape[1:], expected[1:])):
        raise ModelError(
            f"{model}: graph input shape {shape} does not match metadata 'input' (N, {meta.input.height}, "
            f"{meta.input.width}, {meta.input.channels})"
        )
    if "uint8" not in graph_in.type:
        raise ModelError(f"{model}: graph input type {graph_in.type}, metadata field 'input.dtype' says uint8")
    names = [o.name for o in outputs]
    if names != list(OUTPUT_NAMES):
        raise ModelError(f"{model}: graph outputs {names}, expected {list(OUTPUT_NAMES)}")
    probs = outputs[0].shape
    if len(probs) != 2 or (isinstance(probs[1], int) and probs[1] != len(meta.outputs)):
        raise ModelError(f"{model}: probs output {probs} does not have the {len(meta.outputs)} columns of field 'outputs'")
