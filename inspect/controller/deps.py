"""FastAPI dependencies: settings, the runtime, and who is calling with which rights.

`caller` authenticates (bearer API token, else session cookie) and `require(role)` also
checks the role and, for a state-changing request authenticated by cookie, the CSRF token.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pouchline.inspect.controller.auth import SESSION_COOKIE, Principal, Role, SessionSigner, token_digest
from pouchline.inspect.controller.runtime import Runtime
from pouchline.inspect.controller.schema import ApiToken, User
from pouchline.inspect.controller.settings import ControllerSettings, load_settings

_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: Largest row number or id a request may name (64-bit databases; larger values are refused, not overflowed).
_MAX_ROW = 2**53
T = TypeVar("T")


@lru_cache
def get_settings() -> ControllerSettings:
    """The settings from the environment (the app factory overrides this with its own)."""
    return load_settings()


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_session(runtime: Annotated[Runtime, Depends(get_runtime)]):  # type: ignore[no-untyped-def]
    with runtime.db.session() as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def caller(request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]) -> Principal:
    """The authenticated caller, or 401."""
    token = _bearer(request)
    with runtime.db.session() as session:
        if token is not None:
            row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == token_digest(token)))
            if row is None:
                raise HTTPException(401, "unknown API token", headers={"WWW-Authenticate": "Bearer"})
            row.last_used_at = datetime.now(UTC)
            return Principal(row.name, row.role, "token", scopes=tuple(row.scopes))  # type: ignore[arg-type]
        cookie = request.cookies.get(SESSION_COOKIE)
        found = None if cookie is None else request.app.state.signer.read(cookie)
        if found is None:
            raise HTTPException(401, "log in or send an API token", headers={"WWW-Authenticate": "Bearer"})
        user = session.scalar(select(User).where(User.name == found[0]))
        if user is None or user.disabled:
            raise HTTPException(401, "this account no longer exists or is disabled")
        return Principal(user.name, user.role, "session", csrf=found[1])  # type: ignore[arg-type]


def require(role: Role) -> Callable[..., Any]:
    """A dependency: the caller has at least ``role``; cookie-authenticated changes carry the CSRF token."""

    async def check(request: Request, who: Annotated[Principal, Depends(caller)]) -> Principal:
        if not who.allows(role):
            raise HTTPException(403, f"needs the {role} role; {who.name} is {who.role}")
        if who.via == "token" and request.method not in _SAFE_METHODS and "write" not in who.scopes:
            raise HTTPException(403, f"token {who.name} is read-only (scopes: {', '.join(who.scopes) or 'none'})")
        if who.via == "session" and request.method not in _SAFE_METHODS:
            sent = request.headers.get("x-csrf-token")
            if sent is None and request.headers.get("content-type", "").startswith(
                    ("application/x-www-form-urlencoded", "multipart/form-data")):
                sent = (await request.form()).get("csrf")  # type: ignore[assignment]
            if not sent or sent != who.csrf:
                raise HTTPException(403, "missing or wrong CSRF token")
        return who

    return check


Operator = Annotated[Principal, Depends(require("operator"))]
QA = Annotated[Principal, Depends(require("qa"))]
Admin = Annotated[Principal, Depends(require("admin"))]


class Page(BaseModel, Generic[T]):
    """A page of a list: ``items`` from ``offset``, ``total`` matching the filters."""

    items: list[T]
    total: int = Field(description="Items matching the filters, all pages.")
    limit: int
    offset: int


class Paging(BaseModel):
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=_MAX_ROW)


def paging(limit: Annotated[int, Query(ge=1, le=500)] = 50,
           offset: Annotated[int, Query(ge=0, le=_MAX_ROW)] = 0) -> Paging:
    return Paging(limit=limit, offset=offset)


Pages = Annotated[Paging, Depends(paging)]


def page(session: Session, query: Select[Any], pages: Paging, *order: Any) -> tuple[list[Any], int]:
    """One page of ``query`` in ``order`` (rows: entities, or tuples for a multi-entity select) and the total."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    result = session.execute(query.order_by(*order).limit(pages.limit).offset(pages.offset))
    rows = result.all() if len(query.column_descriptions) > 1 else result.scalars().all()
    return list(rows), total


def signer_for(settings: ControllerSettings) -> SessionSigner:
    return SessionSigner(settings.resolved_secret())
