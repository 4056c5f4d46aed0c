"""Redis sink: one hash per product, rewritten whole (idempotent). Duplicates are counted, not stored."""
from __future__ import annotations

import json

import redis

from common import schemas
from common.errors import SinkError


class RedisSink:
    def __init__(self, url: str, key_prefix: str):
        # short timeouts: an unreachable Redis must fail the checkpoint quickly, which then backs off
        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=10)
        self.key_prefix = key_prefix

    def key(self, product_id: str) -> str:
        return f"{self.key_prefix}{product_id}"

    def write(self, results: list[dict]) -> int:
        """Write every result in one round trip; returns how many rewrote the same source event (redeliveries)."""
        if not results:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for res in results:
            key = self.key(res["product_id"])
            pipe.hget(key, "source")
            pipe.hset(key, mapping=schemas.result_to_redis_hash(res))
        try:
            replies = pipe.execute()
        except redis.RedisError as e:
            raise SinkError(f"redis: {e}") from None
        previous_sources = replies[0::2]
        return sum(
            1 for res, prev in zip(results, previous_sources)
            if prev is not None and json.loads(prev) == res["source"]
        )

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False
