import base64
import json
import struct

import numpy as np
import pytest

from common import schemas
from common.errors import ProcessingError
from common.model import Prediction


def test_event_round_trip():
    raw = schemas.encode_event("p1", "Blue Shirt", image_url="file:///x.jpg", attributes={"gender": "Men"}, event_time=12.5)
    ev = schemas.decode_event(raw)
    assert (ev.product_id, ev.name, ev.image_url, ev.attributes, ev.event_time) == ("p1", "Blue Shirt", "file:///x.jpg", {"gender": "Men"}, 12.5)
    assert ev.has_image


@pytest.mark.parametrize("payload, code", [
    (None, "EMPTY_PAYLOAD"),
    (b"\xff\xfe{}", "NOT_UTF8"),
    (b"{not json", "BAD_JSON"),
    (b"[1, 2]", "NOT_AN_OBJECT"),
    (b'{"schema_version": 2, "product_id": "a", "name": "x"}', "UNKNOWN_VERSION"),
    (b'{"name": "x"}', "MISSING_FIELD"),
    (b'{"product_id": "  ", "name": "x"}', "MISSING_FIELD"),
    (b'{"product_id": ["a"], "name": "x"}', "BAD_FIELD_TYPE"),
    (b'{"product_id": "a", "name": 5}', "BAD_FIELD_TYPE"),
    (b'{"product_id": "a", "name": true}', "BAD_FIELD_TYPE"),
    (b'{"product_id": "a", "name": "x", "attributes": []}', "BAD_FIELD_TYPE"),
    (b'{"product_id": "a", "name": "x", "event_time": "now"}', "BAD_FIELD_TYPE"),
    (b'{"product_id": "a", "name": "x", "event_time": -5}', "BAD_FIELD_TYPE"),
    (b'{"product_id": "a"}', "NOTHING_TO_CLASSIFY"),
    (b'{"product_id": "a", "name": "   "}', "NOTHING_TO_CLASSIFY"),
    (b'{"product_id": "a", "image_url": "file:///a", "image_b64": "AAAA"}', "AMBIGUOUS_IMAGE"),
    (json.dumps({"product_id": "a", "name": "x" * 5000}).encode(), "NAME_TOO_LONG"),
    (json.dumps({"product_id": "a" * 300, "name": "x"}).encode(), "BAD_PRODUCT_ID"),
    (b"[" * 100000 + b"]" * 100000, "BAD_JSON"),
    (b'{"product_id": "a\\ud800", "name": "x"}', "NOT_UTF8"),  # valid JSON, not encodable: crashed the worker
    (b'{"product_id": "a", "image_url": "file:///\\udcff.jpg"}', "NOT_UTF8"),
])
def test_event_rejects_garbage_with_stable_code(payload, code):
    with pytest.raises(ProcessingError) as e:
        schemas.decode_event(payload)
    assert e.value.code == code


def test_numeric_product_id_is_accepted_as_text():
    assert schemas.decode_event(b'{"product_id": 42, "name": "x"}').product_id == "42"


def _record(image=True):
    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8) if image else None
    return schemas.TensorRecord("ïd-1", np.array([5, 6, 7], np.int32), img, 100.5, 101.25, 3, 77, 12345)


@pytest.mark.parametrize("image", [True, False])
def test_tensor_record_round_trip(image):
    rec = _record(image)
    back = schemas.TensorRecord.decode(rec.encode())
    assert back.product_id == "ïd-1"
    assert back.token_ids.tolist() == [5, 6, 7]
    assert (back.event_time, back.preprocessed_time, back.source_partition, back.source_offset, back.tokenizer_id) == (100.5, 101.25, 3, 77, 12345)
    if image:
        assert np.array_equal(back.image, rec.image)
    else:
        assert back.image is None


def test_tensor_record_is_compact():
    assert len(_record(True).encode()) < 224 * 224 * 3 + 100
    assert len(_record(False).encode()) < 100


@pytest.mark.parametrize("mutate, code", [
    (lambda b: b[:10], "BAD_TENSOR_RECORD"),
    (lambda b: b"XXXX" + b[4:], "BAD_TENSOR_RECORD"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "UNKNOWN_VERSION"),
    (lambda b: b[:-1], "BAD_TENSOR_RECORD"),
    (lambda b: b + b"\x00", "BAD_TENSOR_RECORD"),
    (lambda b: json.dumps({"a": 1}).encode(), "BAD_TENSOR_RECORD"),
    # a NaN time poisoned the latency histogram's sum for good; an empty id made the Redis key the bare prefix
    (lambda b: b[:26] + struct.pack("<d", float("nan")) + b[34:], "BAD_TENSOR_RECORD"),
    (lambda b: b[:34] + struct.pack("<d", float("inf")) + b[42:], "BAD_TENSOR_RECORD"),
    (lambda b: b[:26] + struct.pack("<d", 1.7e12) + b[34:], "BAD_TENSOR_RECORD"),  # milliseconds
    (lambda b: schemas.TensorRecord("", np.array([5], np.int32), None, 1.0, 2.0).encode(), "BAD_TENSOR_RECORD"),
])
def test_tensor_record_rejects_garbage(mutate, code):
    with pytest.raises(ProcessingError) as e:
        schemas.TensorRecord.decode(mutate(_record(True).encode()))
    assert e.value.code == code


def test_result_and_redis_hash_round_trip():
    pred = Prediction("Shirts", 0.9, [{"category": "Shirts", "p": 0.9}], False, ["Shirts", "Topwear", "Apparel"])
    res = schemas.result("p1", pred, "v1", 10.0, {"partition": 1, "offset": 5}, {"event_to_result_ms": 12.3456})
    assert json.loads(schemas.encode_result(res)) == res
    assert schemas.result_from_redis_hash(schemas.result_to_redis_hash(res)) == res
    assert res["timings"]["event_to_result_ms"] == 12.346


def test_dead_letter_keeps_original_payload_even_if_binary():
    doc = schemas.decode_dead_letter(schemas.dead_letter("preprocess", ProcessingError("NOT_UTF8", "bad"), b"\xff\x00", {"offset": 1}))
    assert (doc["stage"], doc["error_code"], doc["reason"]) == ("preprocess", "NOT_UTF8", "bad")
    assert base64.b64decode(doc["payload_b64"]) == b"\xff\x00"
    assert "payload_text" not in doc


def test_errors_after_the_id_is_read_name_the_product():
    with pytest.raises(ProcessingError) as e:
        schemas.decode_event(b'{"product_id": "p9", "name": 5}')
    assert e.value.product_id == "p9"
    with pytest.raises(ProcessingError) as e:
        schemas.decode_event(b'{"name": "x"}')
    assert e.value.product_id is None
