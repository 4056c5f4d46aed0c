"""Kafka plumbing for both workers: client factories, delivery tracking, commit / rewind helpers, topics.

Offsets are stored and committed by hand, only after a batch's outputs are durable (invariant 1).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from common import metrics
from common.errors import CommitError, DeliveryError
from common.settings import Settings

log = logging.getLogger(__name__)
# librdkafka's own log lines (a failed connect, a request timed out) go through Python logging, with its format,
# level and repeat filter (runtime.QuietRepeats), instead of raw `%3|…|FAIL|` lines on stderr
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")

# how long a produced record waits for others to share its message set (and its request, and its lz4 frame);
# a producer whose batches end in a flush can afford more (the preprocess worker's LINGER_MS)
LINGER_MS = 5
# partitions cap the replicas of each consumer group (deploy/ documents the same numbers)
DEFAULT_PARTITIONS = {"topic_raw": 12, "topic_tensors": 6, "topic_results": 6, "topic_dlq": 3}


def consumer_config(settings: Settings, group: str, worker: str, health: metrics.Health | None = None) -> dict:
    conf = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": group,
        "client.id": f"prodcat-{worker}",
        # we commit explicitly after the outputs of a batch are durable: never on a timer
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # a new group must classify what was published before it joined, not skip it
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(250, settings.session_timeout_ms // 4),
        # batches are bounded by max_delay_ms and a retry backoff ≤ 5 s, far below this
        "max.poll.interval.ms": 300_000,
        # a fetch with nothing new returns within this, bounding the latency a quiet partition adds. Not lower: Tansu
        # reads every partition of the fetch again on each one (~0.8 ms of its CPU) — at 20 ms two idle consumers
        # kept 8 % of a core busy, and under load the broker spent 0.54 against 0.43 core-ms per item at 50 ms
        # (p50 at half load +10–20 ms); Apache Kafka answers as soon as data arrives, whatever this is
        "fetch.wait.max.ms": 50,
        # a burst fills the local prefetch queue past its limits; librdkafka then postpones that partition's next
        # fetch by this much (default 1,000 ms): seen as a 0.6 s stall when traffic resumed after a burst
        "fetch.queue.backoff.ms": 20,
        # lag comes from librdkafka's statistics (hi_offset − committed), not from broker offset APIs; readiness
        # follows the broker states in them
        "statistics.interval.ms": 5_000,
        "stats_cb": lambda stats: metrics.record_kafka_stats(worker, stats, health),
        "error_cb": lambda err: _client_error(worker, err),
        "logger": LIBRDKAFKA_LOG,
    }
    conf.update(settings.kafka_options())
    return conf


def producer_config(settings: Settings, worker: str, linger_ms: int = LINGER_MS) -> dict:
    conf = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": f"prodcat-{worker}",
        # retries cannot duplicate or reorder records within a partition
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": linger_ms,
        # catalogue photos are mostly flat background: lz4 shrinks 150 KB tensor records ~3× for ~0.1 ms of
        # librdkafka's own thread (no GIL), and the broker moves a third of the bytes
        "compression.type": "lz4",
        # a delivery that cannot succeed in this time fails the batch (it is then retried from its offsets)
        "message.timeout.ms": 30_000,
        # report failed deliveries only: a batch has landed when flush() leaves nothing queued and no failure was
        # reported (DeliveryTracker). A success report hands each record back to Python with a copy of its value —
        # 150 KB per tensor record, from memory long gone cold by the time the broker acknowledged it
        "delivery.report.only.error": True,
        "error_cb": lambda err: _client_error(worker, err),
        "logger": LIBRDKAFKA_LOG,
    }
    conf.update(settings.kafka_options())  # consumer-only options are ignored by librdkafka with a warning
    return conf


def _client_error(worker: str, err: KafkaError) -> None:
    metrics.RETRIES.labels(worker, "kafka_client").inc()
    log.warning("kafka client error: %s", err)


def make_producer(settings: Settings, worker: str, linger_ms: int = LINGER_MS) -> Producer:
    return Producer(producer_config(settings, worker, linger_ms))


def make_consumer(settings: Settings, group: str, worker: str, health: metrics.Health | None = None) -> Consumer:
    """`health`: the worker's readiness, which then follows the consumer's broker connection."""
    return Consumer(consumer_config(settings, group, worker, health))


def produce_waiting(producer: Producer, topic: str, value: bytes, key=None, **kwargs) -> None:
    """produce(), waiting for deliveries to drain while librdkafka's local queue is full (BufferError)."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


class DeliveryTracker:
    """Collects the failed deliveries of one batch (producers report failures only); `flush` raises
    DeliveryError unless every record landed, and then replaces the producer (`make_producer()`) before the
    batch is retried."""

    def __init__(self, make_producer: Callable[[], Producer]):
        self._make_producer = make_producer
        self.producer = make_producer()
        self.failures: list[str] = []

    def callback(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failures.append(f"{msg.topic()}: {err.str()}")

    def produce(self, topic: str, value: bytes, key: bytes | str | None, headers: list | None = None,
                timestamp_ms: int = 0) -> None:
        """Raises KafkaException for a record that can never be sent (e.g. larger than message.max.bytes).
        timestamp_ms 0: now (a replay passes the original record's)."""
        produce_waiting(self.producer, topic, value, key, headers=headers, timestamp=timestamp_ms, on_delivery=self.callback)

    def flush(self, timeout_s: float = 30.0) -> None:
        undelivered = self.producer.flush(timeout_s)  # records still queued or in flight when time ran out
        failures = self.failures
        if not failures and not undelivered:
            return
        self._replace_producer()  # before the reset: the purged records report into this batch, not the next
        self.failures = []
        raise DeliveryError(f"{len(failures)} failed, {undelivered} undelivered: {failures[:3]}")

    def _replace_producer(self) -> None:
        """The retry goes through a new producer: the old one's idempotence state (producer id, epoch,
        sequence numbers) may be what failed. After records time out, librdkafka bumps the epoch, and a broker
        can answer every later record with PRODUCER_FENCED (seen with Tansu after a 40 s stall: the workers
        retried the same batch every 6 s, for good). Its undelivered records are dropped: the batch is
        produced again from its offsets."""
        old, self.producer = self.producer, self._make_producer()
        old.purge()
        old.flush(0)


def next_offsets(messages: Iterable[Message]) -> list[TopicPartition]:
    """Committed offset = last processed + 1, per partition."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        last[key] = max(last.get(key, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def first_offsets(messages: Iterable[Message]) -> list[TopicPartition]:
    first: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        first[key] = min(first.get(key, m.offset()), m.offset())
    return [TopicPartition(t, p, o) for (t, p), o in first.items()]


def commit(consumer: Consumer, messages: list[Message]) -> None:
    if not messages:
        return
    try:
        consumer.commit(offsets=next_offsets(messages), asynchronous=False)
    except KafkaException as e:
        raise CommitError(str(e)) from None


def rewind(consumer: Consumer, messages: list[Message]) -> None:
    """Seek back to the first message of a failed batch so it is consumed again (at-least-once)."""
    assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
    for tp in first_offsets(messages):
        if (tp.topic, tp.partition) in assigned:  # a revoked partition resumes from its committed offset elsewhere
            try:
                consumer.seek(tp)
            except KafkaException as e:
                log.warning("seek %s[%d]@%d failed: %s", tp.topic, tp.partition, tp.offset, e)


def create_topics(settings: Settings, partitions: dict | None = None, timeout_s: float = 15.0) -> None:
    """Create the four topics if absent (idempotent); partition counts by settings field name."""
    counts = {**DEFAULT_PARTITIONS, **(partitions or {})}
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, **_admin_options(settings)})
    topics = [NewTopic(getattr(settings, field), num_partitions=n, replication_factor=-1) for field, n in counts.items()]
    for topic, fut in admin.create_topics(topics, request_timeout=timeout_s).items():
        try:
            fut.result(timeout=timeout_s)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def _admin_options(settings: Settings) -> dict:
    return {k: v for k, v in settings.kafka_options().items() if k.startswith(("security.", "sasl.", "ssl."))}


def consume_available(consumer: Consumer, n: int, timeout_s: float) -> list[Message]:
    """Up to n messages: what is already fetched, else the first to arrive within timeout_s and what came with it.
    `consume(n, timeout)` waits the whole timeout unless n arrive."""
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(n - 1, timeout=0)] if n > 1 else [first]


def records(worker: str, messages: list[Message]) -> list[Message]:
    """The messages that carry records; consumer errors are counted and logged (librdkafka retries them)."""
    out = []
    for m in messages:
        err = m.error()
        if err is None:
            out.append(m)
        elif err.code() != KafkaError._PARTITION_EOF:
            metrics.RETRIES.labels(worker, "consume").inc()
            log.warning("%s: consume error: %s", worker, err)
    return out


def source_of(msg: Message) -> dict:
    """Where a dead-lettered record was read from, and its timestamp: a replay produces it with that timestamp,
    so an event without `event_time` keeps its place in its product's order (not the replay's time)."""
    source = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
    ts_type, ts_ms = msg.timestamp()
    if ts_type != TIMESTAMP_NOT_AVAILABLE:
        source["timestamp_ms"] = ts_ms
    return source


def send_dead_letter(deliveries: DeliveryTracker, topic: str, worker: str, msg: Message, error, product_id: str | None) -> None:
    """Dead letter v1 for `msg`, delivered (and so committed) with the rest of its batch."""
    from common import schemas

    metrics.DEAD_LETTERS.labels(worker, error.code).inc()
    log.info("dead letter %s at %s[%d]@%d: %s", error.code, msg.topic(), msg.partition(), msg.offset(), error.reason,
             extra={"repeat_key": ("dead letter", worker, error.code)})  # a malformed feed: a sample per code
    product_id = product_id or error.product_id
    deliveries.produce(topic, schemas.dead_letter(worker, error, msg.value(), source_of(msg), product_id), msg.key(),
                       msg.headers())


def note_rebalance(worker: str, kind: str, partitions: list[TopicPartition]) -> None:
    """Count an assign / revoke / lost and drop the lag series of partitions this worker no longer owns
    (a stale lag value would otherwise hold a lag alert up)."""
    metrics.REBALANCES.labels(worker, kind).inc()
    if kind != "assign":
        for tp in partitions:
            metrics.forget_lag(worker, tp.topic, tp.partition)
    (log.warning if kind == "lost" else log.info)("%s: %s %s", worker, kind, [tp.partition for tp in partitions])
