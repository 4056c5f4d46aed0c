"""Worker process start-up: freed record buffers are reused, not faulted in again for every batch; a flood of one
kind of log line is held back to a few a minute."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A poll batch of 150 KB tensor records held until librdkafka delivers them, then freed together, ten times:
# minor page faults per record after the first batch.
BATCHES = """
import resource, sys
from common.runtime import reuse_freed_memory
if sys.argv[1] == "on" and not reuse_freed_memory():
    sys.exit(3)
def batch():
    return [bytes(150_000) for _ in range(240)]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
batch()
before = faults()
for _ in range(10):
    batch()
print((faults() - before) / 2400)
"""


def faults_per_record(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", BATCHES, mode], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if out.returncode == 3:
        pytest.skip("not glibc: mallopt() unavailable")
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_freed_record_buffers_are_reused_without_page_faults():
    default, reused = faults_per_record("off"), faults_per_record("on")
    # a 150 KB buffer is ~37 pages: glibc's defaults trim the freed batch and fault most of them in again
    assert reused < 0.5, f"{reused} faults per record with reuse, {default} with glibc's defaults"


def test_quiet_repeats_passes_a_few_of_a_kind_per_window_and_says_how_many_it_held_back_when_the_window_ends():
    import logging

    from common.runtime import QuietRepeats

    told: list[logging.LogRecord] = []
    quiet = QuietRepeats(told.append, burst=3, window_s=1.0)

    def passes(msg, *args, **extra) -> str | None:
        record = logging.LogRecord("common.kafka", logging.WARNING, __file__, 1, msg, args, None)
        record.__dict__.update(extra)
        return record.getMessage() if quiet.filter(record) else None

    connect = "Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after %dms in state CONNECT)"
    shown = [passes(connect, i) for i in range(50)]  # one reconnect every 50 ms: a broker that is down
    assert sum(s is not None for s in shown) == 3  # the durations in the text do not make it another message
    assert passes("1/1 brokers are down") is not None  # another kind has its own budget
    assert passes("Connect to ipv4#10.0.0.7:9092 failed: Connection refused") is not None  # so has another broker
    letters = [passes("dead letter %s at %s: %s", "BAD_JSON", f"products.raw@{i}", f"reason {i}",
                      repeat_key=("dead letter", "preprocess", "BAD_JSON")) for i in range(10)]
    assert sum(s is not None for s in letters) == 3  # one kind by its key, whatever the text
    assert told == []

    # the flood stops; its count is told when its window ends, without waiting for another line of its kind
    time.sleep(1.5)
    summaries = sorted(r.getMessage() for r in told)
    assert summaries == ["47 more like this held back in the last 1 s: " + connect % 49,
                         "7 more like this held back in the last 1 s: dead letter BAD_JSON at products.raw@9: reason 9"]
    assert all(quiet.filter(r) for r in told) and told[0].levelno == logging.WARNING  # a summary is never held back
    assert passes(connect, 8) == connect % 8  # a new window: nothing held back yet
