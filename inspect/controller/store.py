"""Images on disk, addressed by their SHA-256, with a retention policy.

Flagged images are kept (``keep/``); images of passed cells sampled for audit expire
(``audit/``, deleted after ``audit_retention_days``). A name is only ever a 64-hex-digit
hash made here, never a path from a request, so nothing can reach outside the store.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Literal

_SHA = re.compile(r"[0-9a-f]{64}")
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}
Shelf = Literal["keep", "audit"]


class StoreError(ValueError):
    """Bytes that do not match their hash, or a name that is not a hash."""


class ImageStore:
    """``root/<shelf>/<ab>/<sha256>.<ext>``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, data: bytes | memoryview, sha256: str, media_type: str, shelf: Shelf) -> Path:
        """Write ``data`` unless it is there already; its hash must be ``sha256``."""
        if media_type not in _EXTENSIONS:
            raise StoreError(f"media type {media_type!r} is not stored (jpeg and png are)")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"image bytes do not match their sha256 {sha256[:12]}...")
        existing = self.find(sha256)
        if existing is not None:
            if shelf == "keep" and existing.parent.parent.name == "audit":  # flagged now: keep it for good
                target = self._path("keep", sha256, media_type)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(existing, target)
                return target
            return existing
        target = self._path(shelf, sha256, media_type)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the verdict is acknowledged
        os.replace(partial, target)
        return target

    def _path(self, shelf: Shelf, sha256: str, media_type: str) -> Path:
        return self.root / shelf / sha256[:2] / f"{sha256}.{_EXTENSIONS[media_type]}"

    def find(self, sha256: str) -> Path | None:
        """The stored file for ``sha256``, or None; `StoreError` if it is not a hash at all."""
        if not _SHA.fullmatch(sha256):
            raise StoreError("not an image id")
        for shelf in ("keep", "audit"):
            for extension in _EXTENSIONS.values():
                path = self.root / shelf / sha256[:2] / f"{sha256}.{extension}"
                if path.exists():
                    return path
        return None

    def expire(self, max_age_days: float, now: float | None = None) -> int:
        """Delete audit images older than ``max_age_days``; how many went."""
        cutoff = (now or time.time()) - max_age_days * 86400
        removed = 0
        for path in (self.root / "audit").glob("*/*"):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        return removed
