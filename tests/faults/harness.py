"""What every fault scenario shares: a stream of N events published at a steady rate (so a fault lands
mid-stream), progress and recovery probes, and the final count — results in Redis, results on the output
topic, dead letters, lost (= N − classified − dead-lettered) and duplicates — as one summary line."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from common import schemas
from prodcat.stack import LocalStack, WorkerProcess, publish, read_results, read_topic, wait_for_outcomes

N = 2_000
RATE = 250  # events/s: the stream lasts ~8 s, long enough for a fault to land in the middle of it
FAULT_WORKER_OPTIONS = {"model_reload_s": 1.0}
INFERENCE_OPTIONS = {"max_batch": 32, "max_delay_ms": 20}


def start(stack: LocalStack, kind: str, model: str, **options) -> WorkerProcess:
    extra = INFERENCE_OPTIONS if kind == "inference" else {}
    return stack.start_worker(kind, model, wait_ready=False, **{**FAULT_WORKER_OPTIONS, **extra, **options})


def start_pipeline(stack: LocalStack, model: str, both: dict | None = None,
                   **preprocess_options) -> tuple[WorkerProcess, WorkerProcess]:
    """One preprocess + one inference worker, ready; `both`: options for the two of them."""
    both = both or {}
    pre, inf = start(stack, "preprocess", model, **both, **preprocess_options), start(stack, "inference", model, **both)
    stack.wait_ready([pre, inf])
    return pre, inf


@dataclass
class Outcome:
    scenario: str
    n: int
    in_redis: int
    on_topic: int
    dead: int
    lost: int
    duplicates: int
    recovery_s: float | None
    note: str = ""
    wrong: list = field(default_factory=list)  # (key, what was expected, what happened)

    def line(self) -> str:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return (f"{self.scenario}: N={self.n} redis={self.in_redis} topic={self.on_topic} dlq={self.dead} "
                f"lost={self.lost} duplicates={self.duplicates} recovery_s={rec}" + (f" ({self.note})" if self.note else ""))

    def row(self) -> str:
        rec = "–" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return f"| {self.scenario} | {self.n} | {self.lost} | {self.duplicates} | {self.dead} | {rec} | {self.note} |"


def wait_for(condition, what: str = "condition", timeout_s: float = 60.0) -> float:
    """Seconds until condition() holds; fails the test past timeout_s."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout_s, f"{what}: not met after {timeout_s}s"
        time.sleep(0.1)
    return time.monotonic() - t0


class Scenario:
    """Good events (key, event, expected category) plus bad records (key, payload, expected DLQ code, topic)."""

    def __init__(self, stack: LocalStack, name: str, good: list, bad: list | None = None):
        self.stack = stack
        self.name = name
        self.good = good
        self.bad = bad or []
        self._threads: list[threading.Thread] = []

    @property
    def keys(self) -> list[str]:
        return [k for k, _, _ in self.good] + [k for k, _, _, _ in self.bad]

    def publish(self, records: list[tuple[str, bytes | None]], rate: float | None = RATE, topic: str | None = None) -> None:
        """In the background: the stream goes on while the test injects its fault."""
        t = threading.Thread(target=publish, args=(self.stack.settings, records), kwargs={"rate_per_s": rate, "topic": topic},
                             daemon=True)
        t.start()
        self._threads.append(t)

    def classified(self) -> int:
        """Results in Redis so far (the stack's Redis holds nothing else); -1 while Redis is down."""
        try:
            return self.stack.redis().dbsize()
        except OSError:
            return -1

    def drained(self) -> bool:
        return self.classified() >= len(self.good)

    def wait_classified(self, count: int, timeout_s: float = 120.0) -> None:
        wait_for(lambda: self.classified() >= count, f"{self.name}: {count} results", timeout_s)

    def finish(self, recovery_s: float | None = None, note: str = "", timeout_s: float = 240.0) -> Outcome:
        for t in self._threads:
            t.join(timeout_s)
        settings = self.stack.settings
        wait_for_outcomes(self.stack, [k for k, _, _ in self.good], timeout_s=timeout_s)
        dead_keys = {k for k, _, _, _ in self.bad}
        deadline = time.monotonic() + 60
        while True:  # dead letters are flushed with their batch; wait until the expected ones are all there
            dlq = read_topic(settings, settings.topic_dlq, idle_s=1.0)
            if dead_keys <= {_key(m) for m in dlq} or time.monotonic() > deadline:
                break
        results = read_topic(settings, settings.topic_results, idle_s=1.0)
        return self._count(read_results(self.stack.redis(), settings, self.keys), results, dlq, recovery_s, note)

    def _count(self, in_redis: dict, results: list, dlq: list, recovery_s, note) -> Outcome:
        mine = set(self.keys)
        on_topic = Counter(k for k in map(_key, results) if k in mine)
        dead = Counter(k for k in map(_key, dlq) if k in mine)
        codes = {_key(m): schemas.decode_dead_letter(m.value())["error_code"] for m in dlq}
        wrong = []
        for key, _, category in self.good:
            got = in_redis.get(key, {}).get("category") or (f"DLQ {codes[key]}" if key in codes else "nothing")
            if got != category or key not in on_topic:
                wrong.append((key, category, got))
        for key, _, code, _ in self.bad:
            if codes.get(key) != code or key in in_redis:
                wrong.append((key, code, codes.get(key) or in_redis.get(key, {}).get("category") or "nothing"))
        lost = len(mine - set(in_redis) - set(dead))
        duplicates = sum(c - 1 for c in on_topic.values()) + sum(c - 1 for c in dead.values())
        out = Outcome(self.name, len(mine), len(in_redis), len(on_topic), len(dead), lost, duplicates, recovery_s, note, wrong)
        print(out.line(), flush=True)
        return out


def _key(msg) -> str:
    return msg.key().decode() if msg.key() is not None else ""


# ------------------------------------------------------------------ recovery


def assignments(workers: list[WorkerProcess]) -> dict[int, float]:
    """Per worker, how many partition assignments it has had: taken before a fault, to see the next one."""
    return {w.proc.pid: w.metric("prodcat_rebalances_total", kind="assign") for w in workers}


def wait_recovered(t0: float, workers: list[WorkerProcess], before: dict[int, float] | None = None,
                   timeout_s: float = 120.0, drained=None) -> float:
    """Seconds from t0 until every worker in `workers` is ready, has been assigned partitions since `before`
    (None: no rebalance expected) and has committed a batch since then: its stage is processing again.
    `drained()` True (every event already classified: nothing left to commit) also ends the wait for a
    ready, assigned worker — on a slow machine the stream can end before the rebalance does."""
    waiting = {w.proc.pid: w for w in workers}
    out_at: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while waiting:
        assert time.monotonic() < deadline, f"not recovered after {timeout_s}s: {[w.kind for w in waiting.values()]}"
        for pid, w in list(waiting.items()):
            assert w.alive(), f"{w.kind} worker died:\n{w.log()[-3000:]}"
            if pid not in out_at:
                if before is None or w.metric("prodcat_rebalances_total", kind="assign") > before.get(pid, 0):
                    out_at[pid] = w.metric("prodcat_events_out_total")
            elif w.ready() and (w.metric("prodcat_events_out_total") > out_at[pid] or (drained and drained())):
                del waiting[pid]
        time.sleep(0.1)
    return time.monotonic() - t0
