"""`pouchline model ...`: train, export, evaluate and reproduce the defect detector.

Training and export need the `[train]` extra (torch); evaluation needs only onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pouchline.datasets.cli import fail
from pouchline.datasets.manifest import DatasetError
from pouchline.models.metadata import ModelError

app = typer.Typer(help="Defect detector: train, export to ONNX (FP32 and INT8), evaluate, reproduce the shipped model.",
                  no_args_is_help=True)
console = Console()


@contextmanager
def _clear_errors(*also: type[Exception]) -> Iterator[None]:
    """Known failures (bad model, bad dataset, bad value) become one error line and exit 2."""
    try:
        yield
    except (ModelError, DatasetError, ValueError, *also) as exc:
        raise fail(str(exc)) from exc


def _needs_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise fail("this command needs PyTorch: pip install torch==2.13.0 (the CPU build), then pouchline[train]") from exc


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Dataset folder (synthetic, recorded or imported).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, log, final weights, calibration.")],
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training split.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed: the same seed and data give the same model.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = False,
    channels: Annotated[int, typer.Option(min=1, max=3, help="1 = grayscale input (default), 3 = colour.")] = 1,
    batch_size: Annotated[int, typer.Option(min=2, help="Crops per step.")] = 64,
    view: Annotated[str, typer.Option(help="Camera view to train on: top (shaded surface) or side (silhouette).")] = "top",
    target_frr: Annotated[float, typer.Option(min=0.0001, max=0.5,
                                              help="False-reject rate on good cells the thresholds are set at.")] = 0.005,
) -> None:
    """Train the detector from scratch on a dataset's train split (validation on its val split)."""
    _needs_torch()
    from pouchline.models.train import TrainConfig
    from pouchline.models.train import train as run_training

    if channels not in (1, 3):
        raise fail("--channels must be 1 or 3")
    with _clear_errors(FileExistsError, FileNotFoundError):
        config = TrainConfig(epochs=epochs, seed=seed, channels=channels, batch_size=batch_size, view=view,
                             target_frr=target_frr)
        metrics = run_training(data, out, config, resume=resume)
    console.print_json(json.dumps(metrics))


@app.command("export")
def export_(
    run: Annotated[Path, typer.Argument(help="Finished training run folder.")],
    out: Annotated[Path, typer.Option(help="FP32 model file (MODEL.onnx); metadata goes to MODEL.json.")],
    int8: Annotated[bool, typer.Option(help="Also write MODEL.int8.onnx (static INT8, QDQ, per-channel).")] = False,
    calib: Annotated[Path | None, typer.Option(help="Dataset whose real frames calibrate INT8.")] = None,
    force: Annotated[bool, typer.Option(help="Keep an INT8 model that fails the accuracy gate.")] = False,
) -> None:
    """Export a run to ONNX with its metadata; INT8 must stay within 0.005 AUROC of FP32."""
    _needs_torch()
    from pouchline.models.export import export

    with _clear_errors():
        result = export(run, out, int8=int8, calib=calib, force=force)
    console.print_json(json.dumps(result))


@app.command("eval")
def eval_(
    model: Annotated[list[Path], typer.Argument(help="MODEL.onnx (with MODEL.json next to it); one per view (say "
                                                      "top and side) to judge whole cells as the line does.")],
    data: Annotated[list[Path], typer.Option(help="Labelled dataset folder (repeat for views stored apart).")],
    report: Annotated[Path, typer.Option(help="Folder for metrics.json and the PNG plots.")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the metrics JSON here.")] = None,
    split: Annotated[str | None, typer.Option(help="Only this split (default: every frame).")] = None,
) -> None:
    """Evaluate a model with the live inference code: metrics JSON, ROC/PR, confusion, swelling, worst errors.

    With a model per view, every cell is judged by all of them (worst view wins) and the
    metrics are per cell; each view's own report goes to REPORT/VIEW."""
    from pouchline.models.evaluate import evaluate

    with _clear_errors():
        metrics = evaluate(model, data, report, split=split)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(metrics, indent=2))
    console.print_json(json.dumps(metrics))


@app.command("calibrate")
def calibrate_(
    model: Annotated[list[Path], typer.Argument(help="MODEL.onnx, one per view (say top and side); each one's "
                                                      "metadata JSON gets the new thresholds.")],
    good: Annotated[list[Path], typer.Option(help="Dataset of good cells, every view (repeat for views stored apart); "
                                                  "only cells labelled ok count.")],
    defects: Annotated[list[Path], typer.Option(help="Labelled dataset with defective cells, every view (repeat).")],
    defects_split: Annotated[str | None, typer.Option(help="Split of the defects datasets to use.")] = "val",
    target_frr: Annotated[float, typer.Option(min=0.0001, max=0.5,
                                              help="Share of good cells the line may reject, all flags together.")] = 0.005,
    plot: Annotated[Path | None, typer.Option(help="Also draw each flag's good and defective scores and its "
                                                   "threshold to this PNG.")] = None,
) -> None:
    """Set all views' thresholds together so the whole line's false-reject rate meets the target.

    The budget goes, step by step, to the flag that catches the most more defective cells
    per good cell it rejects."""
    from pouchline.models.calibrate import calibrate

    with _clear_errors():
        result = calibrate(model, good, defects, defects_split=defects_split, target_frr=target_frr, plot=plot)
    console.print_json(json.dumps(result))


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Where the shipped model files and card go.")] = Path("models"),
    work: Annotated[Path, typer.Option(help="Working folder: datasets, training run, evaluation reports.")] = Path(
        "runs/reproduce"
    ),
    epochs: Annotated[int | None, typer.Option(
        min=1, help="The top model's training epochs (default: the shipped 12; the side model trains at most 12).")] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    scale: Annotated[float, typer.Option(min=0.001, max=1.0, help="Shrink the datasets (quick pipeline check).")] = 1.0,
) -> None:
    """Rebuild the shipped detector: synth data, train, export FP32+INT8, evaluate, write the model card."""
    _needs_torch()
    from pouchline.models.reproduce import reproduce as run_reproduce

    with _clear_errors():
        results = run_reproduce(out, work, **({} if epochs is None else {"epochs": epochs}), seed=seed, scale=scale)
    console.print(f"wrote {out}/MODEL_CARD.md (training {results['train_minutes']:.1f} min)")
