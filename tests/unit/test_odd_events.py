"""Seeded random events built from odd strings, through the preprocess worker's own path (decode → preprocess →
encode): each ends as a tensor record or a ProcessingError (a dead letter with a code), never another exception,
which the worker would retry with tracebacks and then dead-letter as INTERNAL_ERROR. It found two such escapes
(a file:// path with %00; inline base64 holding non-ASCII)."""
from __future__ import annotations

import base64
import io
import json
import random

from PIL import Image

from common import schemas
from common.errors import ProcessingError
from common.images import FetchPolicy
from common.tokenize import Tokenizer
from preprocess_worker.transform import preprocess

ODD = ["", " ", "\x00", "\u202e", "\ufeff", "🙂" * 50, "가" * 300, "a" * 999, "\n\t", "%00", "../../etc/passwd", "file:",
       "file://", "file:///", "file:///dev/null", "file:///proc/self/mem", "file:///tmp", "file://host/x", "file:///tmp/%ff",
       "file:///tmp/%00x", "file://[::1/x", "http://", "http://[::1/x", "http://a b/x", "http://x:99999/a", "http:x",
       "//example.com/a.jpg", "data:image/png;base64,xx", "javascript:alert(1)", "Blue shirt", "남성 반팔 티셔츠", "Été"]


def test_odd_events_end_as_a_record_or_a_dead_letter_never_another_exception(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()
    photo = tmp_path / "photo.png"
    photo.write_bytes(png)
    inline = ODD + [base64.b64encode(png).decode(), base64.encodebytes(png).decode(), base64.b64encode(png[:30]).decode()]
    urls = ODD + [f"file://{photo}", f"file://{tmp_path}"]
    policy = FetchPolicy(allowed_schemes=("file",))  # no network here: http URLs are URL_SCHEME, their parsing still runs
    rng, tokenizer, escaped, outcomes = random.Random(7), Tokenizer(), [], set()
    for _ in range(1500):
        event = {"product_id": rng.choice(["p", 1, "가", "x" * 5])}
        if rng.random() < 0.8:
            event["name"] = rng.choice(ODD)
        if (r := rng.random()) < 0.45:
            event["image_url"] = rng.choice(urls)
        elif r < 0.8:
            event["image_b64"] = rng.choice(inline)
        payload = json.dumps(event).encode()
        try:
            preprocess(schemas.decode_event(payload), tokenizer, policy, 0.0).encode()
            outcomes.add("record")
        except ProcessingError as e:
            outcomes.add(e.code)
        except Exception as e:  # noqa: BLE001 — what this test looks for
            escaped.append((payload[:100], f"{type(e).__name__}: {e}"))
    assert escaped == []
    assert {"record", "BAD_BASE64", "URL_INVALID", "URL_SCHEME", "IMAGE_UNDECODABLE", "NOTHING_TO_CLASSIFY"} <= outcomes
