"""`pouchline inspect ...`: run inspection workers, reload their model, read their status."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pouchline.datasets.cli import fail
from pouchline.models.metadata import ModelError
from pouchline.station.config import ConfigError

app = typer.Typer(help="Inspection workers: the ONNX detector on the live stream, one verdict per cell.",
                  no_args_is_help=True)
console = Console()


@app.command()
def run(
    config: Annotated[Path, typer.Option(help="Inspection config (TOML): stations, model, batching, sinks.")],
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (overrides the config).")] = None,
    duration: Annotated[float | None, typer.Option(min=0, help="Stop after this many seconds (default: on SIGINT/SIGTERM).")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run N inspection workers and the collector until SIGINT/SIGTERM."""
    from pouchline.inspect.config import load_inspect_config
    from pouchline.inspect.service import InspectService

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_inspect_config(config)
        if workers is not None:
            settings = settings.model_copy(update={"workers": workers})
        service = InspectService(settings).start()
    except (ConfigError, ModelError, FileNotFoundError, ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    where = f", status at http://{service.http.address}/status" if service.http else ""
    console.print(f"inspecting frames from {', '.join(settings.stations)} with {len(service.names)} workers{where}")
    service.wait(duration_s=duration)
    final = service.stop()
    console.print_json(json.dumps(final))


def _post(address: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://{address}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise fail(f"{address}{path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
    except OSError as exc:
        raise fail(f"{address}: no inspection service answers ({exc})") from exc


@app.command()
def reload(
    address: Annotated[str, typer.Option(help="host:port of the service's HTTP endpoint.")] = "127.0.0.1:8201",
    model: Annotated[Path | None, typer.Option(help="Switch to this model file (default: load the current one again).")] = None,
) -> None:
    """Load a new model version in every worker without dropping a frame."""
    answer = _post(address, "/reload", {} if model is None else {"model": str(model.resolve())})
    console.print_json(json.dumps(answer))


@app.command()
def status(
    address: Annotated[str, typer.Option(help="host:port of the service's HTTP endpoint.")] = "127.0.0.1:8201",
) -> None:
    """Print the service's status: workers, cells, reject reasons, latency."""
    try:
        with urllib.request.urlopen(f"http://{address}/status", timeout=10) as reply:
            console.print_json(reply.read().decode())
    except OSError as exc:
        raise fail(f"{address}: no inspection service answers ({exc})") from exc
