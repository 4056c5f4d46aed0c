"""A replica of each worker added and later removed mid-stream: two rebalances each, nothing lost."""
from __future__ import annotations

import time

import pytest

from tests.faults.harness import N, Scenario, assignments, start, start_pipeline, wait_recovered
from tests.support.events import good_events


@pytest.mark.parametrize("kind", ["preprocess", "inference"])
def test_add_then_remove_a_replica_mid_stream_loses_nothing(kind, stack, tiny_model, sample_jpegs, report):
    first = dict(zip(("preprocess", "inference"), start_pipeline(stack, tiny_model)))[kind]
    scenario = Scenario(stack, f"add + remove one {kind} replica", good_events(N, sample_jpegs, prefix=f"r{kind[0]}-"))
    scenario.publish([(k, v) for k, v, _ in scenario.good])

    scenario.wait_classified(N // 4)
    before, t0 = assignments([first]), time.monotonic()
    second = start(stack, kind, tiny_model)
    added = wait_recovered(t0, [first, second], before, drained=scenario.drained)  # both own partitions and process them

    scenario.wait_classified(N * 3 // 5)
    before, t0 = assignments([first]), time.monotonic()
    assert second.stop() == 0  # scale down: clean leave, its partitions move to the first replica
    removed = wait_recovered(t0, [first], before, drained=scenario.drained)

    out = scenario.finish(max(added, removed), note=f"add {added:.1f} s, remove {removed:.1f} s")
    report(out)
    assert out.lost == 0 and not out.wrong, out.wrong[:5]
    assert all(w.alive() for w in stack.workers if w is not second)
