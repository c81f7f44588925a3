"""The configuration reference, generated from the pydantic models themselves.

`pouchline config-reference --out CONFIG.md` writes it; a test fails when the committed file
and the models disagree, so the reference cannot go stale.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pouchline.inspect.config import InspectConfig
from pouchline.inspect.controller.lotpolicy import LotPolicy
from pouchline.inspect.controller.settings import ControllerSettings
from pouchline.station.config import StationConfig

_PACKAGE = Path(__file__).resolve().parent.parent

#: (title, model, where it lives) in the order the reference lists them.
DOCUMENTS: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("Station", StationConfig, "`station.toml` (`pouchline station run --config`)"),
    ("Inspection service", InspectConfig, "`inspect.toml` (`pouchline inspect run --config`)"),
    ("Line controller", ControllerSettings, "`controller.toml` (`pouchline controller run --config`) and "
                                            "`POUCHLINE_CONTROLLER_<KEY>` environment variables"),
    ("Lot policy", LotPolicy, "a product's `policy` (`PUT /api/v1/products/{name}`)"),
)


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return " / ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple, dict):
        inner = ", ".join(_type(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    factory = field.default_factory
    if factory is not None:
        if getattr(factory, "__name__", "") == "<lambda>":
            return "computed"  # e.g. one worker per usable core: depends on the machine
        value = factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "**required**"
    if isinstance(field.default, Path):  # files shipped in the package: relative to it, not to this machine
        path = field.default
        return f"`{path.relative_to(_PACKAGE)}` (in the package)" if path.is_relative_to(_PACKAGE) else f"`{path}`"
    return f"`{field.default!r}`"


def _nested(annotation: Any) -> list[type[BaseModel]]:
    """The models inside an annotation (a field of a model type, a list of them, a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _nested(arg)]


def _table(model: type[BaseModel], prefix: str, seen: set[type[BaseModel]]) -> list[str]:
    lines = [f"| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{key}` | {_type(field.annotation).replace('|', 'or')} | {_default(field)} | {description} |")
        for sub in _nested(field.annotation):
            if sub not in seen:
                seen.add(sub)
                nested.append((key, sub))
    for key, sub in nested:
        lines += ["", f"**`{key}`** ({sub.__name__}): {(sub.__doc__ or '').strip().splitlines()[0]}", ""]
        lines += _table(sub, f"{key}.", seen)
    return lines


def reference() -> str:
    """The whole reference as Markdown."""
    out = ["# Configuration reference", "",
           "Generated from the pydantic models by `pouchline config-reference`; every model forbids unknown keys.", ""]
    for title, model, where in DOCUMENTS:
        out += [f"## {title}", "", f"{where}. {(model.__doc__ or '').strip().splitlines()[0]}", ""]
        out += _table(model, "", {model})
        out.append("")
    return "\n".join(out)
