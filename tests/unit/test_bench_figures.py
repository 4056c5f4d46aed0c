"""The benchmark's derived figures: the bound uses each stage's cheapest measured cost per item."""
import os
import threading
import time

from common.model import LANE_THREAD_NAME, _lane_pool
from common.runtime import name_this_thread
from prodcat.bench import cheapest_run, derive, markdown, per_batch, thread_cpu_seconds


def _fig(**over):
    fig = {"machine": {"cpu_count": 2}, "preprocess_items_per_s_per_core": 500.0, "broker_core_ms_per_record": 0.5,
           "inference_threads": 2, "inference_items_per_s_best": 800.0, "inference_items_per_s_per_core": 400.0,
           "e2e_full": {"items_per_s": 300.0, "lost": 0, "p50_ms": 1, "p95_ms": 2, "p99_ms": 3,
                        "core_ms_per_item": {"broker": 0.5, "preprocess workers": 2.0, "total": 2.5},
                        "core_ms_per_item_by_thread": {"inference workers": {"main": 0.1, "librdkafka": 0.05, "lanes": 0.07,
                                                                             "runtime + other": 2.2}},
                        "inference_per_batch": {"mean_batch": 31.5, "infer_ms": 80.0, "flush_ms": 1.2}},
           "e2e_half": {"items_per_s": 150.0, "lost": 1, "p50_ms": 10, "p95_ms": 20, "p99_ms": 30},
           "naive_items_per_s": 100.0}
    fig.update(over)
    return fig


def test_bound_takes_the_cheapest_inference_and_the_ratios_follow():
    out = derive(_fig())
    # 2 cores ÷ (2.0 preprocess + 0.5 broker + min(2/800, 1/400) = 2.5 inference) core-ms
    assert out["bound_items_per_s"] == 400.0
    assert out["pipeline_efficiency"] == 0.75 and out["speedup_vs_naive"] == 3.0
    assert out["lost"] == 1 and out["p99_ms_half_load"] == 30
    slower_pool = derive(_fig(inference_items_per_s_best=500.0))  # 4 core-ms at 2 threads: 1 thread is cheaper
    assert slower_pool["bound_items_per_s"] == 400.0


def test_markdown_lists_the_per_process_costs_and_skips_missing_figures():
    fig = _fig(broker_core_ms_per_record_runs=[0.7, 0.5, 0.6], inference_items_per_s_per_core_runs=[380.0, 400.0])
    fig.update(derive(fig))
    md = markdown(fig)
    assert "| broker + client CPU per tensor record, each run | [0.7, 0.5, 0.6] | core-ms |" in md
    assert "| inference per core, each run | [380.0, 400.0] | items/s |" in md
    assert "| end to end, core-ms per item: broker / preprocess workers / total | 0.5 / 2.0 / 2.5 | core-ms |" in md
    assert ("| end to end, inference workers' threads, core-ms per item: main / librdkafka / lanes / runtime + other | "
            "0.1 / 0.05 / 0.07 / 2.2 | core-ms |") in md
    assert "| end to end, inference worker per batch: mean_batch / infer_ms / flush_ms | 31.5 / 80.0 / 1.2 | items, ms |" in md
    assert "fp32 graph" not in md  # not measured in this figure set
    assert "host drift" not in md  # no stage loops around the full-load runs


def _probe(preprocess: float, inference: float) -> dict:
    return {"preprocess_items_per_s_per_core": preprocess, "inference_items_per_s_per_core": inference}


def test_each_run_is_set_against_the_stage_loops_on_either_side_of_it():
    # the host slows between the first two probes: run 1's bound takes the faster loops, run 2's the slower ones
    probes = [_probe(500.0, 400.0), _probe(400.0, 250.0), _probe(500.0, 250.0)]
    full = {**_fig()["e2e_full"], "items_per_s": 250.0, "items_per_s_runs": [300.0, 200.0], "host_probes": probes}
    fig = _fig(e2e_full=full)
    fig.update(derive(fig))
    # 2 cores ÷ (2.0 preprocess + 0.5 broker + 2.5 inference) = 400; ÷ (2.0 + 0.5 + 4.0) = 307.7
    assert fig["bound_items_per_s_runs"] == [400.0, 307.7]
    assert fig["pipeline_efficiency_runs"] == [0.75, 0.65]
    assert fig["pipeline_efficiency"] == 0.7  # the median of the runs'
    assert fig["pipeline_efficiency_unpaired"] == 0.625  # 250 against the stage section's 400
    assert fig["host_drift"] == 0.625
    md = markdown(fig)
    assert "| stage loops around the full-load runs, before run 1 and after each: preprocess 1 core / inference 1 thread | " \
           "500.0 / 400.0 → 400.0 / 250.0 → 500.0 / 250.0 | items/s |" in md
    assert "| **pipeline efficiency** (median run ÷ its own bound) | 0.7 |  |" in md
    assert "| pipeline efficiency against the bound measured first (e2e ÷ bound) | 0.625 |  |" in md


def test_without_stage_loops_around_the_runs_the_efficiency_is_against_the_bound_measured_first():
    fig = _fig()
    fig.update(derive(fig))
    assert fig["pipeline_efficiency"] == fig["pipeline_efficiency_unpaired"] == 0.75
    assert "host_drift" not in fig and "pipeline_efficiency_runs" not in fig
    assert "| **pipeline efficiency** (e2e ÷ bound) | 0.75 |  |" in markdown(fig)


def test_per_batch_divides_the_stage_totals_by_the_batches_between_two_readings():
    before = {"infer": 1.0, "flush": 0.1, "sink": 0.2, "commit": 0.0, "batches": 10.0, "items": 300.0}
    after = {"infer": 3.0, "flush": 0.2, "sink": 0.6, "commit": 0.1, "batches": 30.0, "items": 2300.0}
    assert per_batch(before, after) == {"mean_batch": 100.0, "infer_ms": 100.0, "flush_ms": 5.0, "sink_ms": 20.0, "commit_ms": 5.0}
    assert per_batch(after, after)["mean_batch"] == 0.0  # no batch between the readings: no division by zero


def test_cheapest_run_measures_every_repeat_and_keeps_the_least_cost():
    rates = iter([380.0, 420.0, 400.0])
    best, runs = cheapest_run(3, lambda: next(rates), lambda rate: 1 / rate)
    assert best == 420.0 and runs == [380.0, 420.0, 400.0]
    assert cheapest_run(0, lambda: 1.0, float)[1] == [1.0]  # at least one run


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_thread_cpu_seconds_sorts_a_process_threads_by_their_os_names():
    burned, release = threading.Barrier(3), threading.Event()

    def thread(name: str, seconds: float) -> None:
        name_this_thread(name)
        _burn(seconds)
        burned.wait()
        release.wait()  # still alive when read: an ended thread's CPU leaves /proc/PID/task

    before = thread_cpu_seconds(os.getpid())
    threads = [threading.Thread(target=thread, args=args) for args in ((LANE_THREAD_NAME, 0.3), ("rdk:broker1", 0.2))]
    for t in threads:
        t.start()
    burned.wait()
    after = thread_cpu_seconds(os.getpid())
    release.set()
    for t in threads:
        t.join()
    assert 0.29 <= after["lanes"] - before["lanes"] < 0.5
    assert 0.19 <= after["librdkafka"] - before["librdkafka"] < 0.4
    assert after["runtime + other"] - before["runtime + other"] < 0.1  # nothing else burned meanwhile


def test_inference_lanes_carry_their_os_level_name():
    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", encoding="utf-8") as f:
            return f.read().strip()

    assert _lane_pool(2).submit(comm).result() == LANE_THREAD_NAME
