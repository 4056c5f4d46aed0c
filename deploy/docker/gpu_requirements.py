"""Print the prodcat requirements for a GPU environment: core deps with `onnxruntime` swapped for
the `gpu` extra (`onnxruntime-gpu`).

Why not `pip install .[gpu]`: extras can only add packages, so that installs BOTH onnxruntime and
onnxruntime-gpu. They ship the same `onnxruntime/` import package and overwrite each other's
files; uninstalling one afterwards deletes files the other needs. So the GPU image installs this
list (never containing `onnxruntime`) and then the project itself with `--no-deps`, and checks
that `onnxruntime` is absent. Usage: python gpu_requirements.py pyproject.toml > requirements.txt
"""
from __future__ import annotations

import re
import sys
import tomllib

CPU_PACKAGE = "onnxruntime"
GPU_EXTRA = "gpu"


def name_of(requirement: str) -> str:
    """PEP 503-normalised project name of a PEP 508 requirement string."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not m:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def gpu_requirements(pyproject: dict) -> list[str]:
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    if GPU_EXTRA not in extras:
        raise SystemExit(f"pyproject.toml has no [{GPU_EXTRA}] extra")
    gpu = list(extras[GPU_EXTRA])
    if not any(name_of(r) == f"{CPU_PACKAGE}-gpu" for r in gpu):
        raise SystemExit(f"the [{GPU_EXTRA}] extra does not list {CPU_PACKAGE}-gpu")
    core = [r for r in project.get("dependencies", []) if name_of(r) != CPU_PACKAGE]
    # the gpu extra may also name onnxruntime itself (e.g. a marker trick): drop it there too
    return core + [r for r in gpu if name_of(r) != CPU_PACKAGE]


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
    with open(path, "rb") as f:
        print("\n".join(gpu_requirements(tomllib.load(f))))
