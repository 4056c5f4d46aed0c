"""`prodcat replay`: dead letters back onto the topic they were read from, once their cause is fixed — an image
host up again, a Redis key removed (`SINK_REJECTED`), a model that knows the vocabulary (`TOKENIZER_MISMATCH`).

Reads the dead-letter topic to its end and keeps the letters written before the run started (a replayed record
that fails again is left for a later run) whose code, stage and time match. Each original payload goes, with its
original key, to the topic named in the letter's `source`: raw events to the raw topic, tensor records to the
tensors topic. The letters stay in the dead-letter topic (it is a log): a second run over the same window
replays them again, which the pipeline absorbs (Redis is rewritten with the same result, counted as duplicates).
The summary's `last_time` is the `--since` of a run that takes only what came after."""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import re
import sys
import time
from collections import Counter

from common import kafka, schemas
from common import settings as settings_mod
from common.errors import DeliveryError, ProcessingError

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def point_in_time(text: str) -> float:
    """argparse type: epoch seconds, an ISO 8601 time (UTC unless it says otherwise), or an age (`90m`, `2h`, `7d`)."""
    text = text.strip()
    if ago := _AGO.match(text):
        return time.time() - float(ago.group(1)) * _UNIT_S[ago.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants epoch seconds, an ISO 8601 time or an age like 2h, got {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--code", action="append", required=True, metavar="CODE",
                   help="error code to replay, e.g. URL_TIMEOUT (repeatable)")
    p.add_argument("--stage", choices=("preprocess", "inference"), help="only dead letters of this stage")
    p.add_argument("--since", type=point_in_time, help="dead letters written at or after: epoch s, ISO 8601, or an age (2h)")
    p.add_argument("--until", type=point_in_time, help="dead letters written before this time")
    p.add_argument("--dry-run", action="store_true", help="count what would be replayed; produce nothing")
    p.add_argument("--bootstrap-servers", dest="bootstrap_servers", help="(env PRODCAT_BOOTSTRAP_SERVERS)")
    p.add_argument("--topic-dlq", dest="topic_dlq", help="(env PRODCAT_TOPIC_DLQ, default products.dlq)")
    p.add_argument("--kafka-opt", action="append", default=[], metavar="KEY=VALUE", help="librdkafka option (repeatable)")


def run(args: argparse.Namespace) -> int:
    settings = settings_mod.load(args)
    try:
        summary = replay(settings, {code.upper() for code in args.code}, args.stage, args.since, args.until, args.dry_run)
    except ReplayError as e:
        print(f"prodcat replay: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, ensure_ascii=False))
    return 0


class ReplayError(Exception):
    """The broker could not be read or written; nothing after the failure was replayed."""


def replay(settings, codes: set[str], stage: str | None, since: float | None, until: float | None,
           dry_run: bool = False) -> dict:
    # letters written after the start are not this run's: a replayed record that fails again must not come round
    until = time.time() if until is None else min(until, time.time())
    counts: Counter = Counter()
    targets: Counter = Counter()
    in_window: Counter = Counter()
    last_time = None
    deliveries = None if dry_run else kafka.DeliveryTracker(lambda: kafka.make_producer(settings, "replay"))
    for msg in _dead_letter_records(settings):  # one at a time: a tensor record's letter is ~200 KB
        counts["read"] += 1
        letter = _decode(msg.value())
        if letter is None:
            counts["unreadable"] += 1
            continue
        written = letter["time"]
        if (stage and letter["stage"] != stage) or (since is not None and written < since) or written >= until:
            continue
        in_window[letter["error_code"]] += 1  # what there is to replay: a misspelt --code matches nothing
        if letter["error_code"] not in codes:
            continue
        topic = _source_topic(settings, letter)
        if topic is None:
            counts["no_source_topic"] += 1
            continue
        counts["matched"] += 1
        targets[topic] += 1
        last_time = written if last_time is None else max(last_time, written)
        if deliveries is not None:
            deliveries.produce(topic, letter["payload"], msg.key(), msg.headers(), _original_timestamp_ms(letter))
    if deliveries is not None:
        try:
            deliveries.flush(60)
        except DeliveryError as e:
            raise ReplayError(f"of {counts['matched']} matched: {e}") from None
    return {"dead_letters_read": counts["read"], "matched": counts["matched"],
            "replayed": 0 if dry_run else counts["matched"], "dry_run": dry_run, "by_topic": dict(targets),
            "codes_in_window": dict(in_window.most_common()),
            "unreadable": counts["unreadable"], "no_source_topic": counts["no_source_topic"], "last_time": last_time}


def _decode(value: bytes | None) -> dict | None:
    """A dead letter v1 with what replay needs (code, stage, time, the original payload's bytes), else None."""
    try:
        letter = schemas.decode_dead_letter(value)
        letter["payload"] = base64.b64decode(letter.get("payload_b64") or "", validate=True)
        if not isinstance(letter.get("error_code"), str) or not isinstance(letter.get("time"), (int, float)):
            return None
        return letter
    except (TypeError, ValueError, AttributeError, ProcessingError):  # None, not JSON / base64, not an object
        return None


def _original_timestamp_ms(letter: dict) -> int:
    """The record's own timestamp (an event without `event_time` is ordered by it: a replay stamped now would go
    over the result of a later event of that product); older letters: when the letter was written."""
    source = letter.get("source")
    ts = source.get("timestamp_ms") if isinstance(source, dict) else None
    return ts if isinstance(ts, int) and ts > 0 else int(letter["time"] * 1000)


def _source_topic(settings, letter: dict) -> str | None:
    """Where the dead-lettered record was read from (older letters: the stage's input topic); never the DLQ itself."""
    source = letter.get("source")
    topic = source.get("topic") if isinstance(source, dict) else None
    topic = topic or {"preprocess": settings.topic_raw, "inference": settings.topic_tensors}.get(letter.get("stage"))
    return topic if isinstance(topic, str) and topic != settings.topic_dlq else None


def _dead_letter_records(settings):
    """Every record the dead-letter topic holds, read to the end of each partition. The whole topic: dead letters
    are few (an alert fires at 1 per second), and the letters' own times cut the window exactly. The end is
    librdkafka's end-of-partition event (the fetch's high watermark): Tansu answers a watermark or time lookup
    with the last batch's base offset."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "prodcat-replay",
                         "enable.auto.commit": False, "enable.partition.eof": True, **settings.kafka_options()})
    try:
        meta = consumer.list_topics(settings.topic_dlq, timeout=10).topics.get(settings.topic_dlq)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ReplayError(f"topic {settings.topic_dlq} not found at {settings.bootstrap_servers}")
        todo = set(meta.partitions)
        consumer.assign([TopicPartition(settings.topic_dlq, p, OFFSET_BEGINNING) for p in sorted(todo)])
        idle_deadline = time.monotonic() + 60
        while todo:
            if time.monotonic() > idle_deadline:
                raise ReplayError(f"{settings.topic_dlq}: no record and no end of partition {sorted(todo)} for 60 s")
            for msg in consumer.consume(100, timeout=1.0):
                idle_deadline = time.monotonic() + 60
                if msg.error() is None:
                    yield msg
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    todo.discard(msg.partition())
                else:
                    raise ReplayError(f"reading {settings.topic_dlq}: {msg.error()}")
    except KafkaException as e:
        raise ReplayError(f"broker {settings.bootstrap_servers}: {e}") from None
    finally:
        consumer.close()
