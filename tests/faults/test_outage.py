"""redis-server stopped for ≥ 10 s mid-stream: the inference worker pauses (not ready, alive), probes
Redis, and resumes by itself when it is back; nothing is lost and no worker is restarted."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from tests.faults.harness import N, Scenario, start_pipeline, wait_recovered
from tests.support.events import good_events

OUTAGE_S = 10.0


def test_redis_outage_pauses_and_recovers_without_restart(stack, tiny_model, sample_jpegs, report):
    pre, inf = start_pipeline(stack, tiny_model)
    pids = (pre.proc.pid, inf.proc.pid)
    scenario = Scenario(stack, "redis-server down 10 s", good_events(N, sample_jpegs, prefix="rd-"))
    scenario.publish([(k, v) for k, v, _ in scenario.good])
    scenario.wait_classified(N // 4)

    stack.stop_redis(keep_data=True)  # a persistent Redis going away: the data written so far survives it
    down_at = time.monotonic()
    while time.monotonic() - down_at < OUTAGE_S:
        time.sleep(0.5)
    assert inf.alive() and not inf.ready(), "the inference worker must stay up and report not-ready"
    assert inf.metric("prodcat_paused") == 1
    retries_during_outage = inf.metric("prodcat_retries_total", kind="SinkError")

    stack.start_redis()
    recovery = wait_recovered(time.monotonic(), [inf], drained=scenario.drained)
    out = scenario.finish(recovery, note=f"outage {time.monotonic() - down_at - recovery:.0f} s; recovery after Redis is back")
    report(out)
    assert out.lost == 0 and not out.wrong, out.wrong[:5]
    assert (pre.proc.pid, inf.proc.pid) == pids and pre.alive() and inf.alive() and inf.ready()
    # paused, not spinning: the rewound batch was retried only after a PING answered (a handful of tries, not one per poll)
    assert retries_during_outage <= 3
    assert inf.metric("prodcat_recovery_seconds_count") >= 1


def test_an_idle_inference_worker_is_not_ready_while_redis_is_away_and_is_again_when_it_answers(stack, tiny_model):
    """`/readyz` promises a reachable Redis, but only a failed checkpoint said otherwise: an idle worker stayed
    ready through a Redis outage, and one started before Redis reported ready until its first batch failed."""
    inf = stack.start_worker("inference", tiny_model)
    stack.stop_redis()
    deadline = time.monotonic() + 20
    while inf.ready():
        assert time.monotonic() < deadline, "still ready 20 s after Redis went away"
        time.sleep(0.5)
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(f"{inf.metrics_url}/readyz", timeout=2)
    assert "redis: no answer to PING" in json.load(answer.value)["why"]
    stack.start_redis()
    stack.wait_ready([inf], timeout_s=20)
    assert inf.alive()


BROKER_STALL_S = 8.0


@pytest.mark.parametrize("record_timeout_ms", [None, 4000], ids=["records-wait", "records-time-out"])
def test_broker_stall_mid_stream_loses_nothing_and_needs_no_restart(record_timeout_ms, stack, tiny_model, sample_jpegs, report):
    """The broker frozen (SIGSTOP) for 8 s mid-stream — a stalled or partitioned broker that keeps its data:
    requests time out and are retried, the group may rebalance after it resumes; no worker dies, nothing is
    lost, and the stream drains without a restart. With `message.timeout.ms` below the stall, the records
    produced meanwhile fail, the batch is rewound and retried through a new producer. (Tansu keeps its log in
    memory only, so a broker *restart* would lose the log itself; compose/k8s run Apache Kafka, where that is
    the replicas' job.)"""
    options = {"kafka": (("message.timeout.ms", str(record_timeout_ms)),)} if record_timeout_ms else {}
    pre, inf = start_pipeline(stack, tiny_model, both=options)
    pids = (pre.proc.pid, inf.proc.pid)
    name = "broker frozen 8 s" + (f", records time out after {record_timeout_ms / 1000:.0f} s" if record_timeout_ms else "")
    scenario = Scenario(stack, name, good_events(N, sample_jpegs, prefix="bs-"))
    scenario.publish([(k, v) for k, v, _ in scenario.good])
    scenario.wait_classified(N // 4)

    os.kill(stack.broker.pid, signal.SIGSTOP)
    stalled_at = time.monotonic()
    try:
        time.sleep(BROKER_STALL_S)
        assert pre.alive() and inf.alive(), "a stalled broker must not kill a worker"
    finally:
        os.kill(stack.broker.pid, signal.SIGCONT)
    recovery = wait_recovered(time.monotonic(), [pre, inf], drained=scenario.drained)
    out = scenario.finish(recovery, note=f"stall {time.monotonic() - stalled_at - recovery:.0f} s; recovery after it resumes")
    report(out)
    assert out.lost == 0 and not out.wrong, out.wrong[:5]
    assert (pre.proc.pid, inf.proc.pid) == pids and pre.alive() and inf.alive()


def test_workers_started_before_their_broker_say_so_a_few_times_and_classify_once_it_is_up(tmp_path, tiny_model, sample_jpegs):
    """k8s starts the workers whenever it likes, Kafka may come up later. While the broker is away each worker is
    alive, not ready, and says so a few times a minute — librdkafka retries the connection ~20 times a second, and
    logged every attempt twice (its own line and the error callback's): ~40 lines a second per worker. Once the
    broker is up, the workers join their groups and classify without a restart. When it goes away again, idle
    workers are not ready (`/readyz` promises a reachable Kafka; with no batch to fail they stayed ready)."""
    from prodcat.stack import LocalStack, publish, wait_for_outcomes

    stack = LocalStack(str(tmp_path / "stack"))
    try:
        stack.start_redis()
        workers = [stack.start_worker(kind, tiny_model, wait_ready=False) for kind in ("preprocess", "inference")]
        time.sleep(6)
        for w in workers:
            assert w.alive() and not w.ready(), w.log()[-2000:]
            kafka_lines = [line for line in w.log().splitlines() if "librdkafka" in line or "kafka client error" in line]
            assert any("Connect to" in line for line in kafka_lines), w.log()[-2000:]  # the outage is reported
            assert len(kafka_lines) <= 20, f"{w.kind}: {len(kafka_lines)} lines in 6 s"
            assert not any(line.startswith("%") for line in w.log().splitlines())  # no raw librdkafka lines

        stack.start_broker()
        stack.create_topics()
        events = good_events(20, sample_jpegs, prefix="late-")
        publish(stack.settings, [(k, v) for k, v, _ in events])
        results = wait_for_outcomes(stack, [k for k, _, _ in events], timeout_s=120)
        assert {k: r["category"] for k, r in results.items()} == {k: expected for k, _, expected in events}
        stack.wait_ready(workers, timeout_s=30)  # the consumer's next statistics (every 5 s) see the broker up

        stack.broker.kill()
        stack.broker.wait(10)
        deadline = time.monotonic() + 30
        while any(w.ready() for w in workers):
            assert time.monotonic() < deadline, "still ready 30 s after the broker went away"
            time.sleep(0.5)
        for w in workers:
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(f"{w.metrics_url}/readyz", timeout=2)
            assert answer.value.code == 503 and "kafka: no broker connection" in json.load(answer.value)["why"]
            assert w.alive()
    finally:
        stack.close()
