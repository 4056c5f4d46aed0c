"""Workers killed (-9) or stopped (SIGTERM) mid-stream, then restarted: nothing is lost; a clean stop
finishes and commits its batch, so nothing is processed twice."""
from __future__ import annotations

import signal
import time

import pytest

from tests.faults.harness import N, Scenario, start, start_pipeline, wait_recovered
from tests.support.events import good_events


@pytest.mark.parametrize("kind", ["preprocess", "inference"])
def test_kill_9_mid_stream_then_restart_loses_nothing(kind, stack, tiny_model, sample_jpegs, report):
    workers = dict(zip(("preprocess", "inference"), start_pipeline(stack, tiny_model)))
    scenario = Scenario(stack, f"kill -9 {kind} worker", good_events(N, sample_jpegs, prefix=f"k{kind[0]}-"))
    scenario.publish([(k, v) for k, v, _ in scenario.good])
    scenario.wait_classified(N // 4)
    t0 = time.monotonic()
    workers[kind].signal(signal.SIGKILL)  # no goodbye: its group session runs out, its uncommitted batch is redone
    workers[kind].wait()
    replacement = start(stack, kind, tiny_model)
    recovery = wait_recovered(t0, [replacement], drained=scenario.drained)
    out = scenario.finish(recovery, note="restarted at once; recovery includes the 6 s session timeout")
    report(out)
    assert out.lost == 0 and not out.wrong, out.wrong[:5]
    assert all(w.alive() for w in (*workers.values(), replacement) if w is not workers[kind])


def test_sigterm_during_a_batch_exits_cleanly_and_processes_nothing_twice(stack, tiny_model, sample_jpegs, report):
    pre, inf = start_pipeline(stack, tiny_model)
    scenario = Scenario(stack, "SIGTERM preprocess, then inference", good_events(N, sample_jpegs, prefix="st-"))
    scenario.publish([(k, v) for k, v, _ in scenario.good])
    recoveries = []
    for fraction, worker in ((0.25, pre), (0.55, inf)):
        scenario.wait_classified(int(N * fraction))
        t0 = time.monotonic()
        assert worker.stop() == 0, worker.log()[-3000:]  # finishes its batch, commits, leaves the group
        assert "stopped" in worker.log()
        recoveries.append(wait_recovered(t0, [start(stack, worker.kind, tiny_model)], drained=scenario.drained))
    out = scenario.finish(max(recoveries), note="replacement started after a clean exit")
    report(out)
    assert out.lost == 0 and not out.wrong, out.wrong[:5]
    assert out.duplicates == 0  # a clean stop commits what it processed: the replacement redoes nothing
