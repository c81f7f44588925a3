"""`pouchline station ...`: run a station, make CurveZMQ keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pouchline.datasets.cli import fail
from pouchline.station.config import ConfigError, load_config

app = typer.Typer(help="Camera stations: capture cells and stream their frames to inspection workers.",
                  no_args_is_help=True)
console = Console()


@app.command()
def run(
    config: Annotated[Path, typer.Option(help="Station config (TOML): cameras, sources, endpoints, keys.")],
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run a station until SIGINT/SIGTERM (or until its sources end, with exit_when_done)."""
    from pouchline.station.service import Station

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        station = Station(load_config(config)).start()
    except (ConfigError, ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"station serving frames at {station.server.endpoint}"
                  + (f", status at http://{station.status_server.address}/status" if station.status_server else ""))
    station.wait()
    final = station.stop()
    console.print_json(json.dumps({"transport": final["transport"], "cameras": final["cameras"],
                                   "alarms": final["alarms"]["counts"]}))


@app.command()
def keys(
    out: Annotated[Path, typer.Option(help="Folder for the certificates.")],
    name: Annotated[str, typer.Option(help="Certificate name: the station's or a worker's.")],
) -> None:
    """Make a CurveZMQ key pair: NAME.key (public: hand it out) and NAME.key_secret (keep it)."""
    from pouchline.station.curve import create_keys

    try:
        public, secret = create_keys(out, name)
    except (ValueError, FileExistsError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"public key {public} (copy to the peer), secret key {secret} (stays here, mode 600)")
