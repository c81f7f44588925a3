"""`pouchline dataset ...`: make, inspect, check and import datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pouchline.datasets.domain import BUILTIN_DOMAINS, load_domain
from pouchline.datasets.importer import import_dataset
from pouchline.datasets.manifest import DatasetError
from pouchline.datasets.records import DEFORMATION_KINDS
from pouchline.datasets.render import VIEWS
from pouchline.datasets.scene import COSMETIC_RATE
from pouchline.datasets.sheet import contact_sheet
from pouchline.datasets.spec import CellSpec
from pouchline.datasets.summary import render_summary, summarize
from pouchline.datasets.synth import SynthConfig, default_workers, synthesize
from pouchline.datasets.validate import validate_dataset

app = typer.Typer(help="Make, inspect, check and import datasets.", no_args_is_help=True)
console = Console()
#: Soft wrap: an error names a file, line and field, and a line break inside a path would
#: keep it from being copied (the terminal wraps long lines itself).
errors = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """Print a clear error (what, where) and give the exit to raise."""
    errors.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    return typer.Exit(2)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not WIDTHxHEIGHT, e.g. 640x480") from exc
    return width, height


def _spec(path: Path | None) -> CellSpec:
    if path is None:
        return CellSpec()
    try:
        return CellSpec.model_validate_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise fail(f"{path}: {exc}") from exc


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Dataset folder to create.")],
    count: Annotated[int, typer.Option(min=1, help="Number of cells.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed: with the cell index it fixes every frame.")] = 0,
    view: Annotated[str, typer.Option(help="top, side, or both (two frames per cell).")] = "top",
    size: Annotated[str, typer.Option(help="Frame size WIDTHxHEIGHT.")] = "640x480",
    defect_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of defective cells.")] = 0.3,
    domain: Annotated[str, typer.Option(help=f"Appearance domain: {', '.join(BUILTIN_DOMAINS)} or a JSON file.")] = "default",
    kinds: Annotated[str, typer.Option(help="Comma-separated deformation kinds to draw from.")] = ",".join(DEFORMATION_KINDS),
    cosmetic_rate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of good cells with one in-spec cosmetic mark.")
    ] = COSMETIC_RATE,
    spec: Annotated[Path | None, typer.Option(help="Cell spec JSON (default: the built-in PL-5060100).")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Render processes; 0 = one per CPU.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run with the same settings.")] = False,
) -> None:
    """Render a synthetic pouch-cell dataset with exact ground truth."""
    views = VIEWS if view == "both" else (view,)
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    try:
        config = SynthConfig(
            count=count, seed=seed, views=views, size=_size(size), defect_rate=defect_rate,
            domain=load_domain(domain), spec=_spec(spec), kinds=chosen, cosmetic_rate=cosmetic_rate,
        )
        unknown = set(chosen) - set(DEFORMATION_KINDS)
        if unknown:
            raise ValueError(f"--kinds: unknown kind(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFORMATION_KINDS)}")
        result = synthesize(out, config, workers=workers or default_workers(), resume=resume)
    except (ValueError, DatasetError) as exc:
        raise fail(str(exc)) from exc
    note = f" ({result.skipped} already there)" if result.skipped else ""
    console.print(f"wrote {result.frames} frames of {result.cells} cells to {out}{note}")


@app.command()
def info(
    root: Annotated[Path, typer.Argument(help="Dataset folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Counts per label and split, severity histograms."""
    try:
        summary = summarize(root)
    except DatasetError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        console.print_json(json.dumps(summary))
    else:
        render_summary(summary, console)


@app.command()
def sheet(
    root: Annotated[Path, typer.Argument(help="Dataset folder.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    count: Annotated[int, typer.Option(min=1, help="Frames on the sheet.")] = 48,
    columns: Annotated[int, typer.Option(min=1, help="Tiles per row.")] = 8,
    tile_width: Annotated[int, typer.Option(min=64, help="Tile width in pixels.")] = 240,
) -> None:
    """A labelled contact sheet covering every label and defect kind."""
    try:
        shown = contact_sheet(root, out, count=count, columns=columns, tile_width=tile_width)
    except (DatasetError, ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"wrote {out} ({shown} frames)")


@app.command("import")
def import_(
    src: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class, or a CSV (path,label[,...]).")],
    out: Annotated[Path, typer.Option(help="Dataset folder to create.")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the output folder's).")] = None,
    labels: Annotated[str | None, typer.Option(help="Comma-separated class names, in order; others are errors.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable and non-image files (listed) instead of failing.")] = False,
) -> None:
    """Import aligned single-cell crops from another vision system (grayscale or colour)."""
    try:
        result = import_dataset(
            src, out, name=name, labels=labels.split(",") if labels else None, skip_bad=skip_bad
        )
    except DatasetError as exc:
        raise fail(str(exc)) from exc
    console.print(f"imported {result.records} images in classes {', '.join(result.classes)} into {out}")
    for skipped in result.skipped:
        console.print(f"[yellow]skipped[/yellow] {skipped}")


@app.command()
def validate(
    root: Annotated[Path, typer.Argument(help="Dataset folder.")],
    quick: Annotated[bool, typer.Option(help="Check the manifest only, not the image files.")] = False,
) -> None:
    """Check every record, image, checksum and mask; errors name file, line and field."""
    report = validate_dataset(root, check_images=not quick)
    for warning in report.warnings:
        errors.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    for error in report.errors:
        errors.print(f"[red]error:[/red] {error}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)
    console.print(f"{root}: {report.records} records, all valid")


@app.command()
def record(
    connect: Annotated[list[str], typer.Option(help="Station endpoint, e.g. tcp://10.0.0.5:5555 (repeat for several).")],
    out: Annotated[Path, typer.Option(help="Dataset folder (created, or appended to).")],
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many frames.")] = None,
    duration: Annotated[float | None, typer.Option(min=0.1, help="Stop after this many seconds.")] = None,
    idle: Annotated[float | None, typer.Option(min=0.1, help="Stop after this many seconds without a frame.")] = None,
    secret_key: Annotated[Path | None, typer.Option(help="CurveZMQ: this recorder's .key_secret.")] = None,
    server_key: Annotated[Path | None, typer.Option(help="CurveZMQ: the station's public .key.")] = None,
) -> None:
    """Record a live station stream into the dataset format (crash-safe append; Ctrl-C stops)."""
    from pouchline.datasets.record import record as run_record
    from pouchline.station.curve import CurveClientConfig

    if (secret_key is None) != (server_key is None):
        raise fail("CurveZMQ needs both --secret-key and --server-key")
    curve = CurveClientConfig(secret_key=secret_key, server_key=server_key) if secret_key and server_key else None
    try:
        result = run_record(connect, out, count=count, duration_s=duration, idle_s=idle, curve=curve)
    except (DatasetError, ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"recorded {result.frames} frames into {out} in {result.seconds:.1f} s; counts {json.dumps(result.counts)}")
