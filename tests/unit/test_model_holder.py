"""gpu_worker.model_holder.ModelHolder: a new version loads in the background while the old one serves."""
import threading
import time

import pytest

from common import settings as settings_mod
from gpu_worker.model_holder import ModelHolder
from tests.support.tiny_model import PROVIDER_LABEL, build_tiny_model


@pytest.mark.parametrize("providers", ["cpu", "openvino"])
def test_a_new_version_loads_in_the_background_and_a_forced_look_waits_for_it(tmp_path, providers):
    model_dir = build_tiny_model(str(tmp_path / "model"), version="tiny-1")
    holder = ModelHolder(settings_mod.load(env={}, model_dir=model_dir, model_reload_s=0.0, providers=providers,
                                           intra_op_threads=2), "inference")
    assert holder.current.version == "tiny-1" and holder.current.provider == PROVIDER_LABEL[providers]

    gate = threading.Event()
    holder._loader.submit(gate.wait)  # the loader busy, as under a slow (GPU) load: the tiny model loads in ~ms,
    # and had finished before the first look on a fast machine
    build_tiny_model(model_dir, version="tiny-2", scale=2.0)
    assert holder.maybe_reload() is False  # the load has only been queued: the loop goes on with tiny-1
    assert holder.current.version == "tiny-1"
    gate.set()
    deadline = time.monotonic() + 30
    while not holder.maybe_reload():
        assert time.monotonic() < deadline, "the new version never swapped in"
        time.sleep(0.01)
    assert holder.current.version == "tiny-2"

    build_tiny_model(model_dir, version="tiny-3", scale=3.0)
    assert holder.maybe_reload(force=True) is True and holder.current.version == "tiny-3"  # forced: waits
    assert holder.maybe_reload(force=True) is False  # nothing changed since
    assert holder.current.run([holder.current.tokenizer.encode("steel watch")] * 5, [None] * 5).shape == (5, 3)


def test_a_new_version_whose_graph_fails_its_warm_up_is_rejected_and_the_old_one_keeps_serving(tmp_path):
    """Before, the runtime's own exception from the warm-up escaped maybe_reload and stopped the worker."""
    import json
    import os

    model_dir = build_tiny_model(str(tmp_path / "model"), version="tiny-1")
    holder = ModelHolder(settings_mod.load(env={}, model_dir=model_dir, model_reload_s=0.0, providers="cpu"), "inference")
    path = os.path.join(model_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["model_version"] = "tiny-2"
    manifest["tokenizer"]["max_tokens"] = 32  # the graph takes 8
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f)
    os.replace(path + ".tmp", path)
    assert holder.maybe_reload(force=True) is False
    assert holder.current.version == "tiny-1"
    assert holder.current.run([holder.current.tokenizer.encode("steel watch")], [None]).shape == (1, 3)
