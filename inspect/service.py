"""`pouchline inspect run`: worker processes, the collector and the HTTP endpoint, supervised.

One process per worker (spawned, so no state is inherited; the config travels as JSON),
each with its own onnxruntime session and frame client. The service process runs the
collector (unless ``collector`` points at another machine's), publishes control messages
(reload, stop) to its workers, restarts a worker that dies (its frames go back to the
stations and are delivered again), and serves:

- ``GET /status``: workers, cells, reasons, latency, malformed messages (JSON);
- ``GET /metrics``: the same for Prometheus;
- ``GET /healthz``: 200 while every worker runs;
- ``POST /reload``: load the model again, or ``{"model": "path.onnx"}``, in every worker without
  dropping a frame.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pouchline.inspect.collector import Collector, Sink
from pouchline.inspect.config import InspectConfig
from pouchline.inspect.modelslot import one_model_per_view
from pouchline.inspect.sinks import ControllerLink, JsonlSink
from pouchline.inspect.worker import ControlMessage, run_worker
from pouchline.models.metadata import CalibrationRecord, ModelError, ModelMetadata, load_metadata
from pouchline.station.status import EndpointServer, Reply

log = logging.getLogger(__name__)

_SUPERVISE_S = 0.2
_STABLE_S = 60.0  # a worker that ran this long before dying is restarted at once
_MAX_BACKOFF_S = 30.0


class ReloadRequest(BaseModel):
    """Body of `POST /reload`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model file to switch to (default: the configured one, read again).")


def connectable(endpoint: str) -> str:
    """A bound endpoint as a local peer connects to it (``tcp://0.0.0.0:p`` -> ``tcp://127.0.0.1:p``)."""
    return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:").replace("tcp://*:", "tcp://127.0.0.1:")


def model_views(config: InspectConfig) -> dict[str, Path]:
    """The view each configured model judges; two models for one view are an error naming both.

    A model whose thresholds were set together with other views' models (`pouchline model
    calibrate`) leaves part of the cell's false-reject budget, and of its catching, to them:
    run alone it misses more. That is said once at start, not refused: replaying one view's
    recording (`pouchline evaluate`) runs one model on purpose."""
    metas = {path: load_metadata(path) for path in (config.model, *config.more_models)}
    views = one_model_per_view((meta.input.view, path) for path, meta in metas.items())
    for path, meta in metas.items():
        missing = missing_partners(meta.calibration, metas)
        if missing:
            log.warning("%s: its thresholds were set together with %s, which this service does not run; alone it "
                        "catches fewer defects than calibrated (add them to more_models, or calibrate it alone)",
                        path, ", ".join(missing))
    return views


def missing_partners(calibration: CalibrationRecord, metas: dict[Path, ModelMetadata]) -> list[str]:
    """The models a calibration record was made with that are not among ``metas``.

    Partners are matched by the SHA-256 of their graph: a partner under another file name is
    there, and a different model under a partner's file name (retrained since) is not. Records
    from before the hashes were kept are matched by file name."""
    if calibration.model_sha256 is None:
        return sorted(set(calibration.models.values()) - {path.name for path in metas})
    running = {meta.sha256 for meta in metas.values()}
    return sorted(f"{calibration.models.get(view, view)} (SHA-256 {digest[:12]}...)"
                  for view, digest in calibration.model_sha256.items() if digest not in running)


class InspectService:
    """A running inspection service on this machine."""

    def __init__(self, config: InspectConfig) -> None:
        # A wrong model path fails here, in the service, with the file's name.
        self.views = model_views(config)
        if config.shadow is not None and load_metadata(config.shadow).input.view not in self.views:
            raise ModelError(f"{config.shadow}: the shadow model judges a view no live model judges")
        self.config = config
        self.context = zmq.Context()
        self.collector: Collector | None = None
        if config.collector is None:
            sinks: list[Sink] = []
            if config.controller is not None:
                sinks.append(ControllerLink(self.context, config.controller))
            if config.out is not None:
                sinks.append(JsonlSink(config.out))
            self.collector = Collector(config.collect, deadline_s=config.cell_deadline_s, sinks=sinks, context=self.context)
        self.collect_endpoint = config.collector or connectable(self.collector.endpoint)  # type: ignore[union-attr]
        self.control = self.context.socket(zmq.PUB)
        self.control.setsockopt(zmq.LINGER, 500)
        self.control.bind("tcp://127.0.0.1:0")
        self.control_endpoint = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
        self.names = [f"{config.name}-{index}" for index in range(config.workers)]
        self.processes: dict[str, BaseProcess] = {}
        self.restarts = dict.fromkeys(self.names, 0)
        self.started: dict[str, float] = {}
        self.stopping = threading.Event()
        self._spawn = multiprocessing.get_context("spawn")
        self._supervisor = threading.Thread(target=self._supervise, name="inspect-supervisor", daemon=True)
        self.http = None
        if config.http is not None:
            self.http = EndpointServer(
                config.http,
                {"/status": lambda: (200, self.status()), "/metrics": self._metrics, "/healthz": self._health},
                {"/reload": self._reload_request}, "inspect-status",
            )

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> InspectService:
        if self.collector is not None:
            self.collector.start()
        for name in self.names:
            self._start_worker(name)
        self._supervisor.start()
        if self.http is not None:
            self.http.start()
        log.info("inspection service %s: %d workers, verdicts to %s", self.config.name, len(self.names),
                 self.collect_endpoint)
        return self

    def _start_worker(self, name: str) -> None:
        process = self._spawn.Process(
            target=run_worker, name=name, daemon=True,
            args=(self.config.model_dump_json(), name, self.collect_endpoint, self.control_endpoint),
        )
        process.start()
        self.processes[name] = process
        self.started[name] = time.monotonic()

    def _supervise(self) -> None:
        """Start dead workers again; one that keeps dying waits longer each time (1 s .. 30 s)."""
        delay = dict.fromkeys(self.names, 0.0)
        due: dict[str, float] = {}
        while not self.stopping.wait(_SUPERVISE_S):
            now = time.monotonic()
            for name, process in list(self.processes.items()):
                if process.is_alive() or self.stopping.is_set():
                    continue
                if name not in due:
                    lived = now - self.started[name]
                    delay[name] = 0.0 if lived > _STABLE_S else min(_MAX_BACKOFF_S, max(1.0, 2 * delay[name]))
                    due[name] = now + delay[name]
                    log.error("worker %s (pid %s) died with exit code %s; starting it again in %.0f s", name,
                              process.pid, process.exitcode, delay[name])
                if now >= due[name]:
                    del due[name]
                    self.restarts[name] += 1
                    self._start_worker(name)

    def wait(self, *, handle_signals: bool = True, duration_s: float | None = None) -> None:
        """Block until SIGINT/SIGTERM (or ``duration_s``)."""
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.stopping.set())
        self.stopping.wait(duration_s)

    def stop(self, grace_s: float = 10.0) -> dict[str, Any]:
        """Workers finish their batch and return their credit; open cells are decided; the final status."""
        self.stopping.set()
        self._publish(ControlMessage(type="stop"))
        deadline = time.monotonic() + grace_s
        for name, process in self.processes.items():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %s did not stop in %.0f s; terminating it", name, grace_s)
                process.terminate()
                process.join(2)
        time.sleep(0.2)  # the workers' last statistics and verdicts reach the collector
        if self.collector is not None:
            self.collector.stop()
        final = self.status()
        if self.http is not None:
            self.http.stop()
        self.control.close()
        self.context.term()
        return final

    # -- commands and reports -------------------------------------------------------------

    def reload(self, model: Path | None = None) -> None:
        """Every worker loads the model (again, or ``model``) beside the live one and swaps between batches."""
        if model is not None:  # refuse a path that is plainly wrong before the workers try it
            view = load_metadata(model).input.view
            if view not in self.views:
                raise ModelError(f"{model}: judges '{view}' frames; this service's models judge {', '.join(self.views)}")
        self._publish(ControlMessage(type="reload", model=None if model is None else str(model)))

    def _publish(self, message: ControlMessage) -> None:
        self.control.send(message.model_dump_json().encode())

    def status(self) -> dict[str, Any]:
        workers = {name: {"alive": process.is_alive(), "pid": process.pid, "restarts": self.restarts[name]}
                   for name, process in self.processes.items()}
        return {"service": self.config.name, "model": str(self.config.model),
                "models": {view: str(path) for view, path in self.views.items()}, "workers": workers,
                "collector": None if self.collector is None else self.collector.snapshot()}

    def _metrics(self) -> Reply:
        if self.collector is None:
            return 404, {"detail": "this service sends verdicts to a remote collector; its metrics are there"}
        text = self.collector.prometheus()
        lines = ["# HELP pouchline_worker_restarts_total Worker processes started again after dying.",
                 "# TYPE pouchline_worker_restarts_total counter"]
        lines += [f'pouchline_worker_restarts_total{{worker="{name}"}} {count}' for name, count in self.restarts.items()]
        return 200, text + "\n".join(lines) + "\n"

    def _health(self) -> Reply:
        alive = sum(process.is_alive() for process in self.processes.values())
        return (200 if alive == len(self.names) else 503), {"alive_workers": alive, "workers": len(self.names)}

    def _reload_request(self, body: bytes) -> Reply:
        try:
            request = ReloadRequest.model_validate_json(body)
            self.reload(None if request.model is None else Path(request.model))
        except (ValidationError, ModelError, FileNotFoundError, ValueError) as error:
            return 422, {"detail": str(error)}
        return 202, {"reloading": True}
