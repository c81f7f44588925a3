"""The `pouchline` command: one entry point, a sub-command group per part of the system."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pouchline.datasets.cli import app as dataset_app
from pouchline.datasets.cli import fail

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


def _not_built(group: str, issue: int, what: str) -> typer.Typer:
    """A group a later issue fills: its help says so, and running it fails clearly."""
    sub = typer.Typer(help=f"{what} (not built yet: issue #{issue})", invoke_without_command=True)

    @sub.callback()
    def placeholder() -> None:
        raise fail(f"`pouchline {group}` is not built yet (issue #{issue}: {what})")

    return sub


bench_app = typer.Typer(help="Benchmarks: a table on the terminal and a JSON report.", no_args_is_help=True)


@bench_app.command("synth")
def bench_synth(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here.")] = None,
    frames: Annotated[int, typer.Option(min=20, help="Frames per case.")] = 400,
    workers: Annotated[int, typer.Option(min=1, help="Processes for the pool case.")] = 2,
) -> None:
    """Renderer speed: 640x480 top-view frames/s on one core (figure `frames_per_s_1core`)."""
    from pouchline.datasets.bench import run

    report = run(frames=frames, workers=workers)
    report.print(console)
    if json_path is not None:
        report.save(json_path)
        console.print(f"wrote {json_path}")


for _name, _issue, _what in (
    ("model", 3, "defect detector: train, export to ONNX, INT8, evaluate"),
    ("transport", 4, "ZeroMQ transport against imagezmq"),
    ("pipeline", 5, "stations -> transport -> workers -> verdicts"),
):
    bench_app.add_typer(_not_built(f"bench {_name}", _issue, _what), name=_name)

app.add_typer(dataset_app, name="dataset")
app.add_typer(_not_built("model", 3, "defect detector: train, export to ONNX, INT8, evaluate"), name="model")
app.add_typer(_not_built("station", 4, "camera stations and the ZeroMQ frame transport"), name="station")
app.add_typer(_not_built("inspect", 5, "inspection workers running the ONNX detector"), name="inspect")
app.add_typer(_not_built("controller", 6, "line controller and QA review in the browser"), name="controller")
app.add_typer(bench_app, name="bench")
app.add_typer(_not_built("demo", 7, "one command runs a whole line"), name="demo")


def main() -> None:
    """Console-script entry point."""
    app()
