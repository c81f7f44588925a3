"""The `pouchline` command: one entry point, a sub-command group per part of the system."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pouchline.datasets.cli import app as dataset_app
from pouchline.datasets.cli import fail
from pouchline.inspect.benchreport import BenchReport
from pouchline.inspect.controller.cli import app as controller_app
from pouchline.inspect.inspectcli import app as inspect_app
from pouchline.models.cli import app as model_app
from pouchline.models.metadata import ModelError
from pouchline.station.cli import app as station_app

app = typer.Typer(
    name="pouchline",
    help="Vision inspection for lithium pouch-cell lines: datasets, detector, stations, inspection, controller.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"pouchline {metadata.version('pouchline')}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Vision inspection for lithium pouch-cell production lines."""


bench_app = typer.Typer(help="Benchmarks: a table on the terminal and a JSON report.", no_args_is_help=True)


def _show(report: BenchReport, json_path: Path | None) -> None:
    report.print(console)
    if json_path is not None:
        report.save(json_path)
        console.print(f"wrote {json_path}")


@bench_app.command("synth")
def bench_synth(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here.")] = None,
    frames: Annotated[int, typer.Option(min=20, help="Frames per case.")] = 400,
    workers: Annotated[int, typer.Option(min=1, help="Processes for the pool case.")] = 2,
) -> None:
    """Renderer speed: 640x480 top-view frames/s on one core (figure `frames_per_s_1core`)."""
    from pouchline.datasets.bench import run

    report = run(frames=frames, workers=workers)
    _show(report, json_path)


@bench_app.command("transport")
def bench_transport(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here.")] = None,
    frames: Annotated[int, typer.Option(min=20, help="JPEG frames per saturation case.")] = 3000,
    raw_frames: Annotated[int, typer.Option(min=10, help="Raw frames per saturation case.")] = 300,
    rate: Annotated[float, typer.Option(min=1, help="Offered frames/s in the paced (latency) cases.")] = 60.0,
    paced_frames: Annotated[int, typer.Option(min=10, help="Frames per paced case (p99 needs a few hundred).")] = 600,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per case, the systems taking turns; the median run is reported (frames/s at saturation, p99 paced).")] = 3,
) -> None:
    """pouchline vs imagezmq REQ/REP and PUB/SUB on 1080p JPEG and raw (ratio `fps_vs_imagezmq_reqrep_jpeg`)."""
    try:
        import imagezmq  # noqa: F401
    except ImportError as exc:
        raise fail("bench transport compares against imagezmq: pip install 'pouchline[bench]'") from exc
    from pouchline.station.bench import run

    report = run(frames=frames, raw_frames=raw_frames, paced_frames=paced_frames, rate=rate, repeats=repeats)
    _show(report, json_path)


_SHIPPED = Path(__file__).resolve().parent.parent / "models" / "pouchline-detector"


@bench_app.command("model")
def bench_model(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here.")] = None,
    model: Annotated[Path, typer.Option(help="FP32 ONNX model.")] = _SHIPPED.with_suffix(".onnx"),
    int8: Annotated[Path, typer.Option(help="INT8 ONNX model.")] = _SHIPPED.with_suffix(".int8.onnx"),
    weights: Annotated[Path, typer.Option(help="The same weights for PyTorch eager (.pt).")] = _SHIPPED.with_suffix(".pt"),
    frames: Annotated[int, typer.Option(min=32, help="Fresh synthetic frames for the accuracy columns.")] = 600,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved throughput runs per runtime; the median is reported.")] = 5,
    seconds: Annotated[float, typer.Option(min=0.05, help="Length of each throughput run.")] = 1.0,
) -> None:
    """PyTorch eager vs onnxruntime FP32 vs INT8: latency, throughput, accuracy (ratio `ort_int8_vs_torch_throughput`)."""
    from pouchline.models.bench import run

    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise fail("bench model compares against PyTorch eager: pip install torch==2.13.0 first") from exc
    try:
        report = run(model, int8, weights, frames=frames, rounds=rounds, seconds=seconds)
    except (ModelError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    _show(report, json_path)


@bench_app.command("pipeline")
def bench_pipeline(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here.")] = None,
    frames: Annotated[int, typer.Option(min=50, help="Frames in the saturation case.")] = 2000,
    paced_frames: Annotated[int, typer.Option(min=50, help="Frames in the paced (latency) case.")] = 900,
    rate: Annotated[float, typer.Option(min=1, help="Offered frames/s in the paced case.")] = 60.0,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (and floor processes).")] = 2,
    floor_seconds: Annotated[float, typer.Option(min=1, help="Duration of the floor measurement.")] = 10.0,
    max_batch: Annotated[int, typer.Option(min=1, help="Micro-batch size.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Micro-batch wait.")] = 2.0,
    model: Annotated[Path, typer.Option(help="ONNX model.")] = _SHIPPED.with_suffix(".int8.onnx"),
) -> None:
    """Synthetic station -> transport -> workers -> verdicts vs the in-process floor (ratio `throughput_vs_floor`)."""
    from pouchline.inspect.config import BatchSettings
    from pouchline.inspect.pipelinebench import run

    try:
        report = run(frames=frames, paced_frames=paced_frames, rate=rate, workers=workers, floor_s=floor_seconds,
                     model=model, batching=BatchSettings(max_batch=max_batch, max_wait_ms=max_wait_ms))
    except (ModelError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    _show(report, json_path)


app.add_typer(dataset_app, name="dataset")
app.add_typer(model_app, name="model")
app.add_typer(station_app, name="station")
app.add_typer(inspect_app, name="inspect")
app.add_typer(controller_app, name="controller")
app.add_typer(bench_app, name="bench")


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Each run keeps its database and images in a new directory here.")] = Path("pouchline-demo"),
    duration: Annotated[float | None, typer.Option(min=1, help="Run headless this long (s), then print a summary.")] = None,
    stations: Annotated[int, typer.Option(min=1, max=8, help="Synthetic stations (a top and a side camera each).")] = 2,
    cells_per_s: Annotated[float, typer.Option(min=0.5, max=50, help="Cells per second per station.")] = 5.0,
    drift_after: Annotated[float, typer.Option(min=0, help="Seconds before the drifting supplier batch arrives.")] = 20.0,
    http: Annotated[str, typer.Option(help="host:port of the web UI and API.")] = "127.0.0.1:8300",
    workers: Annotated[int | None, typer.Option(min=1, help="Inspection worker processes (default: one per core).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the final summary here.")] = None,
) -> None:
    """A whole line on this machine: controller + web UI, inspection workers, synthetic stations."""
    import json

    from pouchline.inspect.demo import DemoOptions, run

    options = DemoOptions(data_dir=data_dir, stations=stations, cells_per_s=cells_per_s, drift_after_s=drift_after,
                          http=http, workers=workers)
    try:
        summary = run(options, duration, console)
    except (RuntimeError, OSError, ModelError) as exc:
        raise fail(str(exc)) from exc
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"wrote {json_path}")


@app.command()
def replay(
    data: Annotated[Path, typer.Argument(help="Recorded dataset folder.")],
    speed: Annotated[str, typer.Option(help="1 = the recorded timing, N = N times faster, max = as fast as workers take it.")] = "1",
    bind: Annotated[str, typer.Option(help="Endpoint inspection workers connect to (the replay serves frames there, "
                                           "like a station).")] = "tcp://127.0.0.1:5555",
    status: Annotated[str | None, typer.Option(help="host:port of the replay's status endpoint.")] = None,
    loop: Annotated[bool, typer.Option(help="Start again after the last record.")] = False,
) -> None:
    """Publish a recorded dataset through the same transport as a live station."""
    from pouchline.datasets.manifest import DatasetError, DatasetReader
    from pouchline.station.config import ConfigError, StationConfig
    from pouchline.station.service import Station

    fast = speed == "max"
    try:
        DatasetReader(data)  # a missing or broken dataset fails here, naming the problem, not in a retry loop
        factor = 1.0 if fast else float(speed)
        config = StationConfig.model_validate({
            "name": "replay", "bind": bind, "status": status, "exit_when_done": not loop,
            "cameras": [{"name": "replay", "cells": "source", "source": {"kind": "replay", "path": str(data),
                                                                         "speed": factor, "fast": fast, "loop": loop}}],
        })
        station = Station(config).start()
    except (ValueError, ConfigError, OSError, DatasetError) as exc:
        raise fail(f"replay {data}: {exc}") from exc
    console.print(f"replaying {data} at {speed}x on {station.server.endpoint}; point inspection workers there")
    station.wait()
    final = station.stop()
    console.print(f"replayed {final['cameras']['replay'].get('sent', 0)} frames")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Labelled dataset folder (recorded or synthetic).")],
    report: Annotated[Path, typer.Option(help="Report folder: report.html, evaluation.json, plots.")],
    model: Annotated[Path, typer.Option(help="ONNX model.")] = _SHIPPED.with_suffix(".int8.onnx"),
    compare: Annotated[Path | None, typer.Option(help="A second model: the cells the two disagree on, side by side.")] = None,
    policy: Annotated[Path | None, typer.Option(help="Lot policy JSON (a product's `policy`); default threshold policy.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Inspection worker processes.")] = None,
) -> None:
    """Replay a labelled dataset through the real pipeline and score it (recall, precision, false rejects, lots, latency)."""
    from pydantic import ValidationError

    from pouchline.datasets.manifest import DatasetError
    from pouchline.inspect.controller.lotpolicy import LotPolicy
    from pouchline.inspect.evaluation import evaluate_pipeline

    try:
        lot_policy = LotPolicy.model_validate_json(policy.read_text()) if policy else None
        summary = evaluate_pipeline(data, model, report, compare=compare, policy=lot_policy, workers=workers)
    except (DatasetError, ModelError, ValidationError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    for run in summary["runs"]:
        metrics = run["metrics"]
        console.print(f"[bold]{Path(run['model']).name}[/bold]: " + ", ".join(
            f"{name} recall {metrics[name]['recall']:.4f}" for name in ("swollen", "deformed") if name in metrics)
            + f", false-reject rate {metrics.get('false_reject_rate', float('nan')):.4f}, "
              f"p99 {metrics['latency_ms'].get('p99', float('nan')):.0f} ms")
    if "disagreements" in summary:
        console.print(f"{len(summary['disagreements'])} cells where the models disagree")
    console.print(f"wrote {report / 'report.html'}")


@app.command("config-reference")
def config_reference(
    out: Annotated[Path | None, typer.Option(help="Write the Markdown here (default: print it).")] = None,
) -> None:
    """The configuration reference of stations, inspection, controller and lot policies, from their models."""
    from pouchline.inspect.configdocs import reference

    text = reference()
    if out is None:
        print(text)
    else:
        out.write_text(text)
        console.print(f"wrote {out}")


def main() -> None:
    """Console-script entry point."""
    app()
