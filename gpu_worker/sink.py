"""Redis sink: one hash per product, rewritten whole (idempotent). Duplicates are counted, not stored."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import redis

from common import schemas
from common.errors import SinkError


@dataclass
class SinkWrite:
    duplicates: int = 0  # results that rewrote the same source event (redeliveries)
    rejected: dict[int, str] = field(default_factory=dict)  # result index → why Redis refused that key, for good


class RedisSink:
    def __init__(self, url: str, key_prefix: str):
        # short timeouts: an unreachable Redis must fail the checkpoint quickly, which then backs off
        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=10)
        self.key_prefix = key_prefix

    def key(self, product_id: str) -> str:
        return f"{self.key_prefix}{product_id}"

    def write(self, results: list[dict]) -> SinkWrite:
        """Every result in one round trip. A key holding another type (WRONGTYPE) refuses its result for good:
        retrying the batch would meet it again and stall the partition, so that result alone is reported
        rejected. Any other error reply (e.g. OOM under maxmemory) is about Redis as a whole: the batch is retried."""
        out = SinkWrite()
        if not results:
            return out
        pipe = self.client.pipeline(transaction=False)
        for res in results:
            key = self.key(res["product_id"])
            pipe.hget(key, "source")
            pipe.hset(key, mapping=schemas.result_to_redis_hash(res))
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as e:
            raise SinkError(f"redis: {e}") from None
        for i, (res, previous, written) in enumerate(zip(results, replies[0::2], replies[1::2])):
            for reply in (previous, written):
                if isinstance(reply, redis.ResponseError):
                    if not str(reply).startswith("WRONGTYPE"):
                        raise SinkError(f"redis: {reply}")
                    out.rejected[i] = f"redis refused key {self.key(res['product_id'])!r}: {reply}"
            if i not in out.rejected and _same_source(previous, res["source"]):
                out.duplicates += 1
        return out

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


def _same_source(previous: bytes | None, source: dict) -> bool:
    """Whether the hash already held this very source event; a value another writer left there is not."""
    try:
        return previous is not None and json.loads(previous) == source
    except ValueError:  # not JSON (UnicodeDecodeError is one): written by something else
        return False
