"""Hot model reload mid-stream. The model directory is a symlink swapped atomically, as a Kubernetes volume
update does. A new version with a different vocabulary (other token ids, same answers) is loaded, warmed
up and swapped in between batches: no event fails and none is misread — records tokenized with the old
vocabulary are still read by the old model. A corrupt version is rejected and the old one keeps serving."""
from __future__ import annotations

import os

import pytest

from tests.faults.harness import N, Scenario, start_pipeline, wait_for
from tests.support.events import good_events
from tests.support.tiny_model import PROVIDER_LABEL, VOCAB, build_tiny_model


def swap(link: str, target: str) -> None:
    tmp = f"{link}.new"
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: workers see either the old or the new directory, never half of each


def _serving_mid_stream(stack, tiny_model, sample_jpegs, tmp_path, name: str, prefix: str, providers: str = "auto"):
    """The pipeline serving tiny-1 through a symlinked model dir, a third of the stream classified."""
    link = str(tmp_path / "model")
    swap(link, tiny_model)
    pre, inf = start_pipeline(stack, link, both={"providers": providers})
    scenario = Scenario(stack, name, good_events(N, sample_jpegs, prefix=prefix))
    scenario.publish([(k, v) for k, v, _ in scenario.good])
    scenario.wait_classified(N // 3)
    return link, pre, inf, scenario


@pytest.mark.parametrize("providers", ["auto", "openvino"])  # auto: ORT for the tiny fp32 graph; int8 graphs: OpenVINO
def test_new_model_with_new_vocabulary_mid_stream(stack, tiny_model, sample_jpegs, tmp_path, report, providers):
    name = "hot reload: new model + vocabulary" + (f" ({providers})" if providers != "auto" else "")
    link, pre, inf, scenario = _serving_mid_stream(stack, tiny_model, sample_jpegs, tmp_path, name, "hr-", providers)
    swap(link, build_tiny_model(str(tmp_path / "v2"), version="tiny-2", scale=1.5, vocab=list(reversed(VOCAB))))
    switch_s = wait_for(lambda: inf.metric("prodcat_model_info", model_version="tiny-2") == 1)
    assert inf.metric("prodcat_model_info", provider=PROVIDER_LABEL[providers]) == 1
    out = scenario.finish(switch_s, note="recovery = swap → new version serving; no pause")
    report(out)
    assert out.lost == 0 and out.dead == 0 and not out.wrong, out.wrong[:5]  # every answer right: no vocabulary mixed up
    versions = _served_versions(stack, scenario)
    assert versions == {"tiny-1", "tiny-2"}, versions
    assert pre.metric("prodcat_model_reloads_total", outcome="loaded") >= 1  # preprocess follows the vocabulary
    assert inf.metric("prodcat_tokenizer_mismatch_total", outcome="dead_letter") == 0
    assert pre.alive() and inf.alive()


def test_corrupt_model_is_rejected_and_the_old_one_keeps_serving(stack, tiny_model, sample_jpegs, tmp_path, report):
    link, pre, inf, scenario = _serving_mid_stream(stack, tiny_model, sample_jpegs, tmp_path, "hot reload: corrupt model", "hc-")
    corrupt = build_tiny_model(str(tmp_path / "v3"), version="tiny-3")
    with open(os.path.join(corrupt, "model.onnx"), "wb") as f:
        f.write(b"\x08\x07 this is not an ONNX graph" * 100)
    swap(link, corrupt)
    wait_for(lambda: inf.metric("prodcat_model_reloads_total", outcome="rejected") == 1)
    out = scenario.finish(note="rejected, tiny-1 kept serving; no pause")
    report(out)
    assert out.lost == 0 and out.dead == 0 and not out.wrong, out.wrong[:5]
    assert _served_versions(stack, scenario) == {"tiny-1"}
    assert inf.metric("prodcat_model_info", model_version="tiny-1") == 1
    assert pre.alive() and inf.alive()


def _served_versions(stack, scenario) -> set[str]:
    from prodcat.stack import read_results

    return {r["model_version"] for r in read_results(stack.redis(), stack.settings, scenario.keys).values()}
