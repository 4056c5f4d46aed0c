"""Readers for the files under deploy/, shared by the static and the live checks.

Nothing here hard-codes a metric name, a setting or a port: those come from common.metrics,
common.settings and the deploy files themselves.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MONITORING = DEPLOY / "monitoring"
SCRAPE_CONFIG = MONITORING / "prometheus.yml"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
TOPICS_CONF = DEPLOY / "kafka" / "topics.conf"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"

# Grafana's built-in variables and the dashboard's own, as the live check substitutes them
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$__interval": "15s",
    "$__range": "5m",
    "${worker}": ".*",
    "$worker": ".*",
}


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_yaml_docs(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ------------------------------------------------------------------ settings


def settings_env_names() -> set[str]:
    """Every env var common.settings.load() reads (the passthrough prefix aside)."""
    from common import settings as s
    from common.images import FetchPolicy

    names = {f"{s.ENV_PREFIX}{f.name.upper()}" for f in dataclasses.fields(s.Settings) if f.name not in ("image_policy", "kafka")}
    names |= {f"{s.ENV_PREFIX}IMAGE_{f.name.upper()}" for f in dataclasses.fields(FetchPolicy)}
    return names


def is_valid_prodcat_env(name: str) -> bool:
    from common import settings as s

    if name.startswith(s.KAFKA_ENV_PREFIX):
        option = name[len(s.KAFKA_ENV_PREFIX):]
        # librdkafka option names are lower-case words joined by dots: SASL_USERNAME -> sasl.username
        return bool(re.fullmatch(r"[A-Z0-9]+(_[A-Z0-9]+)*", option))
    return name in settings_env_names()


# ------------------------------------------------------------------ metrics


def exported_metric_names() -> set[str]:
    """Series names the workers can expose: common.metrics' registry (prodcat_* and the default
    process_* / python_* collectors), expanded the way the text exposition format names samples."""
    import common.metrics  # noqa: F401  (registers the prodcat metrics on the default registry)
    from prometheus_client import REGISTRY

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created", ""),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "enum": ("",),
        "unknown": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    }
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + sfx for sfx in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


# series Prometheus itself attaches to every scrape target
PROMETHEUS_SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                            "scrape_samples_post_metric_relabeling", "scrape_series_added"}

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                    "bool", "offset", "inf", "nan", "atan2"}


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small lexer: strings, label matchers, ranges,
    grouping clauses and function calls are removed before picking identifiers)."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges / subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


# ------------------------------------------------------------------ rules and dashboards


@dataclasses.dataclass(frozen=True)
class Rule:
    file: str
    group: str
    name: str  # alert or record name
    kind: str  # "alert" | "record"
    expr: str


def rules() -> list[Rule]:
    out = []
    for path in RULE_FILES:
        for group in load_yaml_docs(path)[0]["groups"]:
            for r in group["rules"]:
                kind = "alert" if "alert" in r else "record"
                out.append(Rule(path.name, group["name"], r[kind], kind, r["expr"]))
    return out


@dataclasses.dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str  # as written, with Grafana variables

    def promql(self) -> str:
        e = self.expr
        for var, value in GRAFANA_VARIABLES.items():
            e = e.replace(var, value)
        return e


def _panels(items: list) -> list:
    for p in items:
        yield p
        yield from _panels(p.get("panels", []))  # rows may nest panels


def panel_queries() -> list[PanelQuery]:
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text(encoding="utf-8"))
        for p in _panels(dash["panels"]):
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append(PanelQuery(path.name, p["title"], t["refId"], t["expr"]))
    return out


def dashboard_variable_queries() -> list[str]:
    """label_values(metric, label) queries of the dashboards' template variables."""
    out = []
    for path in DASHBOARDS:
        for v in json.loads(path.read_text(encoding="utf-8"))["templating"]["list"]:
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                out.append(q)
    return out


# ------------------------------------------------------------------ topics


def topics() -> dict[str, dict]:
    """topics.conf → {topic: {"partitions": int, "configs": {k: v}}}."""
    out = {}
    for line in TOPICS_CONF.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        configs = dict(c.split("=", 1) for c in parts[2].split(",")) if len(parts) > 2 else {}
        out[parts[0]] = {"partitions": int(parts[1]), "configs": configs}
    return out


# ------------------------------------------------------------------ Prometheus config for the live check


def render_live_scrape_config(targets_by_job: dict[str, list[tuple[str, str]]], rule_files: list[Path],
                              interval: str = "1s") -> dict:
    """The shipped prometheus.yml with its service discovery swapped for static targets.

    targets_by_job: job name → [(host:port, discovery name)]. The discovery name is set as
    `__meta_dns_name`, the label the shipped dns_sd_configs would have produced, so the shipped
    relabel_configs run unchanged. Job names, metrics paths and relabeling are kept as shipped.
    """
    cfg = load_yaml_docs(SCRAPE_CONFIG)[0]
    cfg["global"] = {**cfg.get("global", {}), "scrape_interval": interval, "scrape_timeout": interval,
                     "evaluation_interval": interval}
    cfg["rule_files"] = [str(p) for p in rule_files]
    jobs = {}
    for sc in cfg["scrape_configs"]:
        job = sc["job_name"]
        if job not in targets_by_job:
            raise KeyError(f"no live targets given for shipped job {job!r}")
        for key in [k for k in sc if k.endswith("_sd_configs") or k == "static_configs"]:
            del sc[key]
        sc.pop("scrape_interval", None)
        sc.pop("scrape_timeout", None)
        groups: dict[str, list[str]] = {}
        for address, sd_name in targets_by_job[job]:
            groups.setdefault(sd_name, []).append(address)
        sc["static_configs"] = [{"targets": addrs, "labels": {"__meta_dns_name": name}} for name, addrs in groups.items()]
        jobs[job] = sc
    unknown = set(targets_by_job) - set(jobs)
    if unknown:
        raise KeyError(f"jobs {sorted(unknown)} are not in the shipped scrape config")
    return cfg


def shipped_dns_names(job: str) -> list[str]:
    for sc in load_yaml_docs(SCRAPE_CONFIG)[0]["scrape_configs"]:
        if sc["job_name"] == job:
            return [n for d in sc.get("dns_sd_configs", []) for n in d["names"]]
    raise KeyError(job)


def which(name: str) -> str | None:
    """A tool on PATH, or in the virtualenv that runs the tests (pip-installed binaries)."""
    import shutil
    import sys

    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
