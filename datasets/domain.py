"""Domain knobs: the appearance distribution a synthetic dataset is drawn from.

Training uses the ``default`` domain; ``heldout`` draws every knob where training never
did (film colour, light placement and colour, noise, camera height), so a model's
robustness to a new line can be measured before one exists. Custom domains are JSON files
with the same fields; an unknown key is an error.

A knob is one range ``[low, high]`` or a list of disjoint bands ``[[40, 90], [110, 140]]``:
bands let a training domain span rigs on both sides of a setting it must never see, so a
held-out rig inside the gap tests whether the model learned to ignore that setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FilmColour = Literal["silver", "grey", "black", "blue"]
Lighting = Literal["ring", "bar"]
Range = tuple[float, float]
Knob = Range | list[Range]
# The fields that are knobs (one range or bands); every one is drawn with `draw`.
KNOBS = ("light_intensity", "light_warmth", "ring_radius_mm", "ring_height_mm", "bar_offset_mm", "bar_height_mm",
         "room_light", "camera_height_mm", "exposure", "read_noise", "shot_noise", "blur_sigma_px", "vignetting",
         "belt_grey")


def bands(knob: Knob) -> list[Range]:
    """A knob's ranges as a list: one range is a single band."""
    return [knob] if isinstance(knob, tuple) else knob


def _checked(value: Knob) -> Knob:
    ranges = bands(value)
    if not ranges:
        raise ValueError("a list of bands needs at least one [low, high] range")
    for low, high in ranges:
        if low > high:
            raise ValueError(f"range [{low}, {high}] has its low end above its high end")
    for (_, high), (low, _) in zip(ranges, ranges[1:]):
        if low <= high:
            raise ValueError(f"bands must be in rising order without overlap ({low} is not above {high})")
    return value


def draw(rng: np.random.Generator, knob: Knob) -> float:
    """A value uniform over a range or over the union of its bands. Either takes exactly one
    number from the generator, so a domain that only widens one knob leaves every other
    drawn value of a seed as it was."""
    if isinstance(knob, tuple):
        return float(rng.uniform(knob[0], knob[1]))
    widths = [high - low for low, high in knob]
    position = float(rng.uniform(0.0, sum(widths)))
    for (low, _), width in zip(knob, widths):
        if position <= width:
            return low + position
        position -= width
    return knob[-1][1]


class Domain(BaseModel):
    """Ranges every appearance parameter is drawn from (uniformly) per frame."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Domain name, recorded in every frame's render parameters.")
    films: list[FilmColour] = Field(min_length=1, description="Laminate film colours to draw from.")
    lighting: list[Lighting] = Field(min_length=1, description="Light kinds: 'ring' around the lens, 'bar' to one side.")
    light_intensity: Knob = Field(description="Relative light power (1 = nominal exposure).")
    light_warmth: Knob = Field(description="Colour tint of the light: -1 cool/blue .. +1 warm/amber.")
    ring_radius_mm: Knob = Field(description="Radius of the ring light.")
    ring_height_mm: Knob = Field(description="Height of the ring light above the belt.")
    bar_offset_mm: Knob = Field(description="Horizontal distance of the bar light from the optical axis.")
    bar_height_mm: Knob = Field(description="Height of the bar light above the belt.")
    room_light: Knob = Field(description="Brightness of the room reflected by the foil where the light is not.")
    camera_height_mm: Knob = Field(description="Camera height above the belt (sets px/mm).")
    exposure: Knob = Field(description="Exposure gain applied at the sensor.")
    read_noise: Knob = Field(description="Sensor read-noise standard deviation (fraction of full scale).")
    shot_noise: Knob = Field(description="Photon shot-noise gain (variance per unit of signal).")
    blur_sigma_px: Knob = Field(description="Focus blur (Gaussian sigma, pixels).")
    vignetting: Knob = Field(description="Relative brightness lost in the image corners.")
    jpeg_quality: tuple[int, int] = Field(description="JPEG quality of the stored frame (one range, no bands).")
    label_probability: float = Field(ge=0, le=1, description="Chance a cell carries a printed label/barcode.")
    belt_grey: Knob = Field(description="Belt brightness (matte conveyor background).")
    max_shift_mm: float = Field(ge=0, description="Largest pose offset of the cell from the image centre.")
    max_rotation_deg: float = Field(ge=0, le=45, description="Largest rotation of the cell on the belt.")

    _knobs = field_validator(*KNOBS, "jpeg_quality")(_checked)


BUILTIN_DOMAINS = ("default", "heldout")
# Namespace packages have no importlib.resources reader on 3.11: the data sits beside us.
_DOMAIN_DIR = Path(__file__).with_name("domains")


def load_domain(name_or_path: str) -> Domain:
    """A built-in domain by name, or a domain JSON file by path; errors name the file and field."""
    if name_or_path in BUILTIN_DOMAINS:
        text = (_DOMAIN_DIR / f"{name_or_path}.json").read_text()
        source = f"built-in domain {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"domain {name_or_path!r} is neither a built-in ({', '.join(BUILTIN_DOMAINS)}) nor a JSON file"
            )
        text, source = path.read_text(), str(path)
    try:
        return Domain.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    except ValidationError as exc:
        problems = "; ".join(f"field '{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
        raise ValueError(f"{source}: {problems}") from exc
