"""`prodcat replay` on a real broker: dead letters of a fixed cause go back to their topic and are classified."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from common import kafka, schemas
from prodcat.stack import read_topic, wait_for_outcomes
from tests.support.tiny_model import expected_category


def _replay(stack, *flags: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "prodcat", "replay", "--bootstrap-servers",
                           stack.settings.bootstrap_servers, *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wait_for_dead_letters(stack, n: int) -> list:
    deadline = time.monotonic() + 60
    while len(letters := read_topic(stack.settings, stack.settings.topic_dlq, idle_s=0.5)) < n:
        assert time.monotonic() < deadline, f"{len(letters)} of {n} dead letters"
    return letters


def test_dead_letters_of_a_fixed_cause_are_replayed_and_classified(stack, tiny_model, sample_jpegs, tmp_path):
    workers = [stack.start_worker(kind, tiny_model, wait_ready=False) for kind in ("preprocess", "inference")]
    stack.wait_ready(workers)
    names = ["Blue shirt", "Running shoes", "Steel watch"] * 2
    later = [str(tmp_path / f"later-{i}.jpg") for i in range(len(names))]  # photos not uploaded yet
    events = [(f"r{i}", schemas.encode_event(f"r{i}", name, image_url=f"file://{path}"))
              for i, (name, path) in enumerate(zip(names, later))]
    producer = kafka.make_producer(stack.settings, "test")
    for key, value in events + [("bad", b"{not json")]:
        producer.produce(stack.settings.topic_raw, value, key, headers=[("traceparent", key.encode())])
    assert producer.flush(30) == 0
    letters = [schemas.decode_dead_letter(m.value()) for m in _wait_for_dead_letters(stack, len(events) + 1)]
    assert sorted(d["error_code"] for d in letters) == ["BAD_JSON"] + ["URL_FETCH_FAILED"] * len(events)

    dry = _replay(stack, "--code", "url_fetch_failed", "--since", "1h", "--dry-run")
    assert (dry["matched"], dry["replayed"], dry["by_topic"]) == (6, 0, {stack.settings.topic_raw: 6})
    assert dry["codes_in_window"] == {"URL_FETCH_FAILED": 6, "BAD_JSON": 1}
    assert _replay(stack, "--code", "URL_FETCH_FAILED", "--since", str(time.time() + 60))["matched"] == 0

    for i, path in enumerate(later):  # the cause fixed: the photos are there now
        shutil.copy(sample_jpegs[i], path)
    replayed_at = time.time()
    done = _replay(stack, "--code", "URL_FETCH_FAILED", "--stage", "preprocess")
    assert (done["matched"], done["replayed"], done["dead_letters_read"]) == (6, 6, 7)
    results = wait_for_outcomes(stack, [k for k, _ in events], timeout_s=60)
    assert {k: r["category"] for k, r in results.items()} == {f"r{i}": expected_category(n) for i, n in enumerate(names)}
    # events without event_time are timed (and ordered in Redis) by their record's timestamp: the original one
    originals = {}
    for m in read_topic(stack.settings, stack.settings.topic_raw, idle_s=0.5):  # the originals, then the replays
        originals.setdefault(m.key().decode(), m.timestamp()[1] / 1000.0)
    assert all(r["event_time"] == originals[k] < replayed_at for k, r in results.items())
    # and their headers (a producer's trace context) came back with them
    assert {m.key().decode(): m.headers() for m in read_topic(stack.settings, stack.settings.topic_results)} == {
        k: [("traceparent", k.encode())] for k, _ in events}
    assert len(read_topic(stack.settings, stack.settings.topic_dlq, idle_s=0.5)) == 7  # nothing failed again
    assert all(os.path.exists(p) for p in later) and all(w.alive() for w in workers)


def test_replay_says_why_it_cannot_reach_the_broker(tmp_path):
    done = subprocess.run([sys.executable, "-m", "prodcat", "replay", "--code", "URL_TIMEOUT", "--bootstrap-servers",
                           "127.0.0.1:1", "--kafka-opt", "socket.connection.setup.timeout.ms=1000"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("prodcat replay: broker 127.0.0.1:1")
