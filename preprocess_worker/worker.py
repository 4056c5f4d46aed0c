"""The preprocess loop, top to bottom: poll → decode → preprocess → produce → checkpoint (flush → commit)."""
from __future__ import annotations

import logging
import time

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaException, Message

from common import kafka, metrics, runtime, schemas
from common.checkpoint import Checkpoint
from common.errors import ProcessingError
from common.model import Manifest
from common.settings import Settings
from common.tokenize import Tokenizer
from preprocess_worker.transform import preprocess

WORKER = "preprocess"
log = logging.getLogger(WORKER)


def source_of(msg: Message) -> dict:
    return {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}


def event_time_of(event_time: float | None, msg: Message) -> float:
    """The producer's event_time, else the record's timestamp, else now: the start of end-to-end latency."""
    if event_time is not None:
        return event_time
    ts_type, ts_ms = msg.timestamp()
    return ts_ms / 1000.0 if ts_type != TIMESTAMP_NOT_AVAILABLE else time.time()


class PreprocessWorker:
    def __init__(self, settings: Settings, stop: runtime.StopFlag, health: metrics.Health):
        self.settings = settings
        self.stop = stop
        self.health = health
        # the tokenizer is configured by the model it feeds (vocabulary, max tokens, tagger)
        self.tokenizer = Tokenizer(Manifest.load(settings.model_dir).tokenizer)
        self.consumer = kafka.make_consumer(settings, settings.preprocess_group, WORKER)
        self.deliveries = kafka.DeliveryTracker(kafka.make_producer(settings, WORKER))
        self.checkpoint = Checkpoint(self.consumer, self.deliveries, WORKER, health)

    def run(self) -> None:
        self.consumer.subscribe([self.settings.topic_raw], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        try:
            while not self.stop:
                messages = self.consumer.consume(self.settings.poll_batch, timeout=0.5)  # 1. poll
                batch = [m for m in messages if self._usable(m)]
                if not batch:
                    continue
                metrics.EVENTS_IN.labels(WORKER).inc(len(batch))
                t0 = time.perf_counter()
                for msg in batch:
                    self.handle(msg)  # 2. decode, 3. preprocess, 4. produce
                metrics.STAGE_SECONDS.labels(WORKER, "process").observe(time.perf_counter() - t0)
                metrics.BATCH_SIZE.labels(WORKER).observe(len(batch))
                if self.checkpoint.commit(batch):  # 5. flush → commit
                    metrics.EVENTS_OUT.labels(WORKER).inc(len(batch))
        finally:
            # nothing is in flight between iterations: every consumed batch was committed or rewound
            self.health.set_ready(False, "stopping")
            self.consumer.close()  # leaves the group now, so partitions move without waiting for a timeout
            log.info("stopped")

    def handle(self, msg: Message) -> None:
        product_id = None
        try:
            event = schemas.decode_event(msg.value())
            product_id = event.product_id
            record = self._preprocess_with_attempts(event, msg)
            self._produce(self.settings.topic_tensors, record.encode(), msg.key())
        except ProcessingError as e:
            self.dead_letter(msg, e, product_id)

    def _preprocess_with_attempts(self, event: schemas.ProductEvent, msg: Message):
        """A bug or transient fault on one event is retried a bounded number of times, then dead-lettered."""
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                return preprocess(event, self.tokenizer, self.settings.image_policy, event_time_of(event.event_time, msg),
                                  msg.partition(), msg.offset(), WORKER)
            except ProcessingError:
                raise
            except Exception as e:  # noqa: BLE001 — anything unexpected must not stall the partition
                log.exception("attempt %d/%d failed for %s", attempt, self.settings.max_attempts, event.product_id)
                last = e
        raise ProcessingError("INTERNAL_ERROR", f"failed {self.settings.max_attempts} times: {type(last).__name__}: {last}")

    def _produce(self, topic: str, value: bytes, key) -> None:
        try:
            self.deliveries.produce(topic, value, key)
        except KafkaException as e:  # e.g. larger than message.max.bytes: this record can never be sent
            raise ProcessingError("RECORD_TOO_LARGE" if e.args[0].code() == kafka.KafkaError.MSG_SIZE_TOO_LARGE
                                  else "PRODUCE_REJECTED", str(e)) from None

    def dead_letter(self, msg: Message, error: ProcessingError, product_id: str | None) -> None:
        metrics.DEAD_LETTERS.labels(WORKER, error.code).inc()
        log.info("dead letter %s at %s[%d]@%d: %s", error.code, msg.topic(), msg.partition(), msg.offset(), error.reason)
        doc = schemas.dead_letter(WORKER, error, msg.value(), source_of(msg), product_id)
        self.deliveries.produce(self.settings.topic_dlq, doc, msg.key())

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if not kafka.is_benign(err):
            metrics.RETRIES.labels(WORKER, "consume").inc()
            log.warning("consume error: %s", err)
        return False

    def _on_assign(self, consumer, partitions) -> None:
        metrics.REBALANCES.labels(WORKER, "assign").inc()
        self.health.set_ready(True, "")
        log.info("assigned %s", [p.partition for p in partitions])

    def _on_revoke(self, consumer, partitions) -> None:
        # called inside consume(): the previous batch is already committed (or rewound), nothing to finish
        metrics.REBALANCES.labels(WORKER, "revoke").inc()
        log.info("revoked %s", [p.partition for p in partitions])

    def _on_lost(self, consumer, partitions) -> None:
        metrics.REBALANCES.labels(WORKER, "lost").inc()
        log.warning("lost %s", [p.partition for p in partitions])
