"""Who is asking: users with roles (browser sessions) and API tokens (machines).

- Passwords: Argon2id (argon2-cffi's defaults), rehashed when the parameters move on.
- Sessions: an HttpOnly, SameSite=Strict cookie holding ``user|issued|csrf`` signed with
  HMAC-SHA256; a state-changing request that authenticates by cookie must echo the csrf
  value in ``X-CSRF-Token`` (or a ``csrf`` form field): another site's form cannot.
- API tokens: ``plt_`` + 32 random bytes, shown once; only their SHA-256 is stored. A token
  has a role and scopes; requests with a bearer token need no CSRF token (no ambient
  credential is involved).
- Roles are ordered: operator (view) < qa (review, override) < admin (users, products, policies).
- Failed logins are limited per user name and client address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

Role = Literal["operator", "qa", "admin"]
ROLES: tuple[Role, ...] = ("operator", "qa", "admin")
SESSION_COOKIE = "pouchline_session"
SESSION_MAX_AGE_S = 12 * 3600  # one shift and a half
TOKEN_PREFIX = "plt_"

_hasher = PasswordHasher()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: Role
    via: Literal["session", "token"]
    csrf: str = ""  # the session's CSRF value (sessions only)
    scopes: tuple[str, ...] = ()

    def allows(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    return _hasher.hash(password)


def verify_password(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> tuple[str, str]:
    """A fresh API token and the SHA-256 that is stored in its place."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_digest(token)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionSigner:
    """Signed session cookies: ``base64(user|issued|csrf).signature``."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(("pouchline-session:" + secret).encode()).digest()

    def issue(self, user: str, now: float | None = None) -> tuple[str, str]:
        """A cookie value for ``user`` and its CSRF value."""
        csrf = secrets.token_urlsafe(24)
        body = base64.urlsafe_b64encode(f"{user}|{int(now or time.time())}|{csrf}".encode()).decode()
        return f"{body}.{self._sign(body)}", csrf

    def read(self, cookie: str, now: float | None = None) -> tuple[str, str] | None:
        """(user, csrf) from a valid, unexpired cookie; None otherwise."""
        body, _, signature = cookie.partition(".")
        if not body or not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            user, issued, csrf = base64.urlsafe_b64decode(body.encode()).decode().split("|")
            age = (now or time.time()) - int(issued)
        except (ValueError, UnicodeDecodeError):
            return None
        return (user, csrf) if 0 <= age <= SESSION_MAX_AGE_S else None

    def _sign(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()


class LoginLimiter:
    """At most ``per_minute`` failed logins per (user name, client) in any minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def blocked(self, user: str, client: str, now: float | None = None) -> bool:
        now = now or time.monotonic()
        with self._lock:
            recent = self._failures[(user, client)]
            while recent and now - recent[0] > 60:
                recent.popleft()
            return len(recent) >= self.per_minute

    def failed(self, user: str, client: str, now: float | None = None) -> None:
        with self._lock:
            self._failures[(user, client)].append(now or time.monotonic())

    def succeeded(self, user: str, client: str) -> None:
        with self._lock:
            self._failures.pop((user, client), None)
