"""`pouchline model export`: a trained run to ONNX (FP32 and INT8), with metadata next to each file.

The FP32 graph takes uint8 NHWC crops, with normalisation inside, and has a dynamic batch
axis. INT8 is onnxruntime static quantisation: QDQ format, per-channel, signed 8-bit, run
after `quant_pre_process`, and calibrated on real crops of a dataset. The INT8 file is
refused when it loses more than `MAX_AUROC_LOSS` AUROC on any output against FP32 on the
run's validation split, unless forced.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np

from pouchline.datasets.records import DEFORMATION_KINDS
from pouchline.models.dataprep import HEAT_STRIDE, Prepared, crop_size_of, mirrors, prepare
from pouchline.models.inference import bare_runner
from pouchline.models.metadata import OUTPUT_NAMES, InputSpec, ModelError, ModelMetadata, file_sha256, metadata_path
from pouchline.models.metrics import auroc
from pouchline.models.stemquant import quantise_stem

MAX_AUROC_LOSS = 0.005
_CALIBRATION_CROPS = 320


class AccuracyGateError(ModelError):
    """The INT8 model lost too much accuracy against FP32."""


def _load_run(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    for name in ("config.json", "calibration.json", "detector.pt"):
        if not (run / name).is_file():
            raise ModelError(f"{run / name}: missing; is {run} a finished training run?")
    return json.loads((run / "config.json").read_text()), json.loads((run / "calibration.json").read_text())


def export_fp32(run: Path, out: Path) -> None:
    """Write the FP32 ONNX graph of a finished run (a single self-contained file)."""
    import torch

    from pouchline.models.network import Deployed, Detector

    described, calibration = _load_run(run)
    channels = described["config"]["channels"]
    detector = Detector(channels, len(described["outputs"]))
    detector.load_state_dict(torch.load(run / "detector.pt", weights_only=True))
    swelling = calibration.get("swelling", {"scale": 1.0, "offset": 0.0})
    deployed = Deployed(detector, described["mean"], described["std"], described["multilabel"],
                        mirrors(described["config"]["view"]), torch.tensor(calibration["centre"]),
                        torch.tensor(calibration["whitening"]), (swelling["scale"], swelling["offset"])).eval()
    width, height = crop_size_of(described["config"]["view"], described["dataset"]["aligned_crops"])
    example = torch.zeros((2, height, width, channels), dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        deployed, (example,), str(out), input_names=["image"], output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True, external_data=False,
    )
    if out.with_name(out.name + ".data").exists():
        raise ModelError(f"{out}: weights went to an external data file; pouchline ships one self-contained file")


class _CalibrationReader:
    """Feeds real aligned crops to onnxruntime's calibrator, a few at a time."""

    def __init__(self, crops: np.ndarray) -> None:
        self.batches = iter([crops[i : i + 16] for i in range(0, len(crops), 16)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"image": np.ascontiguousarray(batch)}


def quantise_int8(fp32: Path, out: Path, calibration_crops: np.ndarray, mean: float) -> None:
    """Static INT8 (QDQ, per-channel weights) after quant_pre_process.

    Choices measured on the project's 2-core machine (batch 16, 2 threads; `pouchline bench model`):

    * activations unsigned (U8S8): the VNNI kernels' fast path; signed (S8S8) activations
      were slower than FP32 there;
    * convolutions and their ReLUs are quantised, so each pair becomes one QLinearConv; the
      small heads and the Mahalanobis tail stay in float, where rounding would cost AUROC;
    * the stem convolution is left out here and then rewritten by `quantise_stem`: the uint8
      pixels go straight into a quantised convolution with 4 pixels per input channel group
      (as it is, with one input channel, it was the slowest node of the graph).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # The symbolic shape pass cannot follow the dynamo graph; ONNX shape inference does.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        stem = next(node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv")
        quantize_static(
            str(prepared), str(out), _CalibrationReader(calibration_crops), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Relu"], nodes_to_exclude=[stem],
        )
    quantised = onnx.load(str(out))
    quantise_stem(quantised, mean)
    onnx.checker.check_model(quantised)
    onnx.save(quantised, str(out))


def score_outputs(model: Path, crops: np.ndarray, threads: int = 2) -> dict[str, np.ndarray]:
    """All four outputs of a model over a set of crops (batches of 64)."""
    run = bare_runner(model, threads)
    batches = [run(crops[start : start + 64]) for start in range(0, len(crops), 64)]
    return {name: np.concatenate([batch[name] for batch in batches]) for name in OUTPUT_NAMES}


def output_aurocs(scores: dict[str, np.ndarray], data: Prepared, classes: list[str], outputs: list[str]) -> dict[str, float]:
    """AUROC of every scored output: each class probability, the anomaly score against any
    defect, and the swelling estimate against the swollen label."""
    result = {}
    for k, name in enumerate(outputs):
        result[name] = auroc(scores["probs"][:, k], data.labels[:, classes.index(name)] > 0.5)
    if "ok" in classes:
        defective = data.labels[:, classes.index("ok")] < 0.5
        result["anomaly"] = auroc(scores["anomaly"], defective)
    if "swollen" in classes and np.isfinite(data.swelling).any():
        result["swelling_mm"] = auroc(scores["swelling_mm"], data.labels[:, classes.index("swollen")] > 0.5)
    return {k: v for k, v in result.items() if np.isfinite(v)}


def validation_metrics(scores: dict[str, np.ndarray], data: Prepared, classes: list[str], outputs: list[str],
                       has_swelling: bool) -> dict[str, Any]:
    """What the metadata records of a file on the validation split: per-output AUROC and, for a
    model with a thickness gauge, its swelling error (which view's gauge a cell reports)."""
    metrics: dict[str, Any] = {"val_auroc": output_aurocs(scores, data, classes, outputs)}
    known = np.isfinite(data.swelling)
    if has_swelling and known.any():
        metrics["val_swelling_mae_mm"] = float(np.abs(scores["swelling_mm"][known] - data.swelling[known]).mean())
    return metrics


def _metadata(model: Path, precision: str, described: dict[str, Any], calibration: dict[str, Any],
              metrics: dict[str, Any]) -> ModelMetadata:
    dataset = described["dataset"]
    spec = dataset.get("spec") or {}
    trained_kinds = dataset.get("source", {}).get("kinds")
    width, height = crop_size_of(described["config"]["view"], dataset["aligned_crops"])
    return ModelMetadata(
        name=model.name.removesuffix(".onnx").removesuffix(".int8"),
        version=f"{package_metadata.version('pouchline')}+seed{described['config']['seed']}",
        precision=precision,  # type: ignore[arg-type]
        sha256=file_sha256(model),
        input=InputSpec(
            width=width, height=height, channels=described["config"]["channels"],
            mean=described["mean"], std=described["std"], aligned_crops=dataset["aligned_crops"],
            view="crop" if dataset["aligned_crops"] else described["config"]["view"],
        ),
        outputs=described["outputs"],
        multilabel=described["multilabel"],
        mirror_average=mirrors(described["config"]["view"]),
        thresholds=calibration["thresholds"],
        anomaly_threshold=calibration["anomaly_threshold"],
        target_frr=calibration["target_frr"],
        heatmap_stride=HEAT_STRIDE,
        has_swelling=described["has_swelling"],
        swelling_calibration=calibration.get("swelling", {"scale": 1.0, "offset": 0.0}),
        nominal_thickness_mm=spec.get("thickness_mm"),
        swelling_limit_mm=(spec["thickness_mm"] * spec["swelling_limit_pct"] / 100.0) if spec else None,
        training={
            "data_sha256": described["data_sha256"], "dataset": dataset["name"], "source": dataset.get("source", {}),
            "seed": described["config"]["seed"], "epochs": described["config"]["epochs"],
            "held_out_kinds": sorted(set(DEFORMATION_KINDS) - set(trained_kinds)) if trained_kinds is not None else [],
            "classes": described["classes"],
        },
        metrics=metrics,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def export(run: Path, out: Path, *, int8: bool = False, calib: Path | None = None, force: bool = False,
           progress: bool = True) -> dict[str, Any]:
    """Export FP32 (and INT8); returns paths, per-output AUROCs and whether INT8 passed the gate."""
    if out.suffix != ".onnx":
        raise ValueError(f"--out {out}: the model file name must end in .onnx")
    if int8 and calib is None:
        raise ValueError("--int8 needs --calib DIR: a dataset whose real frames calibrate the quantiser")
    described, calibration = _load_run(run)
    classes, outputs = described["classes"], described["outputs"]
    val = prepare(Path(described["data"]), "val", channels=described["config"]["channels"], classes=classes,
                  view=described["config"]["view"], cache_dir=run / "cache", workers=1, progress=progress)
    export_fp32(run, out)
    fp32_metrics = validation_metrics(score_outputs(out, val.crops), val, classes, outputs, described["has_swelling"])
    fp32_scores = fp32_metrics["val_auroc"]
    metadata_path(out).write_text(_metadata(out, "fp32", described, calibration, fp32_metrics).model_dump_json(indent=2))
    result: dict[str, Any] = {"fp32": str(out), "fp32_auroc": fp32_scores}
    if not int8:
        return result
    assert calib is not None
    calibration_set = prepare(calib, "train", channels=described["config"]["channels"], classes=classes,
                              view=described["config"]["view"], cache_dir=run / "cache", workers=1, progress=progress)
    pick = np.random.default_rng(0).permutation(len(calibration_set))[:_CALIBRATION_CROPS]
    int8_path = out.with_name(out.stem + ".int8.onnx")
    quantise_int8(out, int8_path, calibration_set.crops[np.sort(pick)], described["mean"])
    int8_metrics = validation_metrics(score_outputs(int8_path, val.crops), val, classes, outputs, described["has_swelling"])
    int8_scores = int8_metrics["val_auroc"]
    losses = {name: fp32_scores[name] - int8_scores.get(name, float("nan")) for name in fp32_scores}
    result.update(int8=str(int8_path), int8_auroc=int8_scores, auroc_loss=losses)
    worst = max(losses, key=lambda name: losses[name] if np.isfinite(losses[name]) else np.inf)
    if not losses[worst] <= MAX_AUROC_LOSS:
        message = (f"INT8 loses {losses[worst]:.4f} AUROC on '{worst}' (FP32 {fp32_scores[worst]:.4f}, "
                   f"INT8 {int8_scores.get(worst, float('nan')):.4f}); the limit is {MAX_AUROC_LOSS}")
        if not force:
            int8_path.unlink()
            raise AccuracyGateError(f"{int8_path}: not written: {message} (pass --force to keep it anyway)")
        result["forced"] = message
    meta = _metadata(int8_path, "int8", described, calibration,
                     {**int8_metrics, "auroc_loss_vs_fp32": losses,
                      **({"forced": result["forced"]} if force and "forced" in result else {})})
    metadata_path(int8_path).write_text(meta.model_dump_json(indent=2))
    return result
