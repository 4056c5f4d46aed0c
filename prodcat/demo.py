"""`prodcat demo`: the whole system on this machine — embedded Tansu broker + redis-server, 2 preprocess
workers and 1 inference worker as separate processes, real Myntra products (name + file:// photo) in,
results in Redis, then a summary. Uses the trained model; trains a fast one first when none is built."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from common import schemas
from common.model import Manifest, ModelError
from common.settings import number
from prodcat.options import add_run_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, preprocess_workers=2, max_delay_ms=20.0)  # --model: trained (fast) first if absent
    p.add_argument("--count", type=number(), default=2000, help="products to publish (test split, photos first)")
    p.add_argument("--timeout", type=number(float, 1), default=600.0, help="seconds to wait for every result")


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def ensure_model(model_dir: str, data_dir: str) -> Manifest:
    try:
        manifest = Manifest.load(model_dir)
    except ModelError:
        log(f"no trained model in {model_dir}: training one now on myntra (fast configuration)")
        from training.train import train_model

        train_model("myntra", data_dir, model_dir, fast=True, progress=True)
        manifest = Manifest.load(model_dir)
    if manifest.stand_in:
        raise SystemExit(f"prodcat demo: {model_dir} holds a stand-in model ({manifest.model_version}), not a trained one")
    return manifest


def demo_products(data_dir: str, count: int) -> list:
    """Test-split products (never trained on), those with photos first."""
    from training.data import load_dataset

    test = load_dataset("myntra", data_dir).split("test")
    with_photo = [it for it in test if it.image]
    return (with_photo + [it for it in test if not it.image])[:count]


def _image_url(ref: str) -> str:
    return ref if "://" in ref else "file://" + os.path.abspath(ref)


def run(args: argparse.Namespace) -> int:
    from prodcat.stack import LocalStack, publish, read_topic, wait_for_outcomes

    if not os.path.isdir(args.data_dir):
        print(f"prodcat demo: data dir {args.data_dir} not found (expected ../shared/data beside the clone)", file=sys.stderr)
        return 2
    manifest = ensure_model(args.model, args.data_dir)
    log(f"model {manifest.model_version} from {args.model} ({len(manifest.labels)} leaf categories)")
    products = demo_products(args.data_dir, args.count)
    label = {it.id: it.label for it in products}
    with LocalStack() as stack:
        stack.create_topics()
        log(f"broker {stack.settings.bootstrap_servers}, redis {stack.settings.redis_url}; starting workers")
        # one core each for the decoders, ORT with 2 threads: the 2-core machine is shared by all of them
        workers = [stack.start_worker("preprocess", args.model, wait_ready=False) for _ in range(args.preprocess_workers)]
        workers.append(stack.start_worker("inference", args.model, wait_ready=False, max_batch=args.max_batch,
                                          max_delay_ms=args.max_delay_ms, intra_op_threads=2))
        stack.wait_ready(workers, timeout_s=120)
        events = [(it.id, schemas.encode_event(it.id, it.name, image_url=_image_url(it.image) if it.image else None))
                  for it in products]
        log(f"publishing {len(events)} products ({sum(1 for it in products if it.image)} with photos)")
        start = publish(stack.settings, events, producer=stack.publisher)
        results = wait_for_outcomes(stack, list(label), timeout_s=args.timeout,
                                    progress=lambda n: print(f"\r[demo] results in Redis: {n}/{len(events)}", end="", file=sys.stderr))
        print(file=sys.stderr)
        dead = read_topic(stack.settings, stack.settings.topic_dlq, idle_s=1.0)
        summary = summarise(products, label, results, dead, start, manifest)
    print_summary(summary, args.json)
    return 0 if summary["lost"] == 0 else 1


def summarise(products, label, results, dead, start, manifest) -> dict:
    from prodcat.stack import items_per_s

    dead_ids = {m.key().decode() for m in dead if m.key()}
    lat = np.array([r["timings"]["event_to_result_ms"] for r in results.values()]) if results else np.zeros(1)
    correct = [results[p]["category"] == label[p] for p in results]
    with_photo = {it.id for it in products if it.image}
    return {
        "model_version": manifest.model_version,
        "events": len(products),
        "results": len(results),
        "dead_letters": len(dead_ids),
        "lost": len(products) - len(results) - len(dead_ids - set(results)),
        "accuracy": round(float(np.mean(correct)), 4) if correct else 0.0,
        "accuracy_with_photo": round(float(np.mean([results[p]["category"] == label[p] for p in results if p in with_photo] or [0])), 4),
        "uncertain_share": round(float(np.mean([r["uncertain"] for r in results.values()])) if results else 0.0, 4),
        "items_per_s": items_per_s(results, start),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def print_summary(summary: dict, as_json: bool) -> None:
    print(f"model         {summary['model_version']}")
    print(f"events        {summary['events']}   results {summary['results']}   dead letters {summary['dead_letters']}   lost {summary['lost']}")
    print(f"accuracy      {summary['accuracy']:.4f} (with photo {summary['accuracy_with_photo']:.4f}; uncertain {summary['uncertain_share']:.1%})")
    print(f"throughput    {summary['items_per_s']} items/s")
    print(f"latency       p50 {summary['p50_ms']} ms   p99 {summary['p99_ms']} ms   (event → result)")
    if as_json:
        print(json.dumps(summary))
