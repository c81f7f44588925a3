"""Logging in and out of the web UI (session cookies), and who am I."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from pouchline.inspect.controller.auth import SESSION_COOKIE, SESSION_MAX_AGE_S, Principal, verify_password
from pouchline.inspect.controller.deps import DbSession, caller
from pouchline.inspect.controller.ledger import audit
from pouchline.inspect.controller.schema import User

router = APIRouter(prefix="/api/v1/session", tags=["session"])


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class Me(BaseModel):
    name: str
    role: str
    csrf: str = Field(description="Send back as X-CSRF-Token with every change made through the session.")


@router.post("", response_model=Me)
def login(body: Login, request: Request, response: Response, session: DbSession) -> Me:
    limiter = request.app.state.login_limiter
    client = request.client.host if request.client else "?"
    if limiter.blocked(body.name, client):
        raise HTTPException(429, "too many failed logins; wait a minute", headers={"Retry-After": "60"})
    user = session.scalar(select(User).where(User.name == body.name))
    if user is None or user.disabled or not verify_password(user.password_hash, body.password):
        limiter.failed(body.name, client)
        audit(session, body.name, "login_failed", body.name, f"from {client}")
        raise HTTPException(401, "wrong user name or password")
    limiter.succeeded(body.name, client)
    cookie, csrf = request.app.state.signer.issue(user.name)
    response.set_cookie(SESSION_COOKIE, cookie, max_age=SESSION_MAX_AGE_S, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    audit(session, user.name, "login", user.name, f"from {client}")
    return Me(name=user.name, role=user.role, csrf=csrf)


@router.get("", response_model=Me)
def me(who: Annotated[Principal, Depends(caller)]) -> Me:
    return Me(name=who.name, role=who.role, csrf=who.csrf)


@router.delete("", status_code=204)
def logout(response: Response) -> Response:
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.status_code = 204
    return response
