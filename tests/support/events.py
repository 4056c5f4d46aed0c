"""Event corpora for the pipeline tests: good events with predictable answers, bad ones with their codes."""
from __future__ import annotations

import base64
import io
import json

from PIL import Image

from common import schemas

GOOD_NAMES = ["Blue Shirt", "Running Shoes", "Steel Watch", "Casual shirt slim fit", "Leather shoes", "Digital watch"]


def good_events(n: int, photos: list[str], prefix: str = "p") -> list[tuple[str, bytes, str]]:
    """(key, event, expected category); every other product carries a real photo as a file:// URL."""
    from tests.support.tiny_model import expected_category

    out = []
    for i in range(n):
        name = GOOD_NAMES[i % len(GOOD_NAMES)]
        pid = f"{prefix}{i}"
        url = f"file://{photos[i % len(photos)]}" if i % 2 else None
        out.append((pid, schemas.encode_event(pid, f"{name} {i}", image_url=url), expected_category(name)))
    return out


def _png_bomb() -> str:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # ~50 KB, 400 M pixels
    return base64.b64encode(buf.getvalue()).decode()


def bad_events(tmp_dir: str) -> list[tuple[str, bytes, str]]:
    """(key, payload, expected error code): each a distinct way an upstream producer can get it wrong."""
    not_image = f"{tmp_dir}/not-image.jpg"
    with open(not_image, "wb") as f:
        f.write(b"this is text, not a JPEG")
    truncated = f"{tmp_dir}/truncated.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(buf, "JPEG")
    with open(truncated, "wb") as f:
        f.write(buf.getvalue()[:200])

    def ev(**kw) -> bytes:
        return json.dumps(kw).encode()

    return [
        ("b-json", b"{this is not json", "BAD_JSON"),
        ("b-utf8", b'{"product_id": "x", "name": "\xff\xfe"}', "NOT_UTF8"),
        # a lone surrogate escape is valid JSON but not text: encoding the tensor record failed and stopped the worker
        ("b-surrogate", b'{"product_id": "s\\ud800", "name": "Blue Shirt"}', "NOT_UTF8"),
        ("b-array", b"[1,2,3]", "NOT_AN_OBJECT"),
        ("b-string", b'"just a string"', "NOT_AN_OBJECT"),
        ("b-null", b"null", "NOT_AN_OBJECT"),
        ("b-empty", b"", "BAD_JSON"),
        ("b-version", ev(schema_version=99, product_id="v", name="Blue Shirt"), "UNKNOWN_VERSION"),
        ("b-noid", ev(name="Blue Shirt"), "MISSING_FIELD"),
        ("b-blankid", ev(product_id="", name="Blue Shirt"), "MISSING_FIELD"),
        ("b-idtype", ev(product_id={"a": 1}, name="Blue Shirt"), "BAD_FIELD_TYPE"),
        ("b-longid", ev(product_id="x" * 1000, name="Blue Shirt"), "BAD_PRODUCT_ID"),
        ("b-nametype", ev(product_id="n", name=["Blue", "Shirt"]), "BAD_FIELD_TYPE"),
        ("b-namelong", ev(product_id="nl", name="shirt " * 2000), "NAME_TOO_LONG"),
        ("b-nothing", ev(product_id="e"), "NOTHING_TO_CLASSIFY"),
        ("b-blank", ev(product_id="e2", name="   "), "NOTHING_TO_CLASSIFY"),
        ("b-attrs", ev(product_id="a", name="Blue Shirt", attributes="red"), "BAD_FIELD_TYPE"),
        ("b-attrsbig", ev(product_id="ab", name="Blue Shirt", attributes={"k": "v" * 20000}), "ATTRIBUTES_TOO_LARGE"),
        ("b-time", ev(product_id="t", name="Blue Shirt", event_time="yesterday"), "BAD_FIELD_TYPE"),
        ("b-timeneg", ev(product_id="t2", name="Blue Shirt", event_time=-1), "BAD_FIELD_TYPE"),
        ("b-both", ev(product_id="bo", name="x", image_url="file:///a.jpg", image_b64="AAAA"), "AMBIGUOUS_IMAGE"),
        ("b-scheme", ev(product_id="s", name="Blue Shirt", image_url="ftp://example.com/a.jpg"), "URL_SCHEME"),
        ("b-noscheme", ev(product_id="s2", name="Blue Shirt", image_url="/etc/passwd"), "URL_SCHEME"),
        ("b-ssrf", ev(product_id="ss", name="Blue Shirt", image_url="http://127.0.0.1:1/a.jpg"), "URL_HOST_FORBIDDEN"),
        ("b-meta", ev(product_id="md", name="Blue Shirt", image_url="http://169.254.169.254/latest/meta-data/"), "URL_HOST_FORBIDDEN"),
        ("b-private", ev(product_id="pv", name="Blue Shirt", image_url="http://192.168.1.1/a.jpg"), "URL_HOST_FORBIDDEN"),
        ("b-badurl", ev(product_id="bu", name="Blue Shirt", image_url="http://[::1/a.jpg"), "URL_INVALID"),
        ("b-nulpath", ev(product_id="np", name="Blue Shirt", image_url="file:///tmp/%00x.jpg"), "URL_INVALID"),
        ("b-badhost", ev(product_id="bh", name="Blue Shirt", image_url="http://images example.com/a.jpg"), "URL_INVALID"),
        ("b-missingfile", ev(product_id="mf", name="Blue Shirt", image_url="file:///nonexistent/photo.jpg"), "URL_FETCH_FAILED"),
        ("b-notimage", ev(product_id="ni", name="Blue Shirt", image_url=f"file://{not_image}"), "IMAGE_UNDECODABLE"),
        ("b-truncated", ev(product_id="tr", name="Blue Shirt", image_url=f"file://{truncated}"), "IMAGE_UNDECODABLE"),
        ("b-b64", ev(product_id="b6", name="Blue Shirt", image_b64="%%%not-base64%%%"), "BAD_BASE64"),
        ("b-b64text", ev(product_id="b7", name="Blue Shirt", image_b64=base64.b64encode(b"hello").decode()), "IMAGE_UNDECODABLE"),
        ("b-bomb", ev(product_id="bb", name="Blue Shirt", image_b64=_png_bomb()), "IMAGE_DIMENSIONS"),
        ("b-urltype", ev(product_id="ut", name="Blue Shirt", image_url=123), "BAD_FIELD_TYPE"),
    ]


def _jpeg_claiming(width: int, height: int) -> str:
    """A small real JPEG whose frame header (SOF0) claims absurd dimensions: refused before any decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return base64.b64encode(bytes(data)).decode()


def hostile_events(max_event_bytes: int) -> list[tuple[str, bytes | None, str]]:
    """More raw-topic kinds beyond `bad_events`: SSRF spellings, absurd headers, types, sizes. `max_event_bytes`
    is the preprocess worker's limit (schemas.max_event_bytes of its image policy)."""

    def ev(**kw) -> bytes:
        return json.dumps(kw).encode()

    return [
        ("h-tombstone", None, "EMPTY_PAYLOAD"),
        ("h-oversized", ev(product_id="big", name="Blue Shirt", notes="x" * (max_event_bytes + 1)), "EVENT_TOO_LARGE"),
        ("h-deepjson", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "BAD_JSON"),
        ("h-versionstr", ev(schema_version="1", product_id="vs", name="Blue Shirt"), "UNKNOWN_VERSION"),
        ("h-boolid", ev(product_id=True, name="Blue Shirt"), "BAD_FIELD_TYPE"),
        ("h-floatid", ev(product_id=1.5, name="Blue Shirt"), "BAD_FIELD_TYPE"),
        ("h-nantime", b'{"product_id": "nt", "name": "Blue Shirt", "event_time": NaN}', "BAD_FIELD_TYPE"),
        ("h-localhost", ev(product_id="lh", name="Blue Shirt", image_url="http://localhost:6379/"), "URL_HOST_FORBIDDEN"),
        ("h-ipv6loop", ev(product_id="v6", name="Blue Shirt", image_url="http://[::1]/a.jpg"), "URL_HOST_FORBIDDEN"),
        ("h-zeroaddr", ev(product_id="z", name="Blue Shirt", image_url="http://0.0.0.0/a.jpg"), "URL_HOST_FORBIDDEN"),
        ("h-decimalip", ev(product_id="di", name="Blue Shirt", image_url="http://2130706433/a.jpg"), "URL_HOST_FORBIDDEN"),
        ("h-dataurl", ev(product_id="du", name="Blue Shirt", image_url="data:image/png;base64,AAAA"), "URL_SCHEME"),
        ("h-directory", ev(product_id="dir", name="Blue Shirt", image_url="file:///etc"), "URL_FETCH_FAILED"),
        ("h-jpegdims", ev(product_id="jd", name="Blue Shirt", image_b64=_jpeg_claiming(60_000, 60_000)), "IMAGE_DIMENSIONS"),
    ]


def bad_tensor_records(vocabulary: int) -> list[tuple[str, bytes | None, str]]:
    """Kinds that reach the inference worker directly on the tensors topic; `vocabulary` is the served
    tokenizer fingerprint (a record with any other one has no model to read it)."""
    import numpy as np

    def record(pid: str, tokens: list[int], tokenizer_id: int = vocabulary) -> bytes:
        return schemas.TensorRecord(pid, np.array(tokens, np.int32), None, 1.7e9, 1.7e9, 0, 0, tokenizer_id).encode()

    good = record("t-ok", [2])
    wrong_version = bytearray(good)
    wrong_version[4] = 9
    return [
        ("t-tombstone", None, "BAD_TENSOR_RECORD"),
        ("t-garbage", b"garbage", "BAD_TENSOR_RECORD"),
        ("t-magic", b"XXXX" + good[4:], "BAD_TENSOR_RECORD"),
        ("t-version", bytes(wrong_version), "UNKNOWN_VERSION"),
        ("t-truncated", good[:-2], "BAD_TENSOR_RECORD"),
        ("t-vocabulary", record("t-vocabulary", [2], tokenizer_id=vocabulary ^ 0x5A5A), "TOKENIZER_MISMATCH"),
        ("t-tokenrange", record("t-tokenrange", [2, 99_999]), "BAD_TENSOR_RECORD"),
        ("t-negtoken", record("t-negtoken", [-3]), "BAD_TENSOR_RECORD"),
        ("t-nantime", schemas.TensorRecord("t-nantime", np.array([2], np.int32), None, float("nan"), 1.7e9, 0, 0,
                                           vocabulary).encode(), "BAD_TENSOR_RECORD"),
    ]
