"""Quix-style checkpoint of one batch, in numbered steps, each with its own exception type:

  1. flush the producer — every output record delivered          (DeliveryError)
  2. write the sink (Redis) — results durable                    (SinkError)
  3. commit offsets — last processed + 1 per partition           (CommitError)

A failing step rewinds the batch to its first offsets, so it is consumed again (at-least-once), marks the
worker not ready and backs off; dependency outages therefore stop consumption instead of dropping events.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, Message

from common import kafka, metrics
from common.errors import RetryableError
from common.metrics import Health

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0  # bounded so a retry loop never approaches max.poll.interval.ms


class Checkpoint:
    def __init__(self, consumer: Consumer, deliveries: kafka.DeliveryTracker, worker: str, health: Health):
        self.consumer = consumer
        self.deliveries = deliveries
        self.worker = worker
        self.health = health
        self._backoff_s = 0.0

    def commit(self, messages: list[Message], write_sink: Callable[[], None] | None = None, reason: str = "batch") -> bool:
        """True when the batch is done; False when it was rewound for another attempt."""
        t0 = time.perf_counter()
        try:
            self.deliveries.flush()  # 1
            t1 = time.perf_counter()
            if write_sink is not None:
                write_sink()  # 2
            t2 = time.perf_counter()
            kafka.commit(self.consumer, messages)  # 3
        except RetryableError as e:
            self._failed(messages, e)
            return False
        t3 = time.perf_counter()
        metrics.STAGE_SECONDS.labels(self.worker, "flush").observe(t1 - t0)
        if write_sink is not None:
            metrics.STAGE_SECONDS.labels(self.worker, "sink").observe(t2 - t1)
        metrics.STAGE_SECONDS.labels(self.worker, "commit").observe(t3 - t2)
        metrics.COMMITS.labels(self.worker, reason).inc()
        if self._backoff_s:
            log.info("%s recovered", self.worker)
        self._backoff_s = 0.0
        if not self.health.ready:
            self.health.set_ready(True, "")
        return True

    def _failed(self, messages: list[Message], error: RetryableError) -> None:
        kind = type(error).__name__
        metrics.RETRIES.labels(self.worker, kind).inc()
        self.health.set_ready(False, f"{kind}: {error}")
        kafka.rewind(self.consumer, messages)
        self._backoff_s = min(MAX_BACKOFF_S, max(0.1, self._backoff_s * 2))
        log.warning("checkpoint failed (%s: %s); batch of %d rewound, retrying in %.1fs", kind, error, len(messages), self._backoff_s)
        time.sleep(self._backoff_s)
