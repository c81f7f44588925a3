"""The controller's FastAPI application: API under /api/v1, health and metrics at the root.

`create_app(settings)` builds it; the `lifespan` starts the `Runtime` (database migrated,
verdict intake and deadline watch running) once and stops it on shutdown, so handlers never
construct anything themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pouchline.inspect.controller.auth import LoginLimiter
from pouchline.inspect.controller.deps import get_settings, signer_for
from pouchline.inspect.controller.routers import admin, alarms, cells, lots, session, system
from pouchline.inspect.controller.runtime import Runtime
from pouchline.inspect.controller.settings import ControllerSettings


def create_app(settings: ControllerSettings) -> FastAPI:
    """The app for ``settings``; the runtime starts when the server does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = Runtime(settings)
        try:
            yield
        finally:
            app.state.runtime.close()

    app = FastAPI(title="pouchline line controller", version="1", lifespan=lifespan,
                  description="Cell and lot decisions from inspection verdicts, QA review, SPC, audit log.")
    app.state.settings = settings
    app.state.signer = signer_for(settings)
    app.state.login_limiter = LoginLimiter(settings.login_attempts_per_minute)
    app.dependency_overrides[get_settings] = lambda: settings
    for module in (system, session, lots, cells, alarms, admin):
        app.include_router(module.router)
    return app
