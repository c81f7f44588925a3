"""Small HTTP endpoints for stations and inspection services: status, health, commands.

The standard library's threading HTTP server is enough here: a station PC should not need
a web framework to say how its cameras are doing or to accept a trigger from the line.
`EndpointServer` maps paths to handlers; `StatusServer` is the station's set
(`GET /status`, `GET /healthz`, `POST /trigger`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from pouchline.station.service import Station

_MAX_BODY = 4096

#: A reply: status code and a JSON body, a plain-text body (Prometheus metrics), or bytes and their media type.
Reply = tuple[int, dict[str, Any] | str | tuple[bytes, str]]
GetHandler = Callable[..., Reply]  # no argument, or the last path segment for a "/prefix/*" route
PostHandler = Callable[[bytes], Reply]


class TriggerRequest(BaseModel):
    """Body of `POST /trigger`: a cell arrived."""

    model_config = ConfigDict(extra="forbid")

    lot: str | None = Field(None, description="Lot of this cell and the following ones (default: the current lot).")
    cell: str | None = Field(None, description="Cell id from the line (default: the station makes one).")


class EndpointServer:
    """Serves ``get`` and ``post`` handlers on ``host:port`` from a daemon thread."""

    def __init__(self, address: str, get: dict[str, GetHandler], post: dict[str, PostHandler], name: str) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{name} address {address!r} must be host:port")
        self.httpd = ThreadingHTTPServer((host, int(port)), _handler(get, post))
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(get: dict[str, GetHandler], post: dict[str, PostHandler]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
            pass

        def _reply(self, code: int, body: dict[str, Any] | str | tuple[bytes, str]) -> None:
            if isinstance(body, tuple):
                data, media = body
            elif isinstance(body, str):
                data, media = body.encode(), "text/plain; version=0.0.4"
            else:
                data, media = json.dumps(body).encode(), "application/json"
            self.send_response(code)
            self.send_header("Content-Type", media)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            handler = get.get(path) or get.get(path.rsplit("/", 1)[0] + "/*")
            if handler is None:
                self._reply(404, {"detail": f"no such path {self.path}; try {', '.join(sorted(get))}"})
                return
            self._reply(*(handler(path.rsplit("/", 1)[1]) if path not in get else handler()))

        def do_POST(self) -> None:  # noqa: N802
            handler = post.get(self.path)
            if handler is None:
                self._reply(404, {"detail": f"no such path {self.path}; POST to {', '.join(sorted(post))}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._reply(413, {"detail": f"body of {length} bytes; at most {_MAX_BODY}"})
                return
            self._reply(*handler(self.rfile.read(length) or b"{}"))

    return Handler


class StatusServer(EndpointServer):
    """Serves one station's status and triggers on ``host:port``."""

    def __init__(self, address: str, station: Station) -> None:
        self.station = station
        super().__init__(address, {"/status": lambda: (200, station.status()), "/healthz": self._health,
                                   "/live/*": self._live}, {"/trigger": self._trigger}, "station-status")

    def _health(self) -> Reply:
        running = sum(camera.state == "running" for camera in self.station.cameras)
        return 200 if running else 503, {"running_cameras": running, "cameras": len(self.station.cameras)}

    def _live(self, name: str) -> Reply:
        """``GET /live/<camera>.jpg``: the camera's newest frame."""
        camera = next((c for c in self.station.cameras if f"{c.settings.name}.jpg" == name), None)
        if camera is None:
            return 404, {"detail": f"no camera {name!r}; cameras: {[c.settings.name for c in self.station.cameras]}"}
        jpeg = camera.live_jpeg()
        return (200, (jpeg, "image/jpeg")) if jpeg is not None else (503, {"detail": "no frame captured yet"})

    def _trigger(self, body: bytes) -> Reply:
        try:
            request = TriggerRequest.model_validate_json(body)
            opened = self.station.trigger(request.lot, request.cell)
        except (ValidationError, ValueError) as error:
            return 422, {"detail": str(error)}
        return 202, {"cell": opened.cell, "lot": opened.lot, "views": self.station.book.views}
