"""DeliveryTracker on the real broker: a batch that could not be delivered fails alone — the next one,
through the replacement producer, is not charged with the old producer's purged records."""
from __future__ import annotations

import os
import signal

import pytest
from confluent_kafka import Producer

from common import kafka
from common.errors import DeliveryError
from prodcat.stack import read_topic


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
    deliveries.flush(timeout_s=30.0)  # raised "5 failed, …" when the purge reported into this batch
    assert (len(deliveries.producer), deliveries.failures) == (0, [])


def test_a_record_that_times_out_is_reported_as_failed(stack):
    """Producers report failed deliveries only: a failure must still reach the batch (not pass as delivered)."""
    conf = {**kafka.producer_config(stack.settings, "test"), "message.timeout.ms": 500}
    deliveries = kafka.DeliveryTracker(lambda: Producer(conf))
    os.kill(stack.broker.pid, signal.SIGSTOP)
    try:
        for i in range(3):
            deliveries.produce(stack.settings.topic_results, b"expiring", str(i))
        with pytest.raises(DeliveryError, match="3 failed, 0 undelivered"):
            deliveries.flush(timeout_s=10.0)  # the records expire after 0.5 s: flush then has nothing left to wait for
    finally:
        os.kill(stack.broker.pid, signal.SIGCONT)


def test_a_checkpoint_flush_sends_lingering_records_at_once(stack):
    """The preprocess worker lingers long (LINGER_MS) because its checkpoint's flush sends whatever waits: with a
    linger far beyond the flush's timeout, every record still lands within it."""
    topic = stack.settings.topic_results
    deliveries = kafka.DeliveryTracker(lambda: kafka.make_producer(stack.settings, "test", linger_ms=25_000))  # < message.timeout.ms
    for i in range(20):
        deliveries.produce(topic, f"lingering {i}".encode(), str(i))
    deliveries.flush(timeout_s=10.0)  # DeliveryError ("20 undelivered") if the linger held them
    assert (len(deliveries.producer), deliveries.failures) == (0, [])
    values = sorted(m.value() for m in read_topic(stack.settings, topic))
    assert values == sorted(f"lingering {i}".encode() for i in range(20))
