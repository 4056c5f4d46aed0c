"""The inference loop, top to bottom: poll → batch (size | deadline) → decode → infer → produce →
checkpoint (flush → Redis → commit). Inference of a batch overlaps the checkpoint of the one before: a batch
is started on the lanes (a GPU: its one lane) as soon as it is released, and the batch before is produced and
checkpointed while it runs, so the model is not left idle while results are written. Offsets are still
committed batch by batch, in order, each only after its results are flushed and in Redis.

A revoke finishes every started and pending batch first; a lost partition drops them. A failed checkpoint
rewinds its batch and every batch after it (none is committed past a rewound one) and pauses consumption until
Redis answers a PING again (Checkpoint.hold)."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from confluent_kafka import Message

from common import kafka, metrics, runtime, schemas
from common.checkpoint import Checkpoint
from common.errors import ProcessingError
from common.model import Classifier, PendingRun
from common.settings import Settings
from gpu_worker.batcher import BatchQueue
from gpu_worker.model_holder import ModelHolder
from gpu_worker.sink import RedisSink, SinkWrite

WORKER = "inference"
log = logging.getLogger(WORKER)
IDLE_PROBE_S = 5.0  # how often an idle worker PINGs Redis, for readiness


@dataclass
class StartedBatch:
    """A released batch between decode and checkpoint: its inference runs (one per model) are under way."""
    messages: list[Message]
    runs: list[tuple[Classifier, list[tuple[Message, schemas.TensorRecord]], PendingRun]]

    def inferred(self) -> bool:
        return all(run.done() for _, _, run in self.runs)


class InferenceWorker:
    def __init__(self, settings: Settings, stop: runtime.StopFlag, health: metrics.Health):
        self.settings = settings
        self.stop = stop
        self.health = health
        self.model = ModelHolder(settings, WORKER)
        self.sink = RedisSink(settings.redis_url, settings.redis_key_prefix)
        self.consumer = kafka.make_consumer(settings, settings.inference_group, WORKER, health)
        self.deliveries = kafka.DeliveryTracker(lambda: kafka.make_producer(settings, WORKER))
        self.checkpoint = Checkpoint(self.consumer, self.deliveries, WORKER, health, probe=self.sink.ping)
        self.pending: BatchQueue[Message] = BatchQueue(settings.max_batch, settings.max_delay_ms / 1000.0)
        self.started: deque[StartedBatch] = deque()  # oldest first; at most two (one running, one queued)
        self._next_idle_probe = 0.0

    def run(self) -> None:
        self.consumer.subscribe([self.settings.topic_tensors], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        try:
            while not self.stop:
                if self.checkpoint.hold():  # a dependency is down: paused until it answers again
                    continue
                messages = self._poll()  # 1. poll
                for msg in kafka.records(WORKER, messages):
                    self.pending.add(msg)  # 2. batch
                if self.pending.ready():
                    self.started.append(self.start(self.pending.take()))  # 3. decode, 4. inference starts
                if len(self.started) > 1 or (self.started and (not messages or self.started[0].inferred())):
                    self.finish(self.started.popleft())  # 5. produce, 6. checkpoint — while the next batch runs
                if not len(self.pending):
                    # between batches (no batch mixes two models; a started one keeps its own), also under a
                    # backlog, where a batch is always running
                    self.model.maybe_reload()
                    if not messages and not self.started:
                        self._probe_sink_while_idle()
        finally:
            self._finish_all()  # SIGTERM: finish the batches, commit, then leave
            self.health.set_ready(False, "stopping")
            self.consumer.close()
            log.info("stopped")

    def _poll(self) -> list[Message]:
        """A batch filling: records until it is full or its deadline. None filling: what has arrived, as soon as
        anything has — the deadline starts at the first record's arrival, not at the end of a wait (a wait of one
        max delay held a record up to twice that) — with a batch running, only what is already fetched (its
        checkpoint is not kept waiting on an idle topic), else up to one max delay."""
        if len(self.pending):
            return self.consumer.consume(max(1, self.pending.room), timeout=self.pending.time_left())
        idle_wait = 0.0 if self.started else max(0.005, self.pending.max_delay_s)
        return kafka.consume_available(self.consumer, self.pending.max_size, idle_wait)

    def start(self, messages: list[Message]) -> StartedBatch:
        metrics.EVENTS_IN.labels(WORKER).inc(len(messages))
        metrics.BATCH_SIZE.labels(WORKER).observe(len(messages))
        groups: dict[int, tuple] = {}  # one ONNX batch per model: no batch mixes two models
        for msg in messages:  # 3. decode, and pick the model that knows the record's vocabulary
            rec = None
            try:
                rec = schemas.TensorRecord.decode(msg.value())
                clf = self._model_for(rec)
            except ProcessingError as e:
                self.dead_letter(msg, e, rec.product_id if rec else None)
                continue
            groups.setdefault(id(clf), (clf, []))[1].append((msg, rec))
        runs = [(clf, items, self._submit(clf, [rec for _, rec in items])) for clf, items in groups.values()]  # 4
        return StartedBatch(messages, runs)

    def finish(self, batch: StartedBatch) -> None:
        results: list[tuple[Message, dict]] = []
        for clf, items, run in batch.runs:
            for (msg, rec), outcome in zip(items, self.infer(clf, [rec for _, rec in items], run)):  # 4. results
                if isinstance(outcome, ProcessingError):
                    self.dead_letter(msg, outcome, rec.product_id)
                    continue
                res = self._result(rec, outcome, clf.version)
                self.deliveries.produce(self.settings.topic_results, schemas.encode_result(res), rec.product_id,
                                        msg.headers())  # 5. produce, with the event's headers (trace context)
                results.append((msg, res))
        written: list[SinkWrite] = []
        if self.checkpoint.commit(batch.messages, write_sink=lambda: written.append(self._write_sink(results))):  # 6
            done = time.time()
            for _, res in results:
                # a producer's clock ahead of ours must not take the histogram's sum below zero
                metrics.E2E_SECONDS.labels(WORKER).observe(max(0.0, done - res["event_time"]))
            metrics.EVENTS_OUT.labels(WORKER).inc(len(batch.messages))
            self.health.set_unreachable("redis", "")  # written: it answers
            metrics.DUPLICATES.labels(WORKER).inc(written[0].duplicates if written else 0)
            metrics.SUPERSEDED.labels(WORKER).inc(written[0].superseded if written else 0)
        else:
            # the batch was rewound: the later ones are consumed again with it, so none may commit past it
            kafka.rewind(self.consumer, batch.messages + self._take_uncommitted())

    def _write_sink(self, results: list[tuple[Message, dict]]) -> SinkWrite:
        """Checkpoint step 2. A result Redis refuses for good (its key holds another type) is dead-lettered, and
        the dead letters are delivered before step 3 commits; retrying would stall the partition on it."""
        written = self.sink.write([res for _, res in results])
        for i, reason in written.rejected.items():
            msg, res = results[i]
            self.dead_letter(msg, ProcessingError("SINK_REJECTED", reason), res["product_id"])
        if written.rejected:
            self.deliveries.flush()
        return written

    def _probe_sink_while_idle(self) -> None:
        """With no batch to write, a Redis that went away would go unseen until the next batch fails: PING it every
        IDLE_PROBE_S while idle, so readiness says so (as `/readyz` promises) before traffic comes."""
        now = time.monotonic()
        if now >= self._next_idle_probe:
            self._next_idle_probe = now + IDLE_PROBE_S
            self.health.set_unreachable("redis", "" if self.sink.ping() else "redis: no answer to PING")

    def _take_uncommitted(self) -> list[Message]:
        """Every started and pending record, oldest first; the worker then holds none."""
        taken = [m for batch in self.started for m in batch.messages] + self.pending.take()
        self.started.clear()
        return taken

    def _finish_all(self) -> None:
        while self.started:
            self.finish(self.started.popleft())
        if len(self.pending):
            self.finish(self.start(self.pending.take()))

    def _model_for(self, rec: schemas.TensorRecord):
        clf = self.model.for_vocabulary(rec.tokenizer_id)
        if clf is None:
            raise ProcessingError("TOKENIZER_MISMATCH", f"tokenized with vocabulary {rec.tokenizer_id:08x}, serving "
                                  f"{self.model.current.version} ({self.model.current.tokenizer.config.fingerprint:08x})")
        ids = rec.token_ids
        if len(ids) and (ids.min() < 0 or ids.max() >= clf.tokenizer.config.n_ids):
            # checked here: an out-of-range Gather index fails on CPU but may read garbage on a GPU
            raise ProcessingError("BAD_TENSOR_RECORD", f"token id outside 0..{clf.tokenizer.config.n_ids - 1}")
        return clf

    def infer(self, clf: Classifier, records: list[schemas.TensorRecord], run: PendingRun) -> list:
        """One prediction or one ProcessingError per record. A failing batch is retried item by item,
        so one poison record cannot fail its neighbours."""
        if not records:
            return []
        try:
            probs = run.result()
            if not np.all(np.isfinite(probs)):
                raise ValueError("model produced non-finite probabilities")
        except Exception as e:  # noqa: BLE001 — ORT raises its own types
            if len(records) == 1:
                return [ProcessingError("INFERENCE_FAILED", f"{type(e).__name__}: {e}")]
            log.warning("batch of %d failed (%s); isolating", len(records), e)
            return [self.infer(clf, [r], self._submit(clf, [r]))[0] for r in records]
        metrics.INFERENCE_SECONDS.labels(WORKER, clf.provider, clf.version).observe(run.seconds)
        metrics.STAGE_SECONDS.labels(WORKER, "infer").observe(run.seconds)
        per_item_ms = 1000.0 * run.seconds / len(records)
        return [(p, per_item_ms) for p in clf.predictions(probs)]

    @staticmethod
    def _submit(clf: Classifier, records: list[schemas.TensorRecord]) -> PendingRun:
        return clf.submit([r.token_ids for r in records], [r.image for r in records])

    def _result(self, rec: schemas.TensorRecord, outcome, model_version: str) -> dict:
        prediction, infer_ms = outcome
        now = time.time()
        timings = {
            "preprocess_ms": 1000.0 * (rec.preprocessed_time - rec.event_time),
            "queue_ms": 1000.0 * (now - rec.preprocessed_time) - infer_ms,
            "inference_ms": infer_ms,
            "event_to_result_ms": 1000.0 * (now - rec.event_time),
        }
        source = {"partition": rec.source_partition, "offset": rec.source_offset}
        return schemas.result(rec.product_id, prediction, model_version, rec.event_time, source, timings)

    def dead_letter(self, msg: Message, error: ProcessingError, product_id: str | None) -> None:
        kafka.send_dead_letter(self.deliveries, self.settings.topic_dlq, WORKER, msg, error, product_id)

    def _on_assign(self, consumer, partitions) -> None:
        kafka.note_rebalance(WORKER, "assign", partitions)
        self.checkpoint.assigned(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        # still the owner: finish and commit what was taken from these partitions before they move
        kafka.note_rebalance(WORKER, "revoke", partitions)
        self._finish_all()

    def _on_lost(self, consumer, partitions) -> None:
        # no longer the owner: a commit would be refused and another member already has them — drop
        kafka.note_rebalance(WORKER, "lost", partitions)
        dropped = self._take_uncommitted()
        log.warning("lost %s, dropped %d uncommitted records", [p.partition for p in partitions], len(dropped))
