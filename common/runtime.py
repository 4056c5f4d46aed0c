"""Process start-up shared by both workers: logging, SIGTERM → graceful stop, metrics server."""
from __future__ import annotations

import functools
import logging
import os
import re
import signal
import threading
import time

from common import metrics
from common.metrics import Health
from common.settings import Settings


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("PRODCAT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietRepeats(handler.handle))


# a duration inside a message ("after 0ms in state CONNECT") does not make it another message
_DURATION = re.compile(r"\d+(\.\d+)?\s?ms\b")


class QuietRepeats(logging.Filter):
    """At most `burst` records of a kind per `window_s`; when a window that held records back ends, one line says
    how many (through `emit`, the handler's own `handle`), so an outage's count shows when it ends, not whenever
    its next line happens to come. A kind is the record's `repeat_key` (`extra=`) when it has one, else its text.
    A broker that is down makes librdkafka report every reconnect attempt, ~20 a second per client, and the error
    callback each again: 40 lines a second per worker for as long as the outage lasts; a malformed feed
    dead-letters as fast. Rare records all pass."""

    MAX_KINDS = 1000  # kinds remembered at once; the oldest are forgotten first

    def __init__(self, emit, burst: int = 5, window_s: float = 60.0):
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._emit = emit
        self._kinds: dict = {}  # kind → [window start, records passed in it, records held back in it, the last of those]
        self._lock = threading.Lock()  # handlers filter outside their own lock; lanes and reload threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "held_back_summary", False):
            return True
        kind = getattr(record, "repeat_key", None) or (record.name, record.levelno, _DURATION.sub("…", record.getMessage()))
        with self._lock:
            now = time.monotonic()
            seen = self._kinds.get(kind)
            if seen is None or now - seen[0] >= self.window_s:
                self._kinds.pop(kind, None)  # re-inserted last: the dict stays oldest first
                self._kinds[kind] = seen = [now, 0, 0, None]
                if len(self._kinds) > self.MAX_KINDS:
                    del self._kinds[next(iter(self._kinds))]
            if seen[1] < self.burst:
                seen[1] += 1
                return True
            seen[2] += 1
            seen[3] = record
            if seen[2] == 1:  # the window's first record held back: its count is told when the window ends
                timer = threading.Timer(seen[0] + self.window_s - now, self._tell_held_back, (kind, seen))
                timer.daemon = True  # a count still pending at exit is lost with the process, not waited for
                timer.start()
            return False

    def _tell_held_back(self, kind, window: list) -> None:
        with self._lock:
            _, _, held, example = window
            if self._kinds.get(kind) is window:
                del self._kinds[kind]  # the next record of this kind starts a window of its own
        summary = logging.LogRecord(example.name, example.levelno, example.pathname, example.lineno,
                                    f"{held} more like this held back in the last {self.window_s:.0f} s: "
                                    f"{example.getMessage()}", (), None)
        summary.held_back_summary = True
        self._emit(summary)


# glibc mallopt() parameters (malloc.h); prctl() option (linux/prctl.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_PR_SET_NAME = 15


@functools.cache
def _libc():
    """The C library through ctypes, or None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def reuse_freed_memory() -> bool:
    """Let glibc keep freed memory for the next batch instead of handing it back to the kernel.

    Records are ~150 KB buffers (decoded image, tensor record, librdkafka's copy and its lz4 output), and a
    poll batch of them is freed together once delivered. glibc's defaults return that memory (heap trim, or
    unmap above the mmap threshold), so the next batch faults every page in again, zeroed: ~50 minor faults
    per item in the preprocess worker, ~0.15 core-ms. Now buffers up to 32 MiB (a batch of images) come from
    the heap and it is trimmed only past 256 MiB free (preprocess RSS 78 → 117 MB).
    False where the C library is not glibc (nothing changes there)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 256 << 20), (_M_TOP_PAD, 16 << 20))
    applied = [mallopt(param, value) == 1 for param, value in settings]  # every one, even after a refusal
    return all(applied)


def name_this_thread(name: str) -> None:
    """Name the calling thread for the OS (Linux `comm`, 15 bytes; Python's thread names stay inside Python), so
    `top -H`, `perf` and the bench's per-thread CPU tell it from the runtimes' own threads. Best effort."""
    prctl = getattr(_libc(), "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop finishes its batch, commits, and leaves the group."""

    def __init__(self):
        self._event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._event.set())

    def __bool__(self) -> bool:
        return self._event.is_set()


def start_metrics(worker: str, settings: Settings) -> Health:
    health = Health(worker)
    server = metrics.serve(health, settings.metrics_port)
    logging.getLogger(worker).info("metrics on :%d", server.server_port)
    return health


def worker_main(worker: str, description: str, build, argv: list[str] | None = None) -> int:
    """Parse flags into Settings, start /metrics, build the worker (`build(settings, stop, health)`), run it."""
    import argparse
    import sys

    from common import settings as settings_mod
    from common.model import ModelError

    parser = argparse.ArgumentParser(prog=f"prodcat {worker}", description=description)
    settings_mod.add_arguments(parser)
    settings = settings_mod.load(parser.parse_args(argv))
    setup_logging()
    reuse_freed_memory()
    stop = StopFlag()
    health = start_metrics(worker, settings)
    try:
        loop = build(settings, stop, health)
    except ModelError as e:  # no model to serve: a clear message, not a traceback
        print(f"{worker}: {e}", file=sys.stderr)
        return 2
    loop.run()
    return 0
