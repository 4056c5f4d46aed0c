"""common.model.Classifier on CPU: lanes running a batch in chunks, precision choice, clear errors; the
OpenVINO backend answering like ONNX Runtime."""
import numpy as np
import pytest

from common import openvino_session
from common.model import Classifier, ModelError, batch_buckets, choose_providers, provider_options, seal_graph
from tests.support.tiny_model import build_tiny_model, expected_category


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


def _batch(clf, n):
    names = ["Blue shirt", "Running shoes", "Steel watch", "mystery item", ""] * n
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) if i % 3 == 0 else None for i in range(len(names))]
    return names, [clf.tokenizer.encode(nm) for nm in names], images


def test_lanes_run_a_batch_in_chunks_and_answer_like_one_run(model_dir):
    whole, one, two = Classifier(model_dir, "cpu", 0), Classifier(model_dir, "cpu", 1), Classifier(model_dir, "cpu", 2)
    assert (one.lanes, two.lanes) == (1, 2)
    names, ids, images = _batch(one, 3)  # 15 items: a short last chunk
    p0, p1, p2 = whole.run(ids, images), one.run(ids, images), two.run(ids, images)
    assert p2.shape == (15, 3) and np.allclose(p0, p1, atol=1e-6) and np.allclose(p0, p2, atol=1e-6)  # order kept
    assert [p.category for p in two.predictions(p2)][1:3] == [expected_category(n) for n in names[1:3]]
    assert two.run(ids[:1], images[:1]).shape == (1, 3)


def test_precision_falls_back_to_fp32_and_refuses_bad_values(model_dir):
    assert Classifier(model_dir, "cpu").precision == "fp32"  # the tiny model has no int8 graph
    with pytest.raises(ModelError, match="no int8 graph"):
        Classifier(model_dir, "cpu", precision="int8")
    with pytest.raises(ModelError, match="expected one of auto, fp32, int8"):
        Classifier(model_dir, "cpu", precision="fp16")


def test_submit_runs_on_the_lanes_and_fails_in_result_not_at_submit(model_dir):
    clf = Classifier(model_dir, "cpu", 2)
    names, ids, images = _batch(clf, 2)
    pending = clf.submit(ids, images)
    assert np.allclose(pending.result(), clf.run(ids, images), atol=1e-6) and pending.done() and pending.seconds > 0
    broken = clf.submit(ids[:2], [np.zeros((10, 10, 3), np.uint8), None])  # wrong image shape: no exception here
    with pytest.raises(ValueError):
        broken.result()


def test_session_options_replace_the_serving_ones(model_dir):
    import onnxruntime as ort

    served = Classifier(model_dir, "cpu", 0).session.get_session_options()
    assert served.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # workers share cores
    defaults = ort.SessionOptions()  # what the bench's naive process runs with
    defaults.add_session_config_entry("session.intra_op.allow_spinning", "1")
    clf = Classifier(model_dir, "cpu", 0, session_options=defaults)
    assert clf.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert clf.run([clf.tokenizer.encode("steel watch")], [None]).shape == (1, 3)


def test_gpu_batches_are_padded_to_buckets_and_trimmed_back(model_dir):
    """Bucket padding (GPU sessions only) changes no item's answer and returns one row per item."""
    assert Classifier(model_dir, "cpu", 0, batch_buckets=(4, 8)).buckets == ()  # CPU: no shape cost, no padding
    plain, padded = Classifier(model_dir, "cpu", 0), Classifier(model_dir, "cpu", 0)
    padded.buckets = (1, 4, 8)  # as a CUDA session would keep them
    assert [padded.padded_size(n) for n in (1, 2, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, 9]
    assert len(padded._chunks([np.zeros(0, np.int32)] * 5, [None] * 5)[0][1]) == 8
    _, ids, images = _batch(plain, 1)  # 5 items → one 8-row run
    expected = plain.run(ids, images)
    assert padded.run(ids, images).shape == (5, 3) and np.allclose(padded.run(ids, images), expected, atol=1e-6)
    assert np.allclose(padded.submit(ids[:3], images[:3]).result(), expected[:3], atol=1e-6)
    padded.warm_up()  # one run per bucket, each answered
    broken = padded.submit(ids[:2], [np.zeros((10, 10, 3), np.uint8), None])  # assembled on the lane: fails there
    with pytest.raises(ValueError):
        broken.result()


def test_a_provider_name_no_runtime_knows_is_refused_one_not_installed_falls_back_to_cpu(model_dir):
    # "cdua" ran on CPU without a word; "cuda" on a machine without one still does, by design (one setting for all nodes)
    with pytest.raises(ModelError, match="unknown provider.*'cdua'"):
        Classifier(model_dir, providers="cdua,cpu")
    assert choose_providers("TensorRT, cuda,,CPUExecutionProvider")[-1] == "CPUExecutionProvider"
    assert choose_providers("migraphx") == ["CPUExecutionProvider"]  # a real provider, not installed here


def test_batch_buckets_and_cuda_options():
    assert batch_buckets(128) == (1, 2, 4, 8, 16, 32, 64, 128) and batch_buckets(100)[-2:] == (64, 100)
    assert batch_buckets(1) == (1,)
    assert provider_options(("cudnn_conv_algo_search=HEURISTIC", " arena_extend_strategy = kSameAsRequested ")) == {
        "cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
    with pytest.raises(ModelError, match="wants KEY=VALUE"):
        provider_options(("HEURISTIC",))


def test_openvino_lanes_answer_like_onnx_runtime(model_dir):
    ort_lanes, ov_lanes = Classifier(model_dir, "cpu", 2), Classifier(model_dir, "openvino", 2)
    assert (ov_lanes.provider, ov_lanes.run_items, ort_lanes.run_items) == ("OpenVINO", openvino_session.RUN_ITEMS, 1)
    assert Classifier(model_dir, "auto", 2).provider == "CPU"  # auto: OpenVINO for int8 graphs only (this one is fp32)
    names, ids, images = _batch(ov_lanes, 5)  # 25 items: runs of 4 (the last 1) over two lanes
    assert [len(c[1]) for c in ov_lanes._chunks(ids, images)] == [4] * 6 + [1]
    expected = ort_lanes.run(ids, images)
    assert np.allclose(ov_lanes.run(ids, images), expected, atol=1e-4)
    assert np.allclose(ov_lanes.submit(ids, images).result(), expected, atol=1e-4)  # the order kept across lanes
    assert np.allclose(ov_lanes.run(ids[:1], images[:1]), expected[:1], atol=1e-4)  # one item: its image as is
    own_pool = Classifier(model_dir, "openvino", 0)  # the naive process: OpenVINO's own defaults, one run
    assert own_pool.run_items == 0 and np.allclose(own_pool.run(ids, images), expected, atol=1e-4)
    broken = ov_lanes.submit(ids[:2], [np.zeros((10, 10, 3), np.uint8), None])  # built on the lane: fails there
    with pytest.raises(ValueError):
        broken.result()


def test_a_graph_openvino_cannot_run_is_served_by_onnx_runtime(model_dir, monkeypatch):
    def refuse(path, lanes):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino_session, "OpenVINOSession", refuse)
    clf = Classifier(model_dir, "openvino", 2)
    assert clf.provider == "CPU" and clf.run_items == 1
    assert clf.run([clf.tokenizer.encode("steel watch")], [None]).shape == (1, 3)


def test_a_graph_with_an_integer_mod_is_left_to_onnx_runtime(model_dir, tmp_path):
    """OpenVINO computes an integer Mod through float32 (graphs exported before the word-pair hash became a
    BitwiseAnd): such a graph is served by ORT, even when OpenVINO is asked for."""
    import os
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    old = str(tmp_path / "old")
    shutil.copytree(model_dir, old)
    graph = onnx.load(os.path.join(old, "model.onnx"))
    graph.graph.initializer.append(numpy_helper.from_array(np.array(1_000_003, np.int64), "big"))
    graph.graph.node.insert(0, helper.make_node("Mod", ["token_ids", "big"], ["token_ids_mod"], fmod=0))
    graph.graph.node[1].input[1] = "token_ids_mod"  # the Gather reads the (unchanged) ids through the Mod
    onnx.save(graph, os.path.join(old, "model.onnx"))
    clf = Classifier(seal_graph(old), "openvino", 2)
    assert clf.provider == "CPU" and clf.run([clf.tokenizer.encode("steel watch")], [None]).shape == (1, 3)


def _edited_copy(model_dir: str, dest: str, edit) -> str:
    import json
    import os
    import shutil

    shutil.copytree(model_dir, dest)
    path = os.path.join(dest, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return dest


@pytest.mark.parametrize("edit, named", [
    (lambda m: m["tokenizer"].update(korean_tagger="mecab"), "korean_tagger"),  # failed on the first Korean name
    (lambda m: m.update(threshold=88), "threshold"),  # in percent: every item "uncertain"
    (lambda m: m.update(threshold=float("nan")), "threshold"),  # no item ever "uncertain"
    (lambda m: m.update(labels=[m["labels"][0]] * len(m["labels"])), "duplicate"),
    (lambda m: m.update(labels=list(range(len(m["labels"])))), "labels"),  # results' category a number
    (lambda m: m["hierarchy"]["parents"].update(Watches="Accessories"), "parents"),  # a path of letters
    (lambda m: m["tokenizer"].update(max_tokens=7.9), "max_tokens"),
    (lambda m: m["tokenizer"].update(oov_buckets=-5), "oov_buckets"),
    (lambda m: m["tokenizer"].update(vocab=[1, 2, 3]), "vocab"),
    (lambda m: m.update(stand_in="false"), "stand_in"),
])
def test_a_manifest_that_serving_would_get_wrong_is_refused_at_load(model_dir, tmp_path, edit, named):
    """Each of these loaded before and served wrong answers, or failed later on every item."""
    with pytest.raises(ModelError, match=named):
        Classifier(_edited_copy(model_dir, str(tmp_path / "edited"), edit), "cpu", 1)


def test_a_graph_that_is_not_the_one_its_manifest_describes_is_refused(model_dir, tmp_path):
    """Both loaded before: the graph of another version (same labels, other token ids: wrong answers, no error),
    and a manifest whose token width the graph does not take (warm-up's runtime error escaped the hot reload and
    stopped the inference worker)."""
    import os
    import shutil

    other = build_tiny_model(str(tmp_path / "other"), vocab=["watch", "shoes", "shirt"])
    mixed = str(tmp_path / "mixed")
    shutil.copytree(model_dir, mixed)
    shutil.copy(os.path.join(other, "model.onnx"), mixed)
    with pytest.raises(ModelError, match="not the graph its manifest describes"):
        Classifier(mixed, "cpu", 1)

    wider = _edited_copy(model_dir, str(tmp_path / "wider"), lambda m: m["tokenizer"].update(max_tokens=32))
    with pytest.raises(ModelError, match="does not run as its manifest describes"):
        Classifier(wider, "cpu", 1).warm_up()
