"""Render prometheusrule.yaml (Prometheus Operator) from rules/*.yml, the one source of the rules.

    python deploy/monitoring/render_prometheusrule.py > deploy/monitoring/prometheusrule.yaml

tests/deploy/test_static.py compares the committed file with this output.
"""
from __future__ import annotations

import pathlib

import yaml

HERE = pathlib.Path(__file__).resolve().parent
HEADER = "# GENERATED from rules/*.yml by render_prometheusrule.py: edit those, then re-run it.\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line PromQL stays a readable `|` block, as in the source files."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = []
    for path in sorted((HERE / "rules").glob("*.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "prodcat", "labels": {"app.kubernetes.io/part-of": "prodcat"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


if __name__ == "__main__":
    print(render(), end="")
