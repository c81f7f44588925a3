"""Live camera views: the configured stations' newest frames, proxied (no browser talks to a station)."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, HTTPException, Response

from pouchline.inspect.controller.deps import Operator, get_settings
from pouchline.inspect.controller.settings import ControllerSettings

router = APIRouter(prefix="/api/v1/cameras", tags=["cameras"])
Settings = Annotated[ControllerSettings, Depends(get_settings)]


def _status(address: str) -> dict[str, Any] | None:
    try:
        return httpx.get(f"http://{address}/status", timeout=1.0).json()
    except (httpx.HTTPError, ValueError):
        return None


@router.get("")
def cameras(settings: Settings, _: Operator) -> list[dict[str, Any]]:
    """Each configured station, reachable or not, with its cameras' state and frame rate."""
    found = []
    for address in settings.stations:
        status = _status(address)
        if status is None:
            found.append({"address": address, "reachable": False, "station": None, "cameras": []})
            continue
        found.append({"address": address, "reachable": True, "station": status.get("station"),
                      "cameras": [{"name": name, "state": cam.get("state"), "fps": cam.get("fps")}
                                  for name, cam in (status.get("cameras") or {}).items()]})
    return found


@router.get("/{station}/{camera}.jpg", response_class=Response)
def live_frame(station: str, camera: str, settings: Settings, _: Operator) -> Response:
    """The camera's newest frame as JPEG, fetched from its station now."""
    for address in settings.stations:
        status = _status(address)
        if status is not None and status.get("station") == station:
            if camera not in (status.get("cameras") or {}):
                raise HTTPException(404, f"station {station} has no camera {camera!r}")
            try:
                reply = httpx.get(f"http://{address}/live/{camera}.jpg", timeout=2.0)
            except httpx.HTTPError as error:
                raise HTTPException(502, f"station {station} did not answer: {error}") from error
            if reply.status_code != 200:
                raise HTTPException(503, f"station {station}: no frame from {camera} yet")
            return Response(reply.content, media_type="image/jpeg", headers={"Cache-Control": "no-store"})
    raise HTTPException(404, f"no configured station {station!r}")
