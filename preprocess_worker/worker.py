"""The preprocess loop, top to bottom: poll → decode → preprocess → produce → checkpoint (flush → commit).
Between batches it follows the model directory: a new vocabulary is picked up without a restart (one
batch, one vocabulary); the inference worker keeps the previous model for records already in flight."""
from __future__ import annotations

import logging
import time

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaException, Message

from common import kafka, metrics, runtime, schemas
from common.checkpoint import Checkpoint
from common.errors import ProcessingError
from common.model import DirWatch, Manifest, ModelError
from common.settings import Settings
from common.tokenize import Tokenizer
from preprocess_worker.transform import preprocess

WORKER = "preprocess"
log = logging.getLogger(WORKER)
# The checkpoint flushes each poll batch (flush sends at once, whatever the linger), so no record waits past
# its batch; within a backlog's batches, tensor records then share message sets (≈ 6 per set at batch.size
# 1 MB: one request, one lz4 frame) instead of leaving one or two at a time, as at kafka.LINGER_MS (5 ms):
# the worker's CPU 1.00–1.02 → 0.94 core-ms per item (prodcat bench, end to end).
LINGER_MS = 100


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
        self.model_watch = DirWatch(settings.model_dir, settings.model_reload_s)
        self.max_event_bytes = schemas.max_event_bytes(settings.image_policy)
        self.consumer = kafka.make_consumer(settings, settings.preprocess_group, WORKER, health)
        self.deliveries = kafka.DeliveryTracker(lambda: kafka.make_producer(settings, WORKER, LINGER_MS))
        self.checkpoint = Checkpoint(self.consumer, self.deliveries, WORKER, health)

    def run(self) -> None:
        self.consumer.subscribe([self.settings.topic_raw], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        try:
            while not self.stop:
                if self.checkpoint.hold():  # the broker failed a checkpoint: paused, then retried
                    continue
                self.maybe_reload_tokenizer()
                # 1. poll: what has arrived, up to poll_batch, as soon as anything has (at most max_delay_ms idle, so
                #    a reload is looked for) — below full load an event waited out the rest of a fixed window
                messages = kafka.consume_available(self.consumer, self.settings.poll_batch, max(0.005, self.settings.max_delay_ms / 1000.0))
                batch = kafka.records(WORKER, messages)
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
            event = schemas.decode_event(msg.value(), self.max_event_bytes)
            product_id = event.product_id
            # keyed by product id, whatever the event's key was (none, or another): one product's records stay in
            # one partition, in order, downstream. The event's headers (a producer's trace context) go along
            self._produce(self.settings.topic_tensors, self._preprocess_with_attempts(event, msg), event.product_id,
                          msg.headers())
        except ProcessingError as e:
            self.dead_letter(msg, e, product_id)

    def maybe_reload_tokenizer(self) -> None:
        """Follow the model directory's vocabulary; a manifest that does not load keeps the current one."""
        if not self.model_watch.changed():
            return
        try:
            config = Manifest.load(self.settings.model_dir).tokenizer
        except ModelError as e:
            metrics.MODEL_RELOADS.labels(WORKER, "rejected").inc()
            log.error("new manifest rejected, keeping vocabulary %08x: %s", self.tokenizer.config.fingerprint, e)
            return
        metrics.MODEL_RELOADS.labels(WORKER, "loaded").inc()
        if config.fingerprint != self.tokenizer.config.fingerprint:
            log.info("vocabulary %08x → %08x", self.tokenizer.config.fingerprint, config.fingerprint)
            self.tokenizer = Tokenizer(config)

    def _preprocess_with_attempts(self, event: schemas.ProductEvent, msg: Message) -> bytes:
        """Event → encoded tensor record. A bug or transient fault on one event is retried a bounded number of times,
        then dead-lettered: nothing one event holds may stop the worker (and the partition behind it)."""
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                return preprocess(event, self.tokenizer, self.settings.image_policy, event_time_of(event.event_time, msg),
                                  msg.partition(), msg.offset(), WORKER).encode()
            except ProcessingError:
                raise
            except Exception as e:  # noqa: BLE001 — anything unexpected must not stall the partition
                log.exception("attempt %d/%d failed for %s", attempt, self.settings.max_attempts, event.product_id)
                last = e
        raise ProcessingError("INTERNAL_ERROR", f"failed {self.settings.max_attempts} times: {type(last).__name__}: {last}")

    def _produce(self, topic: str, value: bytes, key, headers: list | None) -> None:
        try:
            self.deliveries.produce(topic, value, key, headers)
        except KafkaException as e:  # e.g. larger than message.max.bytes: this record can never be sent
            raise ProcessingError("RECORD_TOO_LARGE" if e.args[0].code() == kafka.KafkaError.MSG_SIZE_TOO_LARGE
                                  else "PRODUCE_REJECTED", str(e)) from None

    def dead_letter(self, msg: Message, error: ProcessingError, product_id: str | None) -> None:
        kafka.send_dead_letter(self.deliveries, self.settings.topic_dlq, WORKER, msg, error, product_id)

    def _on_assign(self, consumer, partitions) -> None:
        kafka.note_rebalance(WORKER, "assign", partitions)
        self.checkpoint.assigned(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        # called inside consume(): the previous batch is already committed (or rewound), nothing to finish
        kafka.note_rebalance(WORKER, "revoke", partitions)

    def _on_lost(self, consumer, partitions) -> None:
        kafka.note_rebalance(WORKER, "lost", partitions)
