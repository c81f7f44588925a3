"""CurveZMQ keys: who may send frames to whom on the plant network.

A station is a CURVE server with its own key pair and a folder of the public keys of the
workers (and recorders) it accepts; a worker is a CURVE client that knows the station's
public key. A device without an accepted key cannot complete the handshake, so it can
neither inject frames nor take them.
"""

from __future__ import annotations

import re
from pathlib import Path

import zmq
import zmq.auth
from pydantic import BaseModel, ConfigDict, Field
from zmq.auth.thread import ThreadAuthenticator

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class CurveServerConfig(BaseModel):
    """CURVE on the station's side."""

    model_config = ConfigDict(extra="forbid")

    secret_key: Path = Field(description="The station's secret certificate (`NAME.key_secret`).")
    clients: Path = Field(description="Folder of accepted public certificates (`*.key`) of workers and recorders.")


class CurveClientConfig(BaseModel):
    """CURVE on a worker's (or recorder's) side."""

    model_config = ConfigDict(extra="forbid")

    secret_key: Path = Field(description="This client's secret certificate (`NAME.key_secret`).")
    server_key: Path = Field(description="The station's public certificate (`NAME.key`).")


def create_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """Write a new key pair ``NAME.key`` (public, to hand out) and ``NAME.key_secret``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; keys are never overwritten (delete it first to rotate)")
    zmq.auth.create_certificates(str(folder), name)
    secret.chmod(0o600)
    return Path(public), Path(secret)


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    """One certificate file; a missing, unreadable or wrong kind of file is a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CURVE certificate not found (make one with `pouchline station keys`)")
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a CURVE certificate ({error})") from error
    if secret and secret_key is None:
        raise ValueError(f"{path}: holds no secret key; pass the `.key_secret` file")
    return public, secret_key


def secure_server(socket: zmq.Socket, config: CurveServerConfig) -> ThreadAuthenticator:
    """Make ``socket`` a CURVE server that accepts only the listed clients.

    The authenticator runs on the socket's own context: give each station its own context.
    """
    if not config.clients.is_dir():
        raise FileNotFoundError(f"{config.clients}: folder of accepted client certificates not found")
    public, secret = _load(config.secret_key, secret=True)
    authenticator = ThreadAuthenticator(socket.context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(config.clients))
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_server = True
    return authenticator


def secure_client(socket: zmq.Socket, config: CurveClientConfig) -> None:
    """Make ``socket`` a CURVE client of the station whose public key is given."""
    public, secret = _load(config.secret_key, secret=True)
    server_public, _ = _load(config.server_key, secret=False)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = server_public
