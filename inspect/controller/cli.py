"""`pouchline controller ...`: run the line controller, create users and API tokens."""

from __future__ import annotations

import getpass
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pouchline.datasets.cli import fail
from pouchline.station.config import ConfigError

app = typer.Typer(help="Line controller: cell and lot decisions, QA review in the browser, SPC, audit log.",
                  no_args_is_help=True)
console = Console()
ConfigOption = Annotated[Path | None, typer.Option("--config", help="Controller config (TOML); POUCHLINE_CONTROLLER_* "
                                                                     "environment variables override it.")]
DataOption = Annotated[Path | None, typer.Option(help="Data directory (overrides the config).")]


def _settings(config: Path | None, data_dir: Path | None):  # type: ignore[no-untyped-def]
    from pouchline.inspect.controller.settings import load_settings

    try:
        return load_settings(config, **({"data_dir": data_dir} if data_dir else {}))
    except ConfigError as exc:
        raise fail(str(exc)) from exc


@app.command()
def run(config: ConfigOption = None, data_dir: DataOption = None,
        log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO") -> None:
    """Serve the API and web UI, take verdicts, publish decisions, until SIGINT/SIGTERM."""
    import uvicorn

    from pouchline.inspect.controller.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(config, data_dir)
    host, _, port = settings.http.rpartition(":")
    console.print(f"controller on http://{settings.http}/ (verdicts at {settings.verdicts}, decisions on "
                  f"{settings.publish}), data in {settings.data_dir}")
    uvicorn.run(create_app(settings), host=host, port=int(port), log_level=log_level.lower(), access_log=False)


@app.command("create-user")
def create_user(
    name: Annotated[str, typer.Option(help="User name.")],
    role: Annotated[str, typer.Option(help="operator, qa or admin.")] = "admin",
    password: Annotated[str | None, typer.Option(help="Password (default: asked for, not echoed).")] = None,
    config: ConfigOption = None, data_dir: DataOption = None,
) -> None:
    """Add a user (the first admin, typically) straight to the database."""
    from pouchline.inspect.controller.database import Database
    from pouchline.inspect.controller.routers.admin import add_user

    settings = _settings(config, data_dir)
    secret = password if password is not None else getpass.getpass(f"password for {name}: ")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url())
    try:
        db.migrate()
        with db.session() as session:
            add_user(session, name, role, secret, "cli")
    except ValueError as exc:
        raise fail(str(exc)) from exc
    except Exception as exc:  # an existing name is an IntegrityError from the driver
        raise fail(f"user {name!r} not created: {str(exc).splitlines()[0]}") from exc
    finally:
        db.close()
    console.print(f"user {name} ({role}) created")
