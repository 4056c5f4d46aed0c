"""Metric definitions (prefix `prodcat_`) and the /metrics, /healthz, /readyz server.

deploy/ (alerts, recording rules, dashboards) uses exactly these names; change them together.
Every metric carries `worker` = preprocess | inference, so one query can sum over both groups.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

EVENTS_IN = Counter("prodcat_events_in_total", "Records consumed from the input topic", ["worker"])
EVENTS_OUT = Counter("prodcat_events_out_total", "Records fully processed (output delivered, offset committable)", ["worker"])
DEAD_LETTERS = Counter("prodcat_dead_letters_total", "Records sent to the dead-letter topic", ["worker", "code"])
RETRIES = Counter("prodcat_retries_total", "Dependency failures that were retried (broker, Redis, image hosts)", ["worker", "kind"])
DUPLICATES = Counter("prodcat_duplicates_total", "Results rewritten for an input already processed (at-least-once redelivery)", ["worker"])
SUPERSEDED = Counter("prodcat_results_superseded_total", "Results not written to Redis, whose hash holds the result of a "
                     "newer event of that product (out-of-order events; the result is on the output topic)", ["worker"])
COMMITS = Counter("prodcat_commits_total", "Offset commits", ["worker", "reason"])
REBALANCES = Counter("prodcat_rebalances_total", "Partition assignment changes", ["worker", "kind"])
BATCH_SIZE = Histogram("prodcat_batch_size", "Items per processed batch", ["worker"], buckets=_BATCH_BUCKETS)
STAGE_SECONDS = Histogram("prodcat_stage_seconds", "Time per batch spent in one stage", ["worker", "stage"], buckets=_LATENCY_BUCKETS)
INFERENCE_SECONDS = Histogram(
    "prodcat_inference_seconds", "ONNX Runtime time per batch", ["worker", "provider", "model_version"], buckets=_LATENCY_BUCKETS
)
E2E_SECONDS = Histogram("prodcat_e2e_latency_seconds", "Event time → result written to Redis", ["worker"], buckets=_LATENCY_BUCKETS)
CONSUMER_LAG = Gauge("prodcat_consumer_lag", "Messages behind the high watermark (librdkafka statistics)", ["worker", "topic", "partition"])
MODEL_INFO = Gauge("prodcat_model_info", "1 for the model version being served", ["worker", "model_version", "provider", "precision"])
MODEL_RELOADS = Counter("prodcat_model_reloads_total", "Model reload attempts", ["worker", "outcome"])
PAUSED = Gauge("prodcat_paused", "1 while consumption is paused because a dependency (Redis, broker) failed", ["worker"])
RECOVERY_SECONDS = Histogram(
    "prodcat_recovery_seconds", "First failed checkpoint → next successful one (dependency outage)", ["worker"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
TOKENIZER_MISMATCHES = Counter(
    "prodcat_tokenizer_mismatch_total", "Tensor records tokenized with another vocabulary than the served model's",
    ["worker", "outcome"],
)
READY = Gauge("prodcat_ready", "1 when the worker is consuming and its dependencies answer", ["worker"])


class Health:
    """Liveness = the loop is alive; readiness = assigned + dependencies reachable. Set by the worker loop
    (assignment, checkpoints, idle probes) and by its consumer's statistics (a broker connection)."""

    def __init__(self, worker: str):
        self.worker = worker
        self._ready = False
        self._why = "starting"
        self._unreachable: dict[str, str] = {}  # dependency → why, while it does not answer
        self.alive = True

    def set_ready(self, ready: bool, why: str = "") -> None:
        self._ready, self._why = ready, why
        self._publish()

    def set_unreachable(self, dependency: str, why: str) -> None:
        """`why` "" once it answers again. An idle worker has no batch to fail: without this, one whose broker or
        Redis went away stayed ready through the outage."""
        if why:
            self._unreachable[dependency] = why
        else:
            self._unreachable.pop(dependency, None)
        self._publish()

    def _publish(self) -> None:
        READY.labels(self.worker).set(1 if self.ready else 0)

    @property
    def ready(self) -> bool:
        return self._ready and not self._unreachable

    @property
    def why(self) -> str:
        return next(iter(self._unreachable.values()), self._why)


def serve(health: Health, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the HTTP server on a daemon thread; port 0 picks a free one (server.server_port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            if self.path.startswith("/metrics"):
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path.startswith("/healthz"):
                self._json(200 if health.alive else 503, {"alive": health.alive})
            elif self.path.startswith("/readyz"):
                self._json(200 if health.ready else 503, {"ready": health.ready, "why": health.why})
            else:
                self._send(404, b"not found\n", "text/plain")

        def _json(self, code, obj):
            self._send(code, json.dumps(obj).encode() + b"\n", "application/json")

        def _send(self, code, body, ctype):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def record_kafka_stats(worker: str, stats_json: str, health: Health | None = None) -> None:
    """librdkafka `stats_cb`: consumer lag per assigned partition (broker offsets APIs are not trusted), and
    whether the consumer holds a connection to any broker: a group member always does (heartbeats, fetches)."""
    stats = json.loads(stats_json)
    brokers = stats.get("brokers", {})
    if health is not None and brokers:
        up = any(b.get("state") == "UP" for b in brokers.values())
        states = ", ".join(f"{name} {b.get('state')}" for name, b in sorted(brokers.items())[:4])
        health.set_unreachable("kafka", "" if up else f"kafka: no broker connection ({states})")
    for topic, t in stats.get("topics", {}).items():
        for pid, p in t.get("partitions", {}).items():
            if pid == "-1" or p.get("consumer_lag", -1) < 0:
                continue
            CONSUMER_LAG.labels(worker, topic, pid).set(p["consumer_lag"])


def forget_lag(worker: str, topic: str, partition: int) -> None:
    try:
        CONSUMER_LAG.remove(worker, topic, str(partition))
    except KeyError:
        pass
