"""Every kind of bad record an upstream can send, mixed into good events: each bad one dead-letters with
its exact reason, every good one is classified, and no worker falls over."""
from __future__ import annotations

from dataclasses import replace

from common import schemas
from common.tokenize import TokenizerConfig
from tests.faults.harness import N, Scenario, start_pipeline
from tests.support.events import bad_events, bad_tensor_records, good_events, hostile_events
from tests.support.tiny_model import MAX_TOKENS, VOCAB

COPIES = 3  # each kind several times, spread over the stream and over partitions


def test_bad_event_corpus_dead_letters_with_exact_reasons(stack, tiny_model, sample_jpegs, tmp_path, report):
    policy = replace(stack.settings.image_policy, max_bytes=300_000)  # the catalogue's photos are small: a tight cap
    pre, inf = start_pipeline(stack, tiny_model, image_policy=policy)
    raw_kinds = bad_events(str(tmp_path)) + hostile_events(schemas.max_event_bytes(policy))
    vocabulary = TokenizerConfig(max_tokens=MAX_TOKENS, korean_tagger="okt", vocab=tuple(VOCAB)).fingerprint
    tensor_kinds = bad_tensor_records(vocabulary)
    kinds = {code for _, _, code in raw_kinds + tensor_kinds}
    bad = [(f"{key}#{c}", payload, code, topic)
           for c in range(COPIES)
           for topic, corpus in ((None, raw_kinds), (stack.settings.topic_tensors, tensor_kinds))
           for key, payload, code in corpus]
    n_good = N - len(bad)
    scenario = Scenario(stack, f"{len(raw_kinds) + len(tensor_kinds)} kinds of bad records ×{COPIES}",
                        good_events(n_good, sample_jpegs, prefix="g-"), bad)

    raw = [(k, v) for k, v, _ in scenario.good]
    step = n_good // (COPIES * len(raw_kinds)) or 1
    for i, (key, payload, _, topic) in enumerate(b for b in bad if b[3] is None):
        raw.insert(i * (step + 1) + 1, (key, payload))  # spread through the stream
    scenario.publish(raw)
    scenario.publish([(k, v) for k, v, _, topic in bad if topic], rate=20, topic=stack.settings.topic_tensors)

    out = scenario.finish(note=f"{len(raw_kinds) + len(tensor_kinds)} kinds, {len(kinds)} distinct codes, "
                               f"{len(raw_kinds)} raw + {len(tensor_kinds)} tensor")
    report(out)
    assert len(raw_kinds) + len(tensor_kinds) >= 30
    assert out.lost == 0 and not out.wrong, out.wrong[:5]
    assert out.dead == len(bad) and out.in_redis == n_good
    assert pre.alive() and inf.alive() and len(stack.workers) == 2  # nobody fell over, nobody was restarted
    assert sum(w.metric("prodcat_dead_letters_total") for w in (pre, inf)) == len(bad)  # counted, by code
