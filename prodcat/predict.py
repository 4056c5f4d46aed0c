"""`prodcat predict`: offline batch inference over a JSONL file of product events v1, through the same
preprocessing (preprocess_worker.transform) and ONNX code (common.model) as the workers."""
from __future__ import annotations

import argparse
import json
import sys
import time

from common import schemas
from common.errors import ProcessingError
from common.images import FetchPolicy
from common.model import PRECISIONS, Classifier, ModelError
from common.settings import number
from preprocess_worker.transform import preprocess

BATCH = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (model.onnx + manifest.json)")
    p.add_argument("--input", required=True, help="product events v1, one JSON object per line ('-' = stdin)")
    p.add_argument("--output", required=True, help="results v1 / error records, one per input line ('-' = stdout); exit 1 when every line is an error")
    p.add_argument("--providers", default="auto")
    p.add_argument("--threads", type=number(int, 0), default=2, help="ONNX Runtime intra-op threads (0 = the runtime's own pool)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto = the int8 graph on CPU when the model has one")
    p.add_argument("--allow-private-addresses", action="store_true", help="let image_url point at loopback/private hosts")


def run(args: argparse.Namespace) -> int:
    try:
        clf = Classifier(args.model, args.providers, args.threads, precision=args.precision)
    except ModelError as e:
        print(f"prodcat predict: {e}", file=sys.stderr)
        return 2
    policy = FetchPolicy(allow_private_addresses=args.allow_private_addresses)
    try:
        src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
        dst = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    except OSError as e:
        print(f"prodcat predict: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    counts = {"results": 0, "errors": 0}
    with src, dst:
        pending: list[tuple[int, object]] = []  # (line number, TensorRecord | error dict), in input order
        for lineno, line in enumerate(src, 1):
            if not line.strip():
                continue
            pending.append((lineno, _preprocess_line(line.rstrip(b"\r\n"), lineno, clf, policy)))
            if len(pending) >= BATCH:
                _flush(pending, clf, args.input, dst, counts)
        _flush(pending, clf, args.input, dst, counts)
    print(f"prodcat predict: {counts['results']} results, {counts['errors']} errors → {args.output}", file=sys.stderr)
    # some bad lines among good ones are the input's business (their error records say why); none good is a failure
    if counts["errors"] and not counts["results"]:
        print(f"prodcat predict: no line of {args.input} could be classified", file=sys.stderr)
        return 1
    return 0


def _preprocess_line(line: bytes, lineno: int, clf: Classifier, policy: FetchPolicy):
    product_id = None
    try:
        event = schemas.decode_event(line)
        product_id = event.product_id
        return preprocess(event, clf.tokenizer, policy, event.event_time or time.time(), -1, lineno, "predict")
    except ProcessingError as e:
        return {"product_id": product_id or e.product_id, "line": lineno, "error": e.code, "reason": e.reason}


def _flush(pending: list, clf: Classifier, source: str, dst, counts: dict) -> None:
    records = [rec for _, rec in pending if isinstance(rec, schemas.TensorRecord)]
    predictions = iter(clf.predictions(clf.run([r.token_ids for r in records], [r.image for r in records]))) if records else iter(())
    for lineno, rec in pending:
        if isinstance(rec, dict):
            out, key = rec, "errors"
        else:
            out = schemas.result(rec.product_id, next(predictions), clf.version, rec.event_time,
                                 {"file": source, "line": lineno}, {})
            key = "results"
        counts[key] += 1
        dst.write(json.dumps(out, ensure_ascii=False) + "\n")
    pending.clear()
