"""The live model of a worker, replaceable while frames keep flowing (hot swap).

A new model (a reload request, or its file changed on disk) is loaded on a background
thread while the old one keeps judging; the worker swaps between two batches, so no frame
waits for a load and no frame is judged by a half-loaded model. A file that fails to load
(a copy still being written, a bad hash, a graph that does not match its metadata) leaves
the old model live and is reported; the next change of the file is tried again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pouchline.inspect.verdicts import ModelRef
from pouchline.models.inference import Inferencer
from pouchline.models.metadata import ModelError, metadata_path

log = logging.getLogger(__name__)

#: How often the model file is looked at.
_WATCH_INTERVAL_S = 1.0


def _stamp(path: Path) -> tuple[int, ...] | None:
    """Modification time and size of the model and its metadata; None while either is missing."""
    try:
        return tuple(value for item in (path, metadata_path(path)) for value in (item.stat().st_mtime_ns, item.stat().st_size))
    except OSError:
        return None


def load_warm(path: Path, threads: int) -> Inferencer:
    """Load a model and run it once: onnxruntime's first run allocates and plans, and that
    should not land on the first cell of a shift or the first batch after a swap."""
    model = Inferencer(path, threads=threads)
    spec = model.meta.input
    model.forward(np.zeros((2, spec.height, spec.width, spec.channels), np.uint8))
    return model


def one_model_per_view(models: Iterable[tuple[str, Path]]) -> dict[str, Path]:
    """Each model file by the view it judges, in the order given; two models for one view are
    an error naming both (the service checks its configuration with it, and so does each worker)."""
    views: dict[str, Path] = {}
    for view, path in models:
        if view in views:
            raise ModelError(f"{path} and {views[view]} both judge '{view}' frames; give one model per view")
        views[view] = path
    return views


def model_ref(model: Inferencer) -> ModelRef:
    meta = model.meta
    return ModelRef(name=meta.name, version=meta.version, sha256=meta.sha256, precision=meta.precision)


class ModelSlot:
    """One model and its replacement in waiting."""

    def __init__(self, path: Path, *, threads: int, watch: bool) -> None:
        self.path = Path(path)
        self.threads = threads
        self.watch = watch
        self.model = load_warm(self.path, threads)
        self.ref = model_ref(self.model)
        self.swaps = 0
        self.failures = 0
        self.last_error: str | None = None
        self._stamp = _stamp(self.path)
        self._next_look = time.monotonic() + _WATCH_INTERVAL_S
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        self._loading: Future[Inferencer] | None = None

    def request(self, path: Path | None = None) -> None:
        """Load ``path`` (default: the current file again) in the background."""
        if path is not None:
            self.path = Path(path)
        self._stamp = _stamp(self.path)
        if self._loading is not None:
            self._loading.cancel()
        self._loading = self._loader.submit(load_warm, self.path, self.threads)

    def poll(self) -> bool:
        """Swap in a loaded replacement (True when it did); start one when the file changed."""
        now = time.monotonic()
        if self.watch and now >= self._next_look:
            self._next_look = now + _WATCH_INTERVAL_S
            stamp = _stamp(self.path)
            if stamp is not None and stamp != self._stamp:
                log.info("model file %s changed; loading it", self.path)
                self.request()
        if self._loading is None or not self._loading.done():
            return False
        loading, self._loading = self._loading, None
        try:
            model = loading.result()
            if model.meta.input.view != self.model.meta.input.view:  # each slot serves one camera view
                raise ModelError(f"judges '{model.meta.input.view}' frames; this slot judges "
                                 f"'{self.model.meta.input.view}' frames")
        except (ModelError, OSError, ValueError) as error:
            self.failures += 1
            self.last_error = f"{self.path}: {error}"
            log.error("model reload failed, %s stays live: %s", self.ref.version, self.last_error)
            return False
        old, self.model, self.ref = self.ref, model, model_ref(model)
        self.swaps += 1
        log.info("model swapped: %s %s -> %s %s", old.version, old.sha256[:12], self.ref.version, self.ref.sha256[:12])
        return True

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
