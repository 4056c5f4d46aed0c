"""Keep-alive connections to image hosts, reused across fetches.

A catalogue's photos come from a few hosts (a CDN or two), and a new connection per photo paid a TCP (and TLS)
handshake each time: fetching an 800×800 JPEG from a local HTTPS server took 2.23–2.68 ms of the client's CPU
(2.9–3.7 ms wall), on a kept connection 0.29–0.40 ms (0.5–0.8 ms; see the history's session 23) — the preprocess
worker decodes and resizes a photo in ~0.8 ms. Over a real network each handshake adds round trips too. A connection is reused only under the fetch policy it was opened
under (whose address check it passed), from the thread that opened it.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

MAX_ORIGINS = 16  # open connections kept per thread, the least recently used closed first
MAX_IDLE_S = 20.0  # servers close idle connections (Apache after 5 s, nginx 75 s); one kept longer is likely dead


class ConnectionPool:
    def __init__(self, max_origins: int = MAX_ORIGINS, max_idle_s: float = MAX_IDLE_S):
        self.max_origins = max_origins
        self.max_idle_s = max_idle_s
        self._local = threading.local()
        # a forked child starts with none: its parent's sockets are the parent's (a demo forks its workers)
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._local = threading.local()

    def _idle(self) -> OrderedDict:
        idle = getattr(self._local, "idle", None)
        if idle is None:
            idle = self._local.idle = OrderedDict()  # origin → (connection, when it was given back)
        return idle

    def take(self, origin):
        """An idle connection to `origin` (policy, scheme, host, port), or None."""
        conn, since = self._idle().pop(origin, (None, 0.0))
        if conn is not None and time.monotonic() - since > self.max_idle_s:
            conn.close()
            return None
        return conn

    def give_back(self, origin, conn) -> None:
        """`conn` has read its whole response and may send another request."""
        idle = self._idle()
        old = idle.pop(origin, None)
        if old is not None:
            old[0].close()
        idle[origin] = (conn, time.monotonic())
        while len(idle) > self.max_origins:
            idle.popitem(last=False)[1][0].close()
