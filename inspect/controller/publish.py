"""Decisions out to the line: a ZeroMQ PUB topic per subject and an optional HTTP webhook.

``[b"cell.<station>", json]`` tells the reject gate PASS or REJECT for one cell;
``[b"lot.<lot>", json]`` is a lot command (``reject`` stops the lot). JSON, because PLC
gateways and MES adapters read it without our code. One thread owns the socket (ZeroMQ
sockets are not thread-safe) and posts to the webhook, so a slow webhook never delays the
PUB message the gate is waiting for.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter
from typing import Any

import httpx
import zmq

log = logging.getLogger(__name__)


class Publisher:
    """Publishes from its own thread, in the order `publish` was called."""

    def __init__(self, endpoint: str, webhook: str | None = None, context: zmq.Context | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.webhook = webhook
        self.counts: Counter[str] = Counter()
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        self._queue.put((topic, message))

    def _run(self) -> None:
        client = httpx.Client(timeout=2.0) if self.webhook else None
        while (item := self._queue.get()) is not None:
            topic, message = item
            body = json.dumps(message, separators=(",", ":")).encode()
            self.socket.send_multipart([topic.encode(), body])
            self.counts["published"] += 1
            if client is not None:
                try:
                    client.post(self.webhook, content=body, headers={"Content-Type": "application/json",  # type: ignore[arg-type]
                                                                     "X-Pouchline-Topic": topic})
                    self.counts["webhook_sent"] += 1
                except httpx.HTTPError as error:
                    self.counts["webhook_failed"] += 1
                    log.warning("webhook %s failed for %s: %s", self.webhook, topic, error)
        if client is not None:
            client.close()
        self.socket.close()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)
