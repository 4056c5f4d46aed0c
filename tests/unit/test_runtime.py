"""Worker process start-up: freed record buffers are reused, not faulted in again for every batch."""
import os
import subprocess
import sys

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
