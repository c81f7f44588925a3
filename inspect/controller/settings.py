"""Controller settings: a TOML file and the environment (``POUCHLINE_CONTROLLER_*``), validated.

The FastAPI way: one `ControllerSettings` object, built once and handed to the app, and
`get_settings` as the cached dependency. Unknown keys in the file are errors naming the key.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from pouchline.station.config import config_problems, read_toml


class ControllerSettings(BaseSettings):
    """Everything the controller needs to start."""

    model_config = SettingsConfigDict(env_prefix="POUCHLINE_CONTROLLER_", extra="forbid")

    data_dir: Path = Field(Path("pouchline-data"), description="Database (SQLite), image store and secrets live here.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default SQLite in data_dir (postgresql+psycopg://user:pw@host/db for several lines)."
    )
    http: str = Field("127.0.0.1:8300", description="host:port of the API and web UI.")
    verdicts: str = Field("tcp://127.0.0.1:5580", description="ZeroMQ endpoint (ROUTER) inspection services send cell verdicts to.")
    publish: str = Field("tcp://127.0.0.1:5581", description="ZeroMQ PUB endpoint for cell dispositions and lot commands.")
    webhook: str | None = Field(None, description="URL that also receives every cell disposition and lot command (POST JSON).")
    deadline_s: float = Field(3.0, gt=0, le=3600, description="A cell with no verdict this long after capture is rejected "
                                                              "('no_verdict').")
    audit_retention_days: float = Field(30.0, gt=0, description="Images of passed cells sampled for audit are deleted after this.")
    spc_subgroup: int = Field(5, ge=2, le=10, description="Cells per subgroup in the X-bar/R chart of the swelling estimate.")
    spc_rate_subgroup: int = Field(50, ge=10, description="Cells per subgroup in the p-chart of the defect rate.")
    inspection: list[str] = Field(default_factory=list, description="host:port of inspection services' status endpoints, "
                                                                     "for worker health on the dashboard.")
    stations: list[str] = Field(default_factory=list, description="host:port of stations' status endpoints, for the live "
                                                                   "camera view (only these are ever contacted).")
    secret_key: str | None = Field(None, description="Signs session cookies; default: generated once into data_dir.")
    login_attempts_per_minute: int = Field(10, ge=1, description="Failed logins per user name and client before a pause.")

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'controller.db').resolve()}"

    def resolved_secret(self) -> str:
        """The configured secret, or one kept in data_dir (made on first start, mode 600)."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(48))
        return path.read_text().strip()


def load_settings(path: Path | None = None, **overrides: Any) -> ControllerSettings:
    """Settings from ``path`` (TOML), then the environment, then ``overrides``."""
    values = read_toml(path, "controller") if path is not None else {}
    try:
        environment = ControllerSettings()  # what POUCHLINE_CONTROLLER_* variables set wins over the file
        from_env = {name: getattr(environment, name) for name in environment.model_fields_set}
        return ControllerSettings(**{**values, **from_env, **overrides})
    except ValidationError as error:
        raise config_problems(path or "controller settings", error) from error
