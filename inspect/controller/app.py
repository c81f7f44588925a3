"""The controller's FastAPI application: API under /api/v1, health and metrics at the root.

`create_app(settings)` builds it; the `lifespan` starts the `Runtime` (database migrated,
verdict intake and deadline watch running) once and stops it on shutdown, so handlers never
construct anything themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy.exc import DataError
from fastapi.staticfiles import StaticFiles

from pouchline.inspect.controller.auth import LoginLimiter
from pouchline.inspect.controller.deps import get_settings, signer_for
from pouchline.inspect.controller.routers import admin, alarms, cameras, cells, live, lots, session, spc, system
from pouchline.inspect.controller.runtime import Runtime
from pouchline.inspect.controller.settings import ControllerSettings

#: The web UI's files: plain HTML, CSS and JavaScript, served as they are (no CDN, no build step).
WEB = Path(__file__).resolve().parent / "web"


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
    for module in (system, session, lots, cells, alarms, admin, spc, live, cameras):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.middleware("http")
    async def refuse_nul(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """NUL is no character any name or filter has; PostgreSQL cannot even store it."""
        raw = request.scope.get("raw_path", b"") + b"?" + request.scope.get("query_string", b"")
        if b"%00" in raw or b"\x00" in raw:
            return JSONResponse({"detail": "NUL characters are not allowed in URLs"}, status_code=400)
        return await call_next(request)

    @app.exception_handler(DataError)
    async def refuse_data(_: Request, error: DataError) -> JSONResponse:
        """Values the database cannot store (a NUL in a text, a number out of range): the request's fault."""
        return JSONResponse({"detail": f"value not storable: {str(error.orig).splitlines()[0][:200]}"}, status_code=422)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        """The web UI (a single page; it signs in through the API)."""
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    return app
