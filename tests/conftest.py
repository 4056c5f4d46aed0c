"""Shared fixtures: a real Tansu broker + redis-server per test (temp dir, free ports) and the tiny
stand-in ONNX model (tests/support/tiny_model.py) whose answers the tests can predict."""
from __future__ import annotations

import os

import pytest

from tests.support.tiny_model import build_tiny_model

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
MYNTRA_IMAGES = os.path.join(SHARED_DATA, "myntra", "images")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture
def stack(tmp_path):
    from prodcat.stack import LocalStack

    with LocalStack(str(tmp_path / "stack")) as s:
        s.create_topics({"topic_raw": 4, "topic_tensors": 2, "topic_results": 2, "topic_dlq": 1})
        yield s


@pytest.fixture(scope="session")
def sample_jpegs() -> list[str]:
    """A few real catalogue photos from the shared data (the tests need real JPEGs, not synthetic ones)."""
    names = sorted(os.listdir(MYNTRA_IMAGES))[:20] if os.path.isdir(MYNTRA_IMAGES) else []
    if not names:
        pytest.skip("shared data not found beside the repository")
    return [os.path.join(MYNTRA_IMAGES, n) for n in names]
