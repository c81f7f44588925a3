"""Run a shipped detector with onnxruntime: the one inference path of evaluation and inspection.

`Inferencer` follows the pre_process / forward / post_process split. Pre-processing finds
and aligns the cell. The forward pass runs the ONNX graph on a batch. Post-processing turns
scores into a `Prediction`: labels at the metadata's thresholds, the anomaly flag, swelling
in mm and %, and the defect regions mapped back into frame pixels. Only onnxruntime,
OpenCV and NumPy are needed (no torch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pouchline.models.dataprep import align, to_model_input
from pouchline.models.locate import Located, Status
from pouchline.models.metadata import OUTPUT_NAMES, ModelError, ModelMetadata, check_graph, load_metadata


@dataclass
class Prediction:
    """Verdict material for one frame."""

    status: Status
    probs: dict[str, float] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)  # outputs over threshold (or the top class), plus 'anomaly'
    anomaly: float = float("nan")
    swelling_mm: float = float("nan")
    swelling_pct: float = float("nan")
    heatmap: np.ndarray | None = None  # crop-space defect probability (h, w)
    regions: list[list[tuple[float, float]]] = field(default_factory=list)  # defect outlines, frame pixels
    located: Located | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def session_options(threads: int, spinning: bool = False):  # -> onnxruntime.SessionOptions
    """Session options: a fixed thread count, no idle spinning (workers share the CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def bare_runner(model: Path, threads: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The graph alone over (N, H, W, C) uint8 crops, every output by name: no metadata, no
    locating. For export's accuracy gate (the metadata is not written yet) and the benchmark."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), session_options(threads), providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUT_NAMES, session.run(None, {"image": batch})))

    return run


class Inferencer:
    """A loaded detector: metadata checked against the file and the graph."""

    def __init__(self, model: Path, *, threads: int = 1, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(model)
        self.meta: ModelMetadata = load_metadata(self.path)
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads), providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{self.path}: onnxruntime cannot load it: {exc}") from exc
        check_graph(self.path, self.meta, self.session.get_inputs(), self.session.get_outputs())
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.crop_size = (self.meta.input.width, self.meta.input.height)

    def pre_process(self, image: np.ndarray) -> tuple[np.ndarray | None, Located]:
        """Align one frame; the model input (H, W, C uint8) or None when no whole cell is seen."""
        if image is None or image.ndim not in (2, 3) or image.size == 0:
            raise ValueError(f"not an image: {None if image is None else image.shape}")
        if image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        located = align(image, self.meta.input.aligned_crops, self.meta.input.view)
        if located.status != "ok" or located.crop is None:
            return None, located
        return to_model_input(located.crop, self.meta.input.channels), located

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on an (N, H, W, C) uint8 batch."""
        expected = (self.meta.input.height, self.meta.input.width, self.meta.input.channels)
        if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.uint8:
            raise ValueError(f"batch {batch.shape} {batch.dtype} is not (N, {expected[0]}, {expected[1]}, {expected[2]}) uint8")
        return dict(zip(self.output_names, self.session.run(None, {self.meta.input.name: np.ascontiguousarray(batch)})))

    def post_process(self, outputs: dict[str, np.ndarray], row: int, located: Located) -> Prediction:
        """One frame's prediction from row ``row`` of the batch outputs."""
        meta = self.meta
        probs = {name: float(outputs["probs"][row, k]) for k, name in enumerate(meta.outputs)}
        if meta.multilabel:
            flagged = [name for name, p in probs.items() if p > meta.thresholds[name]]
        else:  # classes exclude each other: the most probable one
            flagged = [max(probs, key=lambda name: probs[name])]
        anomaly = float(outputs["anomaly"][row])
        if anomaly > meta.anomaly_threshold:
            flagged.append("anomaly")
        swelling = float(outputs["swelling_mm"][row]) if meta.has_swelling else float("nan")
        pct = 100.0 * swelling / meta.nominal_thickness_mm if meta.nominal_thickness_mm else float("nan")
        heat = outputs["heatmap"][row]
        return Prediction(
            status="ok", probs=probs, flagged=flagged, anomaly=anomaly, swelling_mm=swelling, swelling_pct=pct,
            heatmap=heat, regions=self.regions(heat, located), located=located,
        )

    def regions(self, heat: np.ndarray, located: Located, level: float = 0.5) -> list[list[tuple[float, float]]]:
        """Outlines of heat-map areas above ``level``, in frame pixel coordinates."""
        if located.crop_to_image is None or not (heat > level).any():
            return []
        up = cv2.resize(heat, self.crop_size, interpolation=cv2.INTER_LINEAR)
        contours, _ = cv2.findContours((up > level).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        matrix = located.crop_to_image
        outlines = []
        for contour in contours:
            points = contour.reshape(-1, 2).astype(np.float64)
            frame = points @ matrix[:, :2].T + matrix[:, 2]
            outlines.append([(float(x), float(y)) for x, y in frame])
        return outlines

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Frames in, one prediction each (frames without a whole cell get their status)."""
        start = time.perf_counter()
        prepared = [self.pre_process(image) for image in images]
        pre_ms = (time.perf_counter() - start) * 1000 / max(len(images), 1)
        rows = [i for i, (crop, _) in enumerate(prepared) if crop is not None]
        results = [Prediction(status=located.status, located=located) for _, located in prepared]
        if rows:
            start = time.perf_counter()
            outputs = self.forward(np.stack([prepared[i][0] for i in rows]))
            infer_ms = (time.perf_counter() - start) * 1000 / len(rows)
            for row, index in enumerate(rows):
                results[index] = self.post_process(outputs, row, prepared[index][1])
                results[index].timings_ms = {"pre_process": pre_ms, "infer": infer_ms}
        return results
