"""DeliveryTracker on the real broker: a batch that could not be delivered fails alone — the next one,
through the replacement producer, is not charged with the old producer's purged records."""
from __future__ import annotations

import os
import signal

import pytest
from confluent_kafka import Producer

from common import kafka
from common.errors import DeliveryError


def test_a_failed_flush_does_not_fail_the_next_batch(stack):
    topic = stack.settings.topic_tensors
    deliveries = kafka.DeliveryTracker(lambda: Producer(kafka.producer_config(stack.settings, "test")))
    first = deliveries.producer
    os.kill(stack.broker.pid, signal.SIGSTOP)  # nothing can be delivered
    try:
        for i in range(5):
            deliveries.produce(topic, b"stalled", str(i))
        with pytest.raises(DeliveryError, match="5 undelivered"):
            deliveries.flush(timeout_s=1.0)
    finally:
        os.kill(stack.broker.pid, signal.SIGCONT)
    assert deliveries.producer is not first  # the retry goes through a new producer
    for i in range(5):
        deliveries.produce(topic, b"retried", str(i))
    deliveries.flush(timeout_s=30.0)  # raised "5 failed, -5 undelivered" when the purge reported into this batch
    assert (deliveries.pending, deliveries.failures) == (0, [])
