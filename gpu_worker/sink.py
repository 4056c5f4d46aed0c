"""Redis sink: one hash per product, rewritten whole (idempotent). Duplicates are counted, not stored.

The hash holds the result of the product's newest event: a result of an older one is not written over it. A
product's events can be processed out of order — partitions added to a topic (a key's partition changes while
older records still queue in the old one), a producer without keys, offsets reset for a replay — and the
category of the product's latest name and photo must stay. Every result is still on the output topic."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import chain

import redis

from common import schemas
from common.errors import SinkError


@dataclass
class SinkWrite:
    duplicates: int = 0  # results that rewrote the same source event (redeliveries)
    rejected: dict[int, str] = field(default_factory=dict)  # result index → why Redis refused that key, for good
    superseded: int = 0  # results not written: the hash holds a newer event's result


# One product's result, unless its hash holds a newer event's (a later event_time; an equal one is rewritten:
# a redelivery, or a replay under a new model). Returns {1 written | 0 superseded, the `source` held before}, or
# {-1, the key's type} when the key holds something else than a hash (the type is asked, not read from an error
# text, whose form differs between Redis versions inside scripts).
_WRITE_UNLESS_NEWER = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then return {-1, kind} end
local held = redis.call('HMGET', KEYS[1], 'event_time', 'source')
local held_time = tonumber(held[1])
if held_time and held_time > tonumber(ARGV[1]) then return {0, held[2]} end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return {1, held[2]}
"""


class RedisSink:
    def __init__(self, url: str, key_prefix: str):
        # short timeouts: an unreachable Redis must fail the checkpoint quickly, which then backs off
        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=10)
        self.key_prefix = key_prefix
        self._write_unless_newer = self.client.register_script(_WRITE_UNLESS_NEWER)

    def key(self, product_id: str) -> str:
        return f"{self.key_prefix}{product_id}"

    def write(self, results: list[dict]) -> SinkWrite:
        """Every result in one round trip. A key holding another type refuses its result for good: retrying the
        batch would meet it again and stall the partition, so that result alone is reported rejected. An error
        reply (e.g. OOM under maxmemory) is about Redis as a whole: the batch is retried."""
        out = SinkWrite()
        if not results:
            return out
        pipe = self.client.pipeline(transaction=False)
        for res in results:
            fields = schemas.result_to_redis_hash(res)
            self._write_unless_newer(keys=[self.key(res["product_id"])], args=[res["event_time"], *chain(*fields.items())],
                                     client=pipe)
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as e:
            raise SinkError(f"redis: {e}") from None
        for i, (res, reply) in enumerate(zip(results, replies)):
            if isinstance(reply, redis.ResponseError):
                raise SinkError(f"redis: {reply}")
            written, previous = reply
            if written == -1:
                kind = previous.decode() if isinstance(previous, bytes) else previous
                out.rejected[i] = f"WRONGTYPE: redis key {self.key(res['product_id'])!r} holds a {kind}, not a hash"
                continue
            out.superseded += not written
            if written and _same_source(previous, res["source"]):
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
