"""The inference worker on the real broker + Redis: the batch after the one being checkpointed is already
on the lanes (the model does not wait for Redis and commits), while offsets are still committed batch by
batch in order, every record ends in Redis with its offset committed, and the worker still looks for a
new model version while batches are running."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from common import kafka, metrics, runtime, schemas
from common.model import Classifier
from gpu_worker.worker import InferenceWorker
from prodcat.stack import read_results
from tests.support.tiny_model import PROVIDER_LABEL, expected_category

NAMES = ["Blue shirt", "Running shoes", "Steel watch"]


@pytest.mark.parametrize("providers", ["cpu", "openvino"])  # ORT's lanes (an item per run), OpenVINO's (a few)
def test_next_batch_runs_while_the_one_before_is_checkpointed(stack, tiny_model, providers):
    settings = dataclasses.replace(stack.settings, model_dir=tiny_model, providers=providers, intra_op_threads=2,
                                   max_batch=4, max_delay_ms=50.0)
    vocabulary = Classifier(tiny_model, "cpu").tokenizer
    producer = Producer(kafka.producer_config(settings, "test"))
    ids = [f"ov-{i}" for i in range(24)]
    for i, pid in enumerate(ids):  # a backlog of six batches, there before the worker starts
        tokens = np.asarray(vocabulary.encode(NAMES[i % 3]), np.int32)
        record = schemas.TensorRecord(pid, tokens, None, time.time(), time.time(), 0, i, vocabulary.config.fingerprint)
        producer.produce(settings.topic_tensors, record.encode(), pid)
    assert producer.flush(30) == 0

    stop = runtime.StopFlag()
    worker = InferenceWorker(settings, stop, metrics.Health("inference"))
    commits = []  # per checkpoint: batches started after it, and its first offset per partition
    checkpoint = worker.checkpoint.commit

    def observed_commit(messages, *args, **kwargs):
        commits.append((len(worker.started), {tp.partition: tp.offset for tp in kafka.first_offsets(messages)}))
        return checkpoint(messages, *args, **kwargs)

    worker.checkpoint.commit = observed_commit
    reload_checks = []  # batches started at each look for a new model version
    maybe_reload = worker.model.maybe_reload

    def observed_reload(*args, **kwargs):
        reload_checks.append(len(worker.started))
        return maybe_reload(*args, **kwargs)

    worker.model.maybe_reload = observed_reload
    loop = threading.Thread(target=worker.run)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while len(read_results(stack.redis(), settings, ids)) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop._event.set()
        loop.join(30)

    assert worker.model.current.provider == PROVIDER_LABEL[providers]
    results = read_results(stack.redis(), settings, ids)
    assert sorted(results) == sorted(ids)
    assert all(results[f"ov-{i}"]["category"] == expected_category(NAMES[i % 3]) for i in range(24))
    assert any(started for started, _ in commits), "no checkpoint ran while a later batch was on the lanes"
    assert any(reload_checks), "a backlog (a batch always running) must not keep a new model version out"
    for partition in {p for _, firsts in commits for p in firsts}:  # batch by batch, in offset order
        firsts = [f[partition] for _, f in commits if partition in f]
        assert firsts == sorted(firsts)
    group = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.inference_group})
    try:
        committed = group.committed([TopicPartition(settings.topic_tensors, p) for p in range(2)], timeout=10)
    finally:
        group.close()
    # every record's offset committed (counted: Tansu's ListOffsets answers are not to be trusted)
    assert sum(tp.offset for tp in committed) == len(ids)
