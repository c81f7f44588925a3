"""`pouchline bench model`: the same trained weights in PyTorch eager, onnxruntime FP32 and INT8.

All three runtimes run in one process on the same crops, so their ratios are comparable:

* latency at batch 1 (p50/p99) and throughput at batch 16, each on 1 and 2 threads;
* accuracy of each runtime on the same frames: the AUROC of every output.

The crops are fresh synthetic frames (a seed training never used) that went through the
live locate step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pouchline.datasets.domain import load_domain
from pouchline.datasets.records import DEFORMATION_KINDS, SYNTH_CLASSES
from pouchline.datasets.render import render_top
from pouchline.datasets.scene import sample_scene
from pouchline.datasets.spec import CellSpec
from pouchline.inspect.benchreport import BenchReport
from pouchline.models.dataprep import Prepared, align, to_model_input
from pouchline.models.export import output_aurocs
from pouchline.models.inference import bare_runner
from pouchline.models.metadata import OUTPUT_NAMES, load_metadata

_BENCH_SEED = 777


def bench_crops(count: int, channels: int) -> Prepared:
    """Aligned crops of freshly rendered cells with their labels (swelling known)."""
    spec, domain = CellSpec(), load_domain("default")
    crops, labels, swelling = [], [], []
    for index in range(count):
        scene = sample_scene(_BENCH_SEED, index, spec=spec, domain=domain, defect_rate=0.5)
        located = align(render_top(scene).image, aligned_crops=False)
        if located.crop is None:
            continue
        names, _ = scene.labels()
        crops.append(to_model_input(located.crop, channels))
        labels.append([1.0 if c in names else 0.0 for c in SYNTH_CLASSES])
        swelling.append(scene.swelling_mm)
    n = len(crops)
    return Prepared(np.stack(crops), np.array(labels, np.float32), np.array(swelling, np.float32),
                    np.zeros((n, 1, 1), np.float32), np.array(["?"] * n, dtype=object),
                    np.zeros((n, len(DEFORMATION_KINDS)), np.float32), np.arange(n).astype(object), [])


def _latency(run: Callable[[np.ndarray], Any], crop: np.ndarray, repeats: int) -> tuple[float, float]:
    for _ in range(10):
        run(crop)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(crop)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _throughput(run: Callable[[np.ndarray], Any], batch: np.ndarray, seconds: float) -> float:
    """Images/s over at least ``seconds`` of back-to-back batches (after a short warm-up)."""
    for _ in range(3):
        run(batch)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        run(batch)
        done += len(batch)
    return done / elapsed


def _interleaved_throughput(runners: dict[str, Callable[[np.ndarray], Any]], batch: np.ndarray, rounds: int,
                            seconds: float) -> dict[str, list[float]]:
    """Every runner's throughput, ``rounds`` times, the runners taking turns in each round, so a
    slow spell of a shared machine hits them all alike rather than one of them."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            rates[name].append(_throughput(runner, batch, seconds))
    return rates


def _torch_runner(weights: Path, model: Path, threads: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import torch

    from pouchline.models.network import Deployed, Detector

    meta = load_metadata(model, verify_hash=False)
    torch.set_num_threads(threads)
    state = torch.load(weights, weights_only=True)
    detector = Detector(meta.input.channels, len(meta.outputs))
    detector.load_state_dict(state["detector"])
    calibration = (meta.swelling_calibration["scale"], meta.swelling_calibration["offset"])
    deployed = Deployed(detector, meta.input.mean, meta.input.std, meta.multilabel, meta.mirror_average, state["centre"],
                        state["whitening"], calibration).eval()

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return {n: v.numpy() for n, v in zip(OUTPUT_NAMES, deployed(torch.from_numpy(batch)))}

    return run


def run(model: Path, int8: Path, weights: Path, *, frames: int = 600, repeats: int = 200, rounds: int = 5,
        seconds: float = 1.0) -> BenchReport:
    """Benchmark the three runtimes of one trained model. Throughput is the median of ``rounds``
    interleaved runs of ``seconds`` each; every run's figure is kept in the row."""
    meta = load_metadata(model)
    data = bench_crops(frames, meta.input.channels)
    report = BenchReport("model")
    throughput: dict[tuple[str, int], float] = {}
    for threads in (1, 2):
        runners = {
            "torch eager": _torch_runner(weights, model, threads),
            "onnxruntime fp32": bare_runner(model, threads),
            "onnxruntime int8": bare_runner(int8, threads),
        }
        rates = _interleaved_throughput(runners, data.crops[:16], rounds, seconds)
        for name, runner in runners.items():
            p50, p99 = _latency(runner, data.crops[:1], repeats)
            rate = float(np.median(rates[name]))
            throughput[(name, threads)] = rate
            row: dict[str, Any] = {"case": name, "threads": threads, "batch1_p50_ms": p50, "batch1_p99_ms": p99,
                                   "batch16_images_per_s": rate, "runs_images_per_s": [round(r) for r in rates[name]]}
            if threads == 2:
                scores = {key: [] for key in OUTPUT_NAMES}
                for start in range(0, len(data.crops), 64):
                    for key, value in runner(data.crops[start : start + 64]).items():
                        scores[key].append(value)
                merged = {key: np.concatenate(value) for key, value in scores.items()}
                aurocs = output_aurocs(merged, data, list(SYNTH_CLASSES), meta.outputs)
                row.update({f"auroc_{key}": value for key, value in aurocs.items()})
            report.results.append(row)
    report.figures["frames"] = len(data.crops)
    report.figures["ort_int8_batch16_images_per_s_2threads"] = throughput[("onnxruntime int8", 2)]
    report.figures["torch_batch16_images_per_s_2threads"] = throughput[("torch eager", 2)]
    report.ratios["ort_int8_vs_torch_throughput"] = throughput[("onnxruntime int8", 2)] / throughput[("torch eager", 2)]
    report.ratios["ort_fp32_vs_torch_throughput"] = throughput[("onnxruntime fp32", 2)] / throughput[("torch eager", 2)]
    report.ratios["ort_int8_vs_fp32_throughput"] = throughput[("onnxruntime int8", 2)] / throughput[("onnxruntime fp32", 2)]
    return report


def save_weights(run_dir: Path, out: Path) -> None:
    """The run's weights plus its anomaly Gaussian in one file, for the eager benchmark."""
    import torch

    calibration = json.loads((run_dir / "calibration.json").read_text())
    torch.save({"detector": torch.load(run_dir / "detector.pt", weights_only=True),
                "centre": torch.tensor(calibration["centre"]), "whitening": torch.tensor(calibration["whitening"])}, out)
