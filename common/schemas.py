"""The four wire formats — the only module that knows their bytes. Both workers import it.

product event v1  (JSON, products.raw, key = product_id)
    {"schema_version": 1 (optional), "product_id": str, "name": str?, "image_url": str?, "image_b64": str?,
     "attributes": object?, "event_time": epoch seconds?}   — at least one of name / image
tensor record v1  (binary, products.tensors, key = product_id) — see TensorRecord
result v1         (JSON, products.categories, key = product_id; same fields in the Redis hash)
dead letter v1    (JSON, products.dlq, key = original key)
Every decode error is a ProcessingError with a stable code, so it can be dead-lettered and counted.
"""
from __future__ import annotations

import base64
import json
import math
import struct
import time
from dataclasses import dataclass

import numpy as np
import orjson

from common.errors import ProcessingError
from common.images import IMAGE_SHAPE, FetchPolicy

EVENT_VERSION = 1
TENSOR_VERSION = 1
RESULT_VERSION = 1
DEAD_LETTER_VERSION = 1

MAX_EVENT_BYTES = 16_000_000  # inline images make events large; the image limit applies again after base64
MAX_NAME_CHARS = 1_000
MAX_ID_CHARS = 256
MAX_ATTRIBUTES_BYTES = 16_000

# ---------------------------------------------------------------- product event v1


def max_event_bytes(policy: FetchPolicy) -> int:
    """The largest legitimate event: its largest inline image (base64) plus the capped fields, and JSON slack."""
    return min(MAX_EVENT_BYTES, policy.max_bytes * 4 // 3 + 4 * (MAX_NAME_CHARS + MAX_ID_CHARS) + MAX_ATTRIBUTES_BYTES + 65_536)


@dataclass(frozen=True)
class ProductEvent:
    product_id: str
    name: str
    image_url: str | None
    image_b64: str | None
    attributes: dict
    event_time: float | None

    @property
    def has_image(self) -> bool:
        return bool(self.image_url or self.image_b64)


def _epoch_seconds(t: float) -> bool:
    """A plausible Unix time in seconds: finite, not negative, and below 1e11 (milliseconds, 1.7e12, are refused)."""
    return math.isfinite(t) and 0 <= t < 1e11


def _field(obj: dict, key: str, kind: type | tuple, required: bool = False):
    value = obj.get(key)
    if value is None:
        if required:
            raise ProcessingError("MISSING_FIELD", f"field {key!r} is required")
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProcessingError("BAD_FIELD_TYPE", f"field {key!r} must be {names}, got {type(value).__name__}")
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # JSON may escape a lone UTF-16 surrogate ("\ud800"); such a string is not Unicode text and cannot be
            # encoded into a record, a Redis key or a dead letter — failing there stopped the worker, event after event
            raise ProcessingError("NOT_UTF8", f"field {key!r} holds a lone surrogate escape, not Unicode text") from None
    return value


def decode_event(payload: bytes | None, max_bytes: int = MAX_EVENT_BYTES) -> ProductEvent:
    """`max_bytes`: see max_event_bytes; checked before anything is parsed."""
    if payload is None:
        raise ProcessingError("EMPTY_PAYLOAD", "record has no value (tombstone?)")
    if len(payload) > max_bytes:
        raise ProcessingError("EVENT_TOO_LARGE", f"event is {len(payload)} bytes, limit {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProcessingError("NOT_UTF8", f"event is not UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except ValueError as e:  # RecursionError is a RuntimeError: deep nesting lands below
        raise ProcessingError("BAD_JSON", f"event is not JSON: {e}") from None
    except RecursionError:
        raise ProcessingError("BAD_JSON", "event JSON nests too deeply") from None
    if not isinstance(obj, dict):
        raise ProcessingError("NOT_AN_OBJECT", f"event must be a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version", EVENT_VERSION)
    if version != EVENT_VERSION:
        raise ProcessingError("UNKNOWN_VERSION", f"event schema_version {version!r}, this worker reads {EVENT_VERSION}")
    pid = _field(obj, "product_id", (str, int), required=True)
    pid = str(pid).strip()
    if not pid:
        raise ProcessingError("MISSING_FIELD", "product_id is empty")
    if len(pid) > MAX_ID_CHARS:
        raise ProcessingError("BAD_PRODUCT_ID", f"product_id longer than {MAX_ID_CHARS} characters")
    try:  # from here on, a dead letter can name the product
        name = _field(obj, "name", str) or ""
        if len(name) > MAX_NAME_CHARS:
            raise ProcessingError("NAME_TOO_LONG", f"name has {len(name)} characters, limit {MAX_NAME_CHARS}")
        image_url = _field(obj, "image_url", str) or None
        image_b64 = _field(obj, "image_b64", str) or None
        if image_url and image_b64:
            raise ProcessingError("AMBIGUOUS_IMAGE", "give image_url or image_b64, not both")
        attributes = _field(obj, "attributes", dict) or {}
        if len(json.dumps(attributes)) > MAX_ATTRIBUTES_BYTES:
            raise ProcessingError("ATTRIBUTES_TOO_LARGE", f"attributes over {MAX_ATTRIBUTES_BYTES} bytes")
        event_time = _field(obj, "event_time", (int, float))
        if event_time is not None and not _epoch_seconds(event_time):
            raise ProcessingError("BAD_FIELD_TYPE", f"event_time {event_time!r} is not epoch seconds")
        if not name.strip() and not (image_url or image_b64):
            raise ProcessingError("NOTHING_TO_CLASSIFY", "event has neither a name nor an image")
    except ProcessingError as e:
        e.product_id = pid
        raise
    return ProductEvent(pid, name, image_url, image_b64, attributes, float(event_time) if event_time is not None else None)


def encode_event(product_id: str, name: str = "", image_url: str | None = None, image_b64: str | None = None,
                 attributes: dict | None = None, event_time: float | None = None) -> bytes:
    """For producers, the demo and tests: the canonical event bytes. Without `event_time` the worker takes
    the record's timestamp (set when it is produced) as the start of end-to-end latency."""
    obj: dict = {"schema_version": EVENT_VERSION, "product_id": product_id}
    for key, value in (("name", name), ("image_url", image_url), ("image_b64", image_b64), ("attributes", attributes),
                       ("event_time", event_time)):
        if value:
            obj[key] = value
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- tensor record v1

# magic, version, flags, n_tokens, id_len, tokenizer_id, source_partition, source_offset, event_time, preprocessed_time
_HEADER = struct.Struct("<4sBBHHIiqdd")
_MAGIC = b"PCT1"
_FLAG_IMAGE = 1
_IMAGE_BYTES = int(np.prod(IMAGE_SHAPE))
MAX_TOKENS_ON_WIRE = 512


@dataclass
class TensorRecord:
    """A preprocessed product: little-endian header, UTF-8 id, int32 token ids, raw uint8 224×224×3 image
    (if any). No pickle, no JSON arrays: decoding is two `np.frombuffer` views, no copy."""

    product_id: str
    token_ids: np.ndarray  # int32 [n]
    image: np.ndarray | None  # uint8 (224, 224, 3), or None = no photo
    event_time: float
    preprocessed_time: float
    source_partition: int = -1  # where the raw event was: duplicates stay visible downstream
    source_offset: int = -1
    tokenizer_id: int = 0  # which vocabulary made token_ids (TokenizerConfig.fingerprint)

    def encode(self) -> bytes:
        pid = self.product_id.encode("utf-8")
        tokens = np.ascontiguousarray(self.token_ids, dtype="<i4")
        if len(tokens) > MAX_TOKENS_ON_WIRE:
            raise ValueError(f"{len(tokens)} tokens, wire limit {MAX_TOKENS_ON_WIRE}")
        flags = _FLAG_IMAGE if self.image is not None else 0
        header = _HEADER.pack(_MAGIC, TENSOR_VERSION, flags, len(tokens), len(pid), self.tokenizer_id, self.source_partition,
                              self.source_offset, self.event_time, self.preprocessed_time)
        parts = [header, pid, tokens.tobytes()]
        if self.image is not None:
            if self.image.shape != IMAGE_SHAPE or self.image.dtype != np.uint8:
                raise ValueError(f"image must be uint8 {IMAGE_SHAPE}, got {self.image.dtype} {self.image.shape}")
            parts.append(np.ascontiguousarray(self.image).data)
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes | None) -> "TensorRecord":
        if payload is None or len(payload) < _HEADER.size:
            raise ProcessingError("BAD_TENSOR_RECORD", "tensor record shorter than its header")
        magic, version, flags, n_tokens, id_len, tok_id, part, offset, event_time, pre_time = _HEADER.unpack_from(payload)
        if magic != _MAGIC:
            raise ProcessingError("BAD_TENSOR_RECORD", "not a prodcat tensor record (bad magic)")
        if version != TENSOR_VERSION:
            raise ProcessingError("UNKNOWN_VERSION", f"tensor record version {version}, this worker reads {TENSOR_VERSION}")
        if not (_epoch_seconds(event_time) and _epoch_seconds(pre_time)):
            # NaN would poison the end-to-end latency histogram's sum for good, a time ages away its average
            raise ProcessingError("BAD_TENSOR_RECORD", f"event / preprocessed time {event_time!r} / {pre_time!r} is not epoch seconds")
        pos = _HEADER.size
        expected = pos + id_len + 4 * n_tokens + (_IMAGE_BYTES if flags & _FLAG_IMAGE else 0)
        if len(payload) != expected:
            raise ProcessingError("BAD_TENSOR_RECORD", f"tensor record is {len(payload)} bytes, header says {expected}")
        try:
            pid = payload[pos : pos + id_len].decode("utf-8")
        except UnicodeDecodeError:
            raise ProcessingError("BAD_TENSOR_RECORD", "product id is not UTF-8") from None
        if not pid:
            raise ProcessingError("BAD_TENSOR_RECORD", "tensor record has no product id")
        pos += id_len
        tokens = np.frombuffer(payload, dtype="<i4", count=n_tokens, offset=pos)
        pos += 4 * n_tokens
        image = None
        if flags & _FLAG_IMAGE:
            image = np.frombuffer(payload, dtype=np.uint8, count=_IMAGE_BYTES, offset=pos).reshape(IMAGE_SHAPE)
        return cls(pid, tokens, image, event_time, pre_time, part, offset, tok_id)


# ---------------------------------------------------------------- result v1


def result(product_id: str, prediction, model_version: str, event_time: float, source: dict,
           timings_ms: dict) -> dict:
    """The result object: what goes on products.categories and (flattened to strings) into Redis."""
    return {
        "schema_version": RESULT_VERSION,
        "product_id": product_id,
        "category": prediction.category,
        "confidence": round(float(prediction.confidence), 6),
        "top_k": prediction.top_k,
        "uncertain": bool(prediction.uncertain),
        "category_path": prediction.category_path,
        "model_version": model_version,
        "event_time": event_time,
        "timings": {k: round(v, 3) for k, v in timings_ms.items()},
        "source": source,
    }


def _json(value) -> bytes:
    """Compact UTF-8 JSON for the per-item hot path (results, Redis fields): orjson is ~5× the standard
    library's speed here; numpy scalars are written as numbers."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_result(res: dict) -> bytes:
    return _json(res)


def result_to_redis_hash(res: dict) -> dict[str, str | bytes]:
    """Redis hash fields: strings as they are, everything else as JSON; the same result → the same hash."""
    return {k: v if isinstance(v, str) else _json(v) for k, v in res.items()}


def result_from_redis_hash(fields: dict) -> dict:
    out = {}
    for k, v in fields.items():
        k = k.decode() if isinstance(k, bytes) else k
        v = v.decode() if isinstance(v, bytes) else v
        try:
            out[k] = json.loads(v) if k not in ("product_id", "category", "model_version") else v
        except ValueError:
            out[k] = v
    return out


# ---------------------------------------------------------------- dead letter v1


def dead_letter(stage: str, error: ProcessingError, payload: bytes | None, source: dict, product_id: str | None = None) -> bytes:
    """The original payload travels base64-encoded (it may not be UTF-8); `payload_text` when it is."""
    doc = {
        "schema_version": DEAD_LETTER_VERSION,
        "stage": stage,
        "error_code": error.code,
        "reason": error.reason,
        "product_id": product_id,
        "source": source,
        "time": time.time(),
        "payload_b64": base64.b64encode(payload or b"").decode("ascii"),
    }
    if payload is not None and len(payload) <= 4096:
        try:
            doc["payload_text"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def decode_dead_letter(payload: bytes) -> dict:
    doc = json.loads(payload)
    if doc.get("schema_version") != DEAD_LETTER_VERSION:
        raise ProcessingError("UNKNOWN_VERSION", f"dead letter version {doc.get('schema_version')!r}")
    return doc
