"""Quix-style checkpoint of one batch, in numbered steps, each with its own exception type:

  1. flush the producer — every output record delivered          (DeliveryError)
  2. write the sink (Redis) — results durable                    (SinkError)
  3. commit offsets — last processed + 1 per partition           (CommitError)

A failing step rewinds the batch to its first offsets, so it is consumed again (at-least-once), marks the
worker not ready and pauses the assigned partitions. `hold()`, called at the top of the worker loop, keeps
the consumer polled while paused (heartbeats, rebalance callbacks; nothing is returned) until the backoff
has passed and the dependency probe answers, then resumes: an outage stops consumption instead of dropping
events or re-running the same batch, and ends by itself.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, Message, TopicPartition

from common import kafka, metrics
from common.errors import RetryableError
from common.metrics import Health

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0  # bounded so a retry loop never approaches max.poll.interval.ms


class Checkpoint:
    def __init__(self, consumer: Consumer, deliveries: kafka.DeliveryTracker, worker: str, health: Health,
                 probe: Callable[[], bool] | None = None):
        self.consumer = consumer
        self.deliveries = deliveries
        self.worker = worker
        self.health = health
        self.probe = probe  # cheap dependency check (e.g. Redis PING) before a paused worker consumes again
        self._backoff_s = 0.0
        self._failing_since: float | None = None  # first failed checkpoint of the current outage
        self._paused = False
        self._resume_at = 0.0

    @property
    def failing(self) -> bool:
        """A dependency failed and no checkpoint has succeeded since: readiness stays false."""
        return self._failing_since is not None

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
        if self._failing_since is not None:
            outage_s = time.monotonic() - self._failing_since
            metrics.RECOVERY_SECONDS.labels(self.worker).observe(outage_s)
            log.info("%s recovered after %.1fs", self.worker, outage_s)
        self._failing_since, self._backoff_s = None, 0.0
        if not self.health.ready:
            self.health.set_ready(True, "")
        return True

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """From the worker's on_assign: take the partitions in this checkpoint's pause state, and report ready
        unless a dependency is still failing. librdkafka keeps a partition's pause flag through a revoke or
        loss and a later re-assign, so a partition paused before a group change would come back paused after
        a resume that ran while it was away — seen after a broker stall: session timeout → partitions lost
        inside the paused poll → resume with nothing assigned → re-assigned paused, consuming nothing."""
        self.consumer.assign(partitions)  # here rather than after the callback, so the state below applies to them
        (self.consumer.pause if self._paused else self.consumer.resume)(partitions)
        if not self.failing:  # during an outage readiness stays false
            self.health.set_ready(True, "")

    def _failed(self, messages: list[Message], error: RetryableError) -> None:
        kind = type(error).__name__
        metrics.RETRIES.labels(self.worker, kind).inc()
        self.health.set_ready(False, f"{kind}: {error}")
        kafka.rewind(self.consumer, messages)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._pause()
        log.warning("checkpoint failed (%s: %s); batch of %d rewound, paused for %.1fs", kind, error, len(messages), self._backoff_s)

    def _pause(self) -> None:
        self._paused = True
        metrics.PAUSED.labels(self.worker).set(1)
        self._backoff_s = min(MAX_BACKOFF_S, max(0.1, self._backoff_s * 2))
        self._resume_at = time.monotonic() + self._backoff_s

    def hold(self) -> bool:
        """True while consumption is paused: call at the top of the loop and skip the iteration. Each call
        polls the paused consumer for at most 0.5 s, so group membership and rebalances go on meanwhile."""
        if not self._paused:
            return False
        assignment = self.consumer.assignment()
        self.consumer.pause(assignment)  # partitions assigned since the failure are paused too
        wait = min(0.5, max(0.0, self._resume_at - time.monotonic()))
        stray = [m for m in self.consumer.consume(1, timeout=wait) if m.error() is None]
        kafka.rewind(self.consumer, stray)  # fetched before the pause took effect: read again after resume
        if time.monotonic() < self._resume_at:
            return True
        if self.probe is not None and not self.probe():
            metrics.RETRIES.labels(self.worker, "probe").inc()
            self._pause()  # longer backoff, still paused
            return True
        self._paused = False
        metrics.PAUSED.labels(self.worker).set(0)
        self.consumer.resume(self.consumer.assignment())
        log.info("%s resumes consuming; retrying the rewound batch", self.worker)
        return False
