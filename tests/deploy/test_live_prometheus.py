"""Live check of the monitoring: a real Prometheus (the Debian package) runs the shipped scrape
config and rule files against real workers (prodcat.stack.LocalStack: Tansu broker, redis-server,
`python -m preprocess_worker` / `python -m gpu_worker` subprocesses) while traffic flows. Then every
dashboard panel query, every recording rule and every alert expression goes through Prometheus'
HTTP API: panels and recording rules must return data, alerts must evaluate (and the ones that
must be quiet in a healthy stack are). Last, an inference worker is stopped and the worker-down
alerts must see it through the shipped job names and relabeling.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import json

import pytest
import yaml

from tests.deploy import deploy_files as df

PROMETHEUS = df.which("prometheus")

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (apt-get install redis-server)"),
]

# panels that are empty in a healthy run, by design (title → why)
MAY_BE_EMPTY = {
    "Dependency retries": "only when Kafka or Redis calls fail",
    "Model reloads": "only when a new model version is dropped into the model directory",
    "Duplicates rewritten and superseded results / s": "only after an at-least-once redelivery (crash, lost partition) "
                                                        "or events of a product out of order",
}
# alerts that must not fire while the stack is healthy (the others may, e.g. the DLQ ones: the
# traffic here contains bad events on purpose)
QUIET_WHEN_HEALTHY = {
    "ProdcatWorkerDown", "ProdcatWorkerGroupDown", "ProdcatWorkerNotReady", "ProdcatNoResults",
    "ProdcatInferenceNotOnGPU", "ProdcatMixedModelVersions", "ProdcatModelReloadFailing",
}
SETTINGS_TOPIC_FIELDS = ("topic_raw", "topic_tensors", "topic_results", "topic_dlq")


# ------------------------------------------------------------------ Prometheus


class Prometheus:
    """A prometheus process with its own config and TSDB in a temp dir."""

    def __init__(self, workdir: str, config: dict):
        from prodcat.stack import free_port, wait_for_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = os.path.join(workdir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.log_path = os.path.join(workdir, "prometheus.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, timeout_s=30, proc=self.proc)
        self.wait(lambda: self._get("/-/ready", raw=True) is not None, "Prometheus ready")

    def _get(self, path: str, params: dict | None = None, raw: bool = False):
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read()
        except urllib.error.HTTPError as e:  # 400/422: PromQL errors come back as JSON too
            body = e.read()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def api(self, path: str, **params) -> dict:
        reply = self._get(f"/api/v1/{path}", params)
        assert reply is not None, f"no answer from Prometheus for {path}"
        return reply

    def query(self, promql: str) -> dict:
        return self.api("query", query=promql)

    def wait(self, ok, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ok():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()}")
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout_s}s for {what}\n{self.log()[-3000:]}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def has_data(reply: dict) -> bool:
    """Success, at least one series, and at least one finite value (a NaN p99 shows nothing)."""
    if reply.get("status") != "success":
        return False
    result = reply["data"]["result"]
    if reply["data"]["resultType"] == "scalar":
        result = [{"value": result}]
    return any(math.isfinite(float(r["value"][1])) for r in result)


# ------------------------------------------------------------------ traffic


def _photos(directory: str) -> list[str]:
    from PIL import Image

    paths = []
    for i, colour in enumerate([(250, 250, 250), (20, 60, 200), (200, 30, 30)]):
        p = os.path.join(directory, f"photo{i}.jpg")
        Image.new("RGB", (640, 480), colour).save(p, "JPEG", quality=85)
        paths.append(p)
    return paths


class Traffic(threading.Thread):
    """Good events at ~rate/s and a bad one now and then, until stopped: rates, quantiles and the
    DLQ panels need samples in every window Prometheus looks at."""

    def __init__(self, settings, photos: list[str], rate_per_s: float = 15.0):
        super().__init__(name="traffic", daemon=True)
        self.settings, self.photos, self.period = settings, photos, 1.0 / rate_per_s
        self.stop_event = threading.Event()
        self.sent = 0

    def run(self) -> None:
        from common import kafka
        from tests.support.events import good_events

        producer = kafka.make_producer(self.settings, "traffic")
        i = 0
        while not self.stop_event.is_set():
            key, value, _ = good_events(i + 1, self.photos, prefix="live")[i]
            producer.produce(self.settings.topic_raw, value=value, key=key)
            if i % 20 == 0:
                producer.produce(self.settings.topic_raw, value=b"{this is not json", key=f"bad{i}")
            producer.poll(0)
            i += 1
            self.sent = i
            self.stop_event.wait(self.period)
        producer.flush(30)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(60)


# ------------------------------------------------------------------ the live stack


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model):
    from prodcat.stack import LocalStack

    workdir = tmp_path_factory.mktemp("live_prometheus")
    topics = df.topics()
    with LocalStack(str(workdir / "stack")) as stack:
        s = stack.settings
        # the partition counts operators get (deploy/kafka/topics.conf)
        stack.create_topics({f: topics[getattr(s, f)]["partitions"] for f in SETTINGS_TOPIC_FIELDS})
        workers = [stack.start_worker("preprocess", tiny_model, wait_ready=False) for _ in range(2)]
        workers.append(stack.start_worker("inference", tiny_model, wait_ready=False, max_batch=16, max_delay_ms=10))
        stack.wait_ready(workers)

        # the shipped scrape config, targets = these workers. No GPU here: the inference worker
        # stands for the compose service that runs without one.
        inference_name = next(n for n in df.shipped_dns_names("prodcat-inference") if "cpu" in n)
        targets = {
            "prodcat-preprocess": [(f"127.0.0.1:{w.metrics_port}", df.shipped_dns_names("prodcat-preprocess")[0])
                                   for w in workers if w.kind == "preprocess"],
            "prodcat-inference": [(f"127.0.0.1:{w.metrics_port}", inference_name) for w in workers if w.kind == "inference"],
        }
        prom = Prometheus(str(workdir), df.render_live_scrape_config(targets, df.RULE_FILES))
        traffic = Traffic(s, _photos(str(workdir)))
        traffic.start()
        try:
            # data in every window: results written, e2e latency observed, lag reported (librdkafka
            # statistics come every 5 s), rules evaluated on top of them
            for series in ("worker:prodcat_events_out:rate1m", "worker:prodcat_e2e_latency_seconds:p99_5m",
                           "worker_topic:prodcat_consumer_lag:sum", "worker_code:prodcat_dead_letters:rate5m"):
                prom.wait(lambda q=series: has_data(prom.query(q)), f"{series} to have data")
            time.sleep(5)  # a few more scrapes, so [30s] windows hold enough samples
            yield stack, prom, workers, traffic
        finally:
            traffic.stop()
            prom.stop()


# ------------------------------------------------------------------ checks


def test_targets_are_the_shipped_jobs_and_all_up(live):
    _, prom, workers, _ = live
    active = prom.api("targets")["data"]["activeTargets"]
    assert len(active) == len(workers)
    shipped_jobs = {sc["job_name"] for sc in df.load_yaml_docs(df.SCRAPE_CONFIG)[0]["scrape_configs"]}
    assert {t["labels"]["job"] for t in active} == shipped_jobs
    for t in active:
        assert t["health"] == "up", t
        # the shipped relabeling ran: service and accelerator labels from the discovery name
        assert t["labels"]["service"] and t["labels"]["accelerator"] == "cpu", t["labels"]


def test_every_rule_group_is_loaded_and_healthy(live):
    _, prom, _, _ = live

    def evaluated() -> bool:
        groups = prom.api("rules")["data"]["groups"]
        return all(r.get("lastEvaluation", "").startswith("2") and not r["lastEvaluation"].startswith("0001")
                   for g in groups for r in g["rules"])

    prom.wait(evaluated, "every rule evaluated once")
    groups = prom.api("rules")["data"]["groups"]
    expected = {g["name"] for p in df.RULE_FILES for g in df.load_yaml_docs(p)[0]["groups"]}
    assert {g["name"] for g in groups} == expected
    loaded = [r for g in groups for r in g["rules"]]
    assert len(loaded) == len(df.rules())
    bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not bad, bad


@pytest.mark.parametrize("query", df.panel_queries(), ids=lambda q: f"{q.panel}/{q.ref_id}")
def test_dashboard_panel_returns_data(live, query):
    _, prom, _, _ = live
    reply = prom.query(query.promql())
    assert reply["status"] == "success", (query.promql(), reply)
    if query.panel not in MAY_BE_EMPTY:
        assert has_data(reply), f"panel {query.panel!r} is empty: {query.promql()}"


def test_dashboard_variables_find_both_workers(live):
    _, prom, _, _ = live
    for q in df.dashboard_variable_queries():
        metric, label = (x.strip() for x in q[len("label_values("):-1].split(","))
        values = prom.api(f"label/{label}/values", **{"match[]": metric})["data"]
        assert {"preprocess", "inference"} <= set(values), (q, values)


@pytest.mark.parametrize("rule", [r for r in df.rules() if r.kind == "record"], ids=lambda r: r.name)
def test_recording_rule_has_data(live, rule):
    _, prom, _, _ = live
    assert has_data(prom.query(rule.expr)), f"{rule.name}: {rule.expr}"
    assert has_data(prom.query(rule.name)), f"{rule.name} recorded nothing"


@pytest.mark.parametrize("rule", [r for r in df.rules() if r.kind == "alert"], ids=lambda r: f"{r.name}:{r.expr[:40]}")
def test_alert_expression_evaluates(live, rule):
    _, prom, _, _ = live
    reply = prom.query(rule.expr)
    assert reply["status"] == "success", (rule.expr, reply)
    if rule.name in QUIET_WHEN_HEALTHY:
        assert reply["data"]["result"] == [], f"{rule.name} would fire on a healthy stack: {reply['data']['result']}"


def test_results_flow_while_monitored(live):
    stack, _, _, traffic = live
    assert traffic.sent > 100
    from prodcat.stack import read_results

    assert read_results(stack.redis(), stack.settings, [f"live{i}" for i in range(50)]), "no results in Redis"


def test_worker_down_alerts_see_a_stopped_inference_worker(live):
    """Runs last: stops the inference worker; the down alerts must pick it up by job name."""
    _, prom, workers, _ = live
    inference = next(w for w in workers if w.kind == "inference")
    inference.stop()
    by_name = {}
    for r in df.rules():
        by_name.setdefault(r.name, []).append(r)
    down = by_name["ProdcatWorkerDown"][0]
    prom.wait(lambda: any(s["metric"].get("job") == "prodcat-inference" for s in prom.query(down.expr)["data"]["result"]),
              "ProdcatWorkerDown to see the stopped worker", timeout_s=30)
    group_down = [r for r in by_name["ProdcatWorkerGroupDown"] if "prodcat-inference" in r.expr]
    assert len(group_down) == 1 and prom.query(group_down[0].expr)["data"]["result"], "ProdcatWorkerGroupDown(inference)"
    preprocess_down = [r for r in by_name["ProdcatWorkerGroupDown"] if "prodcat-preprocess" in r.expr]
    assert prom.query(preprocess_down[0].expr)["data"]["result"] == []
