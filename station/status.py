"""The station's small HTTP endpoint: `GET /status`, `GET /healthz`, `POST /trigger`.

The standard library's threading HTTP server is enough here: a station PC should not need
a web framework to say how its cameras are doing or to accept a trigger from the line.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from pouchline.station.service import Station

_MAX_BODY = 4096


class TriggerRequest(BaseModel):
    """Body of `POST /trigger`: a cell arrived."""

    model_config = ConfigDict(extra="forbid")

    lot: str | None = Field(None, description="Lot of this cell and the following ones (default: the current lot).")
    cell: str | None = Field(None, description="Cell id from the line (default: the station makes one).")


class StatusServer:
    """Serves one station's status and triggers on ``host:port``."""

    def __init__(self, address: str, station: Station) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"status address {address!r} must be host:port")
        self.station = station
        self.httpd = ThreadingHTTPServer((host, int(port)), self._handler())
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="station-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        station = self.station

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/status":
                    self._reply(200, station.status())
                elif self.path == "/healthz":
                    running = sum(camera.state == "running" for camera in station.cameras)
                    self._reply(200 if running else 503, {"running_cameras": running, "cameras": len(station.cameras)})
                else:
                    self._reply(404, {"detail": f"no such path {self.path}; try /status, /healthz or POST /trigger"})

            def do_POST(self) -> None:  # noqa: N802
                if self.path != "/trigger":
                    self._reply(404, {"detail": f"no such path {self.path}"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY:
                    self._reply(413, {"detail": f"body of {length} bytes; at most {_MAX_BODY}"})
                    return
                try:
                    request = TriggerRequest.model_validate_json(self.rfile.read(length) or b"{}")
                    opened = station.trigger(request.lot, request.cell)
                except (ValidationError, ValueError) as error:
                    self._reply(422, {"detail": str(error)})
                    return
                self._reply(202, {"cell": opened.cell, "lot": opened.lot, "views": station.book.views})

        return Handler
