"""`prodcat bench`: every stage alone, the whole pipeline, and a naive baseline — measured in one run on
the same machine, with the ratios between them. Not a test: it reports, it does not assert.

Stages (each alone, one process): preprocess per core (file read + decode + resize + tokenize + serialize),
tokenization, inference vs batch size, tensor records through the broker. End to end: the local stack at
full load, with the bound's largest stage loops run again between its runs (each run is set against the host's
speed of its own moment), then paced at ~50 % of that rate. Naive: one process, event → full decode → batch-1 →
Redis.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from common import schemas
from common.images import FetchPolicy, decode_resize
from common.model import LANE_THREAD_NAME, PRECISIONS, Classifier, Manifest, ModelError, choose_providers
from common.settings import cache_dir, number
from common.tokenize import Tokenizer
from preprocess_worker.transform import preprocess
from prodcat.options import add_run_arguments, sizes

STAGES = ("preprocess", "tokenize", "inference", "broker", "e2e", "naive", "scaling")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, preprocess_workers=1, max_delay_ms=10.0)
    p.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md and the plots")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--items", type=number(), default=2000, help="events per end-to-end run")
    p.add_argument("--repeats", type=number(), default=3, help="full-load end-to-end and naive runs (the median counts); broker-stage and 1-thread inference runs (the cheapest counts)")
    p.add_argument("--photos", type=number(), default=400, help="distinct 800×800 catalogue JPEGs to generate (cached)")
    p.add_argument("--batches", type=sizes, default=[1, 8, 32, 64, 128], help="inference batch sizes, a comma list")
    p.add_argument("--providers", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="graph for inference, end to end and naive alike (auto = int8 on CPU when the model has one)")
    p.add_argument("--threads", type=number(), default=2, help="ONNX Runtime intra-op threads (inference stage and worker)")
    p.add_argument("--seconds", type=number(float, 0.5), default=8.0, help="duration of each timed stage loop")
    p.add_argument("--fp16", action="store_true",
                   help="also measure an fp16 copy of the fp32 graph (for GPUs) and its top-1 agreement with fp32")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ inputs


def catalogue_inputs(data_dir: str, n_photos: int) -> list[tuple[str, str, str]]:
    """(product id, name, path) for real Myntra photos re-encoded as typical catalogue JPEGs (800×800, q90);
    generated once into the cache."""
    import csv

    from PIL import Image

    folder = os.path.join(cache_dir(), "bench-jpegs-800")
    os.makedirs(folder, exist_ok=True)
    out = []
    with open(os.path.join(data_dir, "myntra", "products.csv"), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if not row["image"]:
                continue
            dst = os.path.join(folder, f"{row['id']}.jpg")
            if not os.path.exists(dst):
                with Image.open(os.path.join(data_dir, "myntra", row["image"])) as im:
                    im.convert("RGB").resize((800, 800), Image.BICUBIC).save(dst + ".tmp", "JPEG", quality=90)
                os.replace(dst + ".tmp", dst)
            out.append((row["id"], row["name"], dst))
            if len(out) >= n_photos:
                break
    return out


def events_for(inputs, n: int, prefix: str) -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i}", schemas.encode_event(f"{prefix}{i}", inputs[i % len(inputs)][1], image_url="file://" + inputs[i % len(inputs)][2]))
            for i in range(n)]


def timed_loop(fn, items: list, seconds: float) -> float:
    """Items per second of fn(item) over repeated passes for about `seconds` (after one warm-up item)."""
    fn(items[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for it in items:
            fn(it)
        done += len(items)
    return done / (time.perf_counter() - start)


# ------------------------------------------------------------------ stages alone


def preprocess_rate(inputs, tokenizer: Tokenizer, seconds: float, image_base: str = "file://",
                    policy: FetchPolicy = FetchPolicy()) -> float:
    """The preprocess worker's per-event work on one core, items/s: decode event, read the photo (a file, or from
    `image_base` over HTTP), decode + resize, tokenize, encode the tensor record."""
    payloads = [schemas.encode_event(pid, name, image_url=image_base + (path if image_base == "file://" else "/" + os.path.basename(path)))
                for pid, name, path in inputs]

    def one(payload: bytes) -> None:
        event = schemas.decode_event(payload)
        preprocess(event, tokenizer, policy, time.time()).encode()

    return round(timed_loop(one, payloads, seconds), 1)


def bench_preprocess(inputs, tokenizer: Tokenizer, seconds: float) -> dict:
    def decode_only(path: str) -> None:
        with open(path, "rb") as f:
            decode_resize(f.read())

    with image_host(os.path.dirname(inputs[0][2])) as base:
        over_http = preprocess_rate(inputs, tokenizer, seconds / 2, base, FetchPolicy(allow_private_addresses=True))
    return {
        "preprocess_items_per_s_per_core": preprocess_rate(inputs, tokenizer, seconds),
        "preprocess_http_items_per_s_per_core": over_http,
        "decode_resize_per_s": round(timed_loop(decode_only, [p for _, _, p in inputs], seconds / 2), 1),
    }


def serve_images(folder: str) -> None:
    """An image host for the bench: `folder` over HTTP/1.1 with keep-alive; prints its port, serves until killed."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # head and body leave at once: Nagle + delayed ACK held a kept connection 40 ms

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
    print(server.server_port, flush=True)
    server.serve_forever()


@contextlib.contextmanager
def image_host(folder: str):
    """serve_images in a process of its own (its CPU is not the worker's), as a CDN would be → its base URL."""
    proc = subprocess.Popen([sys.executable, "-c", f"from prodcat.bench import serve_images; serve_images({folder!r})"],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait()


def bench_tokenize(inputs, tokenizer: Tokenizer, data_dir: str, seconds: float) -> dict:
    import csv

    latin = [name for _, name, _ in inputs]
    korean = []
    path = os.path.join(data_dir, "kr_shop", "titles.csv")
    if os.path.exists(path):
        with open(path, newline="", encoding="utf-8") as f:
            korean = [r["name"] for _, r in zip(range(1000), csv.DictReader(f))]
    out = {"tokenize_latin_per_s": round(timed_loop(tokenizer.encode, latin, seconds / 2), 1)}
    if korean:
        out["tokenize_korean_per_s"] = round(timed_loop(tokenizer.encode, korean, seconds / 2), 1)
    return out


def preprocessed_records(inputs, tokenizer: Tokenizer) -> list[schemas.TensorRecord]:
    policy = FetchPolicy()
    return [preprocess(schemas.decode_event(schemas.encode_event(pid, name, image_url="file://" + path)), tokenizer, policy, 0.0)
            for pid, name, path in inputs]


def bench_inference(model_dir: str, providers: str, threads: int, batches: list[int], records, seconds: float,
                    precision: str = "auto") -> dict:
    clf = Classifier(model_dir, providers, threads, precision=precision)
    clf.warm_up()
    per_batch = {}
    for b in batches:
        chunks = [records[i : i + b] for i in range(0, max(len(records) - b + 1, 1), b)] or [records[:b]]
        chunks = [c if len(c) == b else (c * b)[:b] for c in chunks]

        def run(chunk):
            clf.run([r.token_ids for r in chunk], [r.image for r in chunk])

        run(chunks[0])  # per-shape warm-up (TensorRT/CUDA build their kernels on the first run)
        per_batch[b] = round(timed_loop(run, chunks, seconds / len(batches) + 1) * b, 1)
        log(f"inference batch {b:4d}: {per_batch[b]} items/s ({clf.provider} {clf.precision}, {threads} threads)")
    best = max(per_batch, key=per_batch.get)
    return {"inference_provider": clf.provider, "inference_precision": clf.precision, "inference_threads": threads,
            "inference_items_per_s": per_batch,
            "inference_items_per_s_best": per_batch[best], "best_batch": best}


def _proc_stat(path: str) -> tuple[str, float]:
    """(name, user + system CPU seconds so far) of a process or thread, from its /proc/…/stat."""
    with open(path) as f:
        comm, fields = f.read().split("(", 1)[1].rsplit(")", 1)
    ticks = fields.split()
    return comm, (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time of these processes so far, together (Linux /proc)."""
    return sum(_proc_stat(f"/proc/{pid}/stat")[1] for pid in pids)


# what each thread of a worker process is, by its OS name (`comm`): the main loop, librdkafka's threads, the
# inference lanes (common.model.LANE_THREAD_NAME), and the rest — the runtimes' own pools (OpenVINO's streams,
# ONNX Runtime's threads), the metrics server
THREAD_ROLES = ("main", "librdkafka", "lanes", "runtime + other")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU time of one process's live threads so far, by `THREAD_ROLES` (Linux /proc)."""
    out = dict.fromkeys(THREAD_ROLES, 0.0)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, seconds = _proc_stat(f"/proc/{pid}/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            continue
        role = ("main" if int(tid) == pid else "librdkafka" if comm.startswith("rdk:")
                else "lanes" if comm.startswith(LANE_THREAD_NAME) else "runtime + other")
        out[role] += seconds
    return out


def fp16_copy(model_dir: str, out_dir: str) -> str:
    """An fp16 copy of the model's fp32 graph in `out_dir` (manifest beside it): weights and activations in fp16,
    the inputs and outputs as the contract says. ONNX Runtime's own converter (ships with the cpu and gpu
    wheels): onnxconverter-common 1.16 refuses a graph that already holds an fp16 tensor (the served models'
    name table), and with `Cast` blocked it loops forever over the casts it inserts."""
    import shutil
    import warnings

    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from common.model import MANIFEST, ONNX_FILE, seal_graph

    shutil.copy(os.path.join(model_dir, MANIFEST), out_dir)
    with warnings.catch_warnings():  # one warning per weight clipped to fp16's range
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(os.path.join(model_dir, ONNX_FILE)), keep_io_types=True)
    onnx.save(model, os.path.join(out_dir, ONNX_FILE))
    return seal_graph(out_dir)  # the manifest names the graph beside it: the fp16 one


def bench_fp16(model_dir: str, providers: str, threads: int, batches: list[int], records, seconds: float) -> dict:
    """The fp16 copy measured like fp32, plus how often its top-1 agrees with the fp32 graph's on the same real
    records — fp16 is worth serving only where that holds."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="prodcat-fp16-") as fp16_dir:
        fp16_copy(model_dir, fp16_dir)
        log("fp16 copy (it sits where the fp32 graph does, so the lines below say fp32):")
        speed = bench_inference(fp16_dir, providers, threads, batches, records, seconds, "fp32")
        tokens, images = [r.token_ids for r in records], [r.image for r in records]
        p32 = Classifier(model_dir, providers, threads, precision="fp32").run(tokens, images)
        p16 = Classifier(fp16_dir, providers, threads, precision="fp32").run(tokens, images)
    return {"fp16_items_per_s": speed["inference_items_per_s"], "fp16_items_per_s_best": speed["inference_items_per_s_best"],
            "fp16_best_batch": speed["best_batch"], "fp16_top1_agreement": round(float(np.mean(p32.argmax(1) == p16.argmax(1))), 4),
            "fp16_max_abs_prob_diff": round(float(np.abs(p32 - p16).max()), 4), "fp16_checked_items": len(records)}


def bench_broker(records, seconds: float, repeats: int = 3) -> dict:
    """Tensor records (≈150 KB, lz4 as the workers send them) through the real broker: produce rate, then
    consume rate, and the CPU both sides spend per record (broker + client) — the broker's share of the bound.
    Run `repeats` times, each in a fresh stack: single runs here cost 0.79–1.28 core-ms per record on the same
    code, so the bound takes the cheapest run, as it does for inference (the cores can do no better than that)."""
    best, runs = cheapest_run(repeats, lambda: _broker_run(records, seconds), lambda r: r["broker_core_ms_per_record"])
    return {**best, "broker_core_ms_per_record_runs": [r["broker_core_ms_per_record"] for r in runs]}


def cheapest_run(repeats: int, measure, cost):
    """`measure()` `repeats` times → (the run of least `cost`, every run). Noise on this shared host only ever
    adds cost, so a bound built from stage measurements takes each stage's cheapest run."""
    runs = [measure() for _ in range(max(1, repeats))]
    return min(runs, key=cost), runs


def _broker_run(records, seconds: float) -> dict:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from common import kafka
    from prodcat.stack import LocalStack

    payloads = [r.encode() for r in records]
    with LocalStack() as stack:
        stack.create_topics()
        producer = kafka.make_producer(stack.settings, "bench")
        cpu0 = cpu_seconds(stack.broker.pid, os.getpid())
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            for p in payloads:
                kafka.produce_waiting(producer, stack.settings.topic_tensors, p)
            n += len(payloads)
        producer.flush(60)
        produce_rate = n / (time.perf_counter() - start)
        cpu1 = cpu_seconds(stack.broker.pid, os.getpid())
        # consumed as the inference worker consumes (its consumer settings), all partitions assigned directly
        topic = stack.settings.topic_tensors
        consumer = kafka.make_consumer(stack.settings, "bench-broker", "bench")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions])
        got, start = 0, time.perf_counter()
        while got < n and time.perf_counter() - start < 120:
            got += sum(1 for m in consumer.consume(64, timeout=1.0) if m.error() is None)
        consume_rate = got / max(1e-6, time.perf_counter() - start)
        cpu2 = cpu_seconds(stack.broker.pid, os.getpid())
        consumer.close()
    out = {"broker_tensor_produce_per_s": round(produce_rate, 1), "broker_tensor_consume_per_s": round(consume_rate, 1),
           "broker_core_ms_per_record": round(1000 * ((cpu1 - cpu0) / n + (cpu2 - cpu1) / max(1, got)), 3),
           "tensor_record_bytes": len(payloads[0])}
    log(f"tensor records through the broker: {out}")
    return out


# ------------------------------------------------------------------ whole pipeline


def _percentiles(values) -> dict:
    v = np.asarray(values, dtype=float) if len(values) else np.zeros(1)
    return {f"p{q}_ms": round(float(np.percentile(v, q)), 1) for q in (50, 95, 99)}


def _measure_run(stack, events, rate=None, timeout_s=600.0) -> dict:
    from prodcat.stack import items_per_s, publish, wait_for_outcomes

    ids = [k for k, _ in events]
    start = publish(stack.settings, events, rate_per_s=rate, producer=stack.publisher)
    results = wait_for_outcomes(stack, ids, timeout_s=timeout_s)
    latencies = [r["timings"]["event_to_result_ms"] for r in results.values()]
    return {"items": len(events), "results": len(results), "lost": len(events) - len(results),
            "items_per_s": items_per_s(results, start), **_percentiles(latencies)}, latencies


INFERENCE_STAGES = ("infer", "flush", "sink", "commit")


def inference_stage_sums(worker) -> dict:
    """The inference worker's running totals: seconds per stage, batches, items (its Prometheus histograms)."""
    sums = {stage: worker.metric("prodcat_stage_seconds_sum", stage=stage) for stage in INFERENCE_STAGES}
    return {**sums, "batches": worker.metric("prodcat_batch_size_count"), "items": worker.metric("prodcat_batch_size_sum")}


def per_batch(before: dict, after: dict) -> dict:
    """Mean ms per batch in each stage and the mean batch size between two `inference_stage_sums` readings —
    where the inference worker's time goes (on a GPU machine its loop, not the GPU, can be the ceiling)."""
    batches = max(1.0, after["batches"] - before["batches"])
    return {"mean_batch": round((after["items"] - before["items"]) / batches, 1),
            **{f"{stage}_ms": round(1000 * (after[stage] - before[stage]) / batches, 2) for stage in INFERENCE_STAGES}}


def bench_e2e(model_dir: str, inputs, n: int, k: int, threads: int, max_batch: int, max_delay_ms: float, providers: str,
              precision: str, repeats: int = 3, host_probe=None) -> dict:
    """Full load `repeats` times in one stack (the median run counts: single runs here swing ±8 %), then paced.
    `host_probe()` (stage loops, run in this process while the stack idles) before the first run and after each:
    `derive` sets each run against the bound of the loops on either side of it."""
    from prodcat.stack import LocalStack

    with LocalStack() as stack:
        stack.create_topics()
        workers = [stack.start_worker("preprocess", model_dir, wait_ready=False) for _ in range(k)]
        workers.append(stack.start_worker("inference", model_dir, wait_ready=False, max_batch=max_batch,
                                          max_delay_ms=max_delay_ms, intra_op_threads=threads, providers=providers,
                                          precision=precision))
        stack.wait_ready(workers, timeout_s=120)
        _measure_run(stack, events_for(inputs, 50, "warm"))  # JIT paths, page cache, group settled
        pids = {"broker": [stack.broker.pid], "redis": [stack.redis_proc.pid] if stack.redis_proc else [],
                "bench harness (publisher + outcome polling)": [os.getpid()]}
        groups = [f"{w.kind} workers" for w in workers]  # the key each worker's CPU is reported under
        for w, key in zip(workers, groups):
            pids.setdefault(key, []).append(w.proc.pid)
        runs, full_lat, cpu = [], [], dict.fromkeys(pids, 0.0)
        by_thread = {key: dict.fromkeys(THREAD_ROLES, 0.0) for key in groups}  # where in each worker
        stages0 = inference_stage_sums(workers[-1])
        probes = [host_probe()] if host_probe else []
        for r in range(repeats):
            cpu0 = {k: cpu_seconds(*v) for k, v in pids.items()}
            threads0 = [thread_cpu_seconds(w.proc.pid) for w in workers]
            run, lat = _measure_run(stack, events_for(inputs, n, f"full{r}-"))
            for key, v in pids.items():
                cpu[key] += cpu_seconds(*v) - cpu0[key]
            for w, key, before in zip(workers, groups, threads0):
                for role, seconds in thread_cpu_seconds(w.proc.pid).items():
                    by_thread[key][role] += seconds - before[role]
            runs.append(run)
            full_lat += lat
            log(f"end to end, full load, run {r + 1}/{repeats}: {run}")
            time.sleep(2)  # let the broker and workers settle after the burst
            if host_probe:
                probes.append(host_probe())
        rates = [x["items_per_s"] for x in runs]
        stages = per_batch(stages0, inference_stage_sums(workers[-1]))
        cost = {key: round(1000 * v / (n * repeats), 3) for key, v in cpu.items()}
        full = {"items": n * repeats, "results": sum(x["results"] for x in runs), "lost": sum(x["lost"] for x in runs),
                "items_per_s": float(np.median(rates)), "items_per_s_runs": rates, **_percentiles(full_lat),
                "core_ms_per_item": {**cost, "total": round(sum(cost.values()), 3)},
                "core_ms_per_item_by_thread": {kind: {role: round(1000 * v / (n * repeats), 3) for role, v in roles.items()}
                                               for kind, roles in by_thread.items()},
                "inference_per_batch": stages, **({"host_probes": probes} if probes else {})}
        rate = full["items_per_s"] * 0.5
        half, half_lat = _measure_run(stack, events_for(inputs, max(200, int(rate * 20)), "half"), rate=rate)
        log(f"end to end, paced at {rate:.0f}/s: {half}")
    return {"e2e_full": full, "e2e_half": {**half, "offered_per_s": round(rate, 1)},
            "latencies_ms": {"full load": full_lat, "50 % load": half_lat}}


def bench_naive(model_dir: str, inputs, n: int, precision: str, repeats: int = 1, providers: str = "auto") -> dict:
    """The service without the Kafka split, as a first version would be written: one process, one event at a
    time — consume, full-resolution decode, batch-1 inference (ONNX Runtime's own default options: a thread per
    core that spins between ops, not the workers' tuning), Redis write. `repeats` runs of n events in one stack;
    the median of the runs counts, as end to end's does (single runs swing ±5 %)."""
    import onnxruntime as ort

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from prodcat.stack import LocalStack, publish

    # ORT's defaults spin between ops: +7 % over the workers' no-spin pool alone on the machine (4 interleaved pairs)
    # the pipeline's providers: on a GPU machine a first version would run its batch-1 inference there too
    clf = Classifier(model_dir, providers, intra_op_threads=0, precision=precision, session_options=ort.SessionOptions())
    runs = []
    with LocalStack() as stack:
        stack.create_topics({"topic_raw": 1})
        r = stack.redis()
        consumer = Consumer({"bootstrap.servers": stack.settings.bootstrap_servers, "group.id": "naive", "enable.auto.commit": False})
        consumer.assign([TopicPartition(stack.settings.topic_raw, 0, OFFSET_BEGINNING)])
        procs = [os.getpid(), stack.broker.pid] + ([stack.redis_proc.pid] if stack.redis_proc else [])
        repeats = max(1, repeats)
        for run in range(repeats):
            publish(stack.settings, events_for(inputs, n, f"naive{run}-"))
            runs.append(_naive_run(clf, consumer, r, n, procs))
            log(f"naive, run {run + 1}/{repeats}: {runs[-1]}")
        consumer.close()
    rates = [x["naive_items_per_s"] for x in runs]
    median = float(np.median(rates))  # as end to end's: with an even count, the mean of the middle two
    nearest = min(runs, key=lambda x: abs(x["naive_items_per_s"] - median))  # its CPU figures go with it
    return {**nearest, "naive_items_per_s": round(median, 1), "naive_items_per_s_runs": rates, "naive_provider": clf.provider}


def _naive_run(clf: Classifier, consumer, r, n: int, procs: list[int]) -> dict:
    from PIL import Image

    from common.images import fetch_image

    cpu0 = cpu_seconds(*procs)
    done, start = 0, time.perf_counter()
    while done < n:
        msg = consumer.poll(5.0)
        if msg is None:
            break
        event = schemas.decode_event(msg.value())
        with Image.open(io.BytesIO(fetch_image(event.image_url, FetchPolicy()))) as im:
            image = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR))
        probs = clf.run([clf.tokenizer.encode(event.name)], [image])
        pred = clf.predictions(probs)[0]
        r.hset(f"naive:{event.product_id}", mapping={"category": pred.category, "confidence": pred.confidence})
        done += 1
    elapsed = time.perf_counter() - start
    core_s = cpu_seconds(*procs) - cpu0  # how much of the machine the one loop can use
    return {"naive_items_per_s": round(done / elapsed, 1), "naive_items": done,
            "naive_core_ms_per_item": round(1000 * core_s / max(1, done), 3), "naive_cores_busy": round(core_s / elapsed, 2)}


def bench_scaling(model_dir: str, inputs, n: int) -> dict:
    """Preprocess workers alone through the broker, 1 then 2 replicas: events/s while the middle 80 % of the events
    come out (a 2,000-event run lasts ~2 s, and the first fetch and the last batch's flush would weigh on it), and
    how many cores the workers, the broker and the publisher kept busy meanwhile (a second replica scales only
    into idle cores)."""
    from prodcat.stack import LocalStack, publish

    out, busy = {}, {}
    for k in (1, 2):
        with LocalStack() as stack:
            stack.create_topics()
            workers = [stack.start_worker("preprocess", model_dir, wait_ready=False) for _ in range(k)]
            stack.wait_ready(workers, timeout_s=120)
            pids = [stack.broker.pid, os.getpid(), *(w.proc.pid for w in workers)]
            publish(stack.settings, events_for(inputs, n, f"s{k}-"))
            seen = []  # (time, events out so far, CPU seconds so far)
            while not seen or seen[-1][1] < n:
                seen.append((time.time(), sum(w.metric("prodcat_events_out_total") for w in workers), cpu_seconds(*pids)))
                time.sleep(0.05)  # each look scrapes every worker's /metrics: not so often that it costs them CPU
            (t10, n10, cpu10), (t90, n90, cpu90) = (next(x for x in seen if x[1] >= q * n) for q in (0.1, 0.9))
            window = max(t90 - t10, 1e-3)
            out[k], busy[k] = round((n90 - n10) / window, 1), round((cpu90 - cpu10) / window, 2)
        log(f"preprocess through the broker, {k} replica(s): {out[k]} items/s (middle 80 %), {busy[k]} cores busy")
    return {"preprocess_replicas_items_per_s": out, "preprocess_replicas_cores_busy": busy,
            "preprocess_scaling_1_to_2": round(out[2] / out[1], 2)}


# ------------------------------------------------------------------ report


SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")  # what ONNX Runtime's int8 kernels can use


def cpu_info() -> dict:
    """CPU model and SIMD flags: the same code and packages run at other speeds (and train other digests) on other CPUs."""
    info = {"cpu_model": platform.processor(), "cpu_flags": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            first_cpu = f.read().split("\n\n")[0].splitlines()
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name") or info["cpu_model"], "cpu_flags": [f for f in SIMD_FLAGS if f in flags]}


def machine_info() -> dict:
    import confluent_kafka
    import onnxruntime

    return {"cpu_count": os.cpu_count(), **cpu_info(), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "librdkafka": confluent_kafka.libversion()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def stage_bound(cores: int, preprocess_per_s: float, broker_ms: float, inference_core_s: float) -> float:
    """cores ÷ the core-seconds one item costs in each stage measured alone: the cores can do no better."""
    return round(cores / (1 / preprocess_per_s + broker_ms / 1000 + inference_core_s), 1)


def derive(fig: dict) -> dict:
    """Ratios: the pipeline against the bound its own stage rates set for these cores, and against naive."""
    out = {}
    cores = fig["machine"]["cpu_count"]
    broker_ms = fig.get("broker_core_ms_per_record", 0.0)
    if "preprocess_items_per_s_per_core" in fig and "inference_items_per_s_best" in fig:
        # inference at its cheapest measured way: as the worker runs it (configured threads, best batch) or 1 thread
        infer_s = fig["inference_threads"] / fig["inference_items_per_s_best"]
        if "inference_items_per_s_per_core" in fig:
            infer_s = min(infer_s, 1 / fig["inference_items_per_s_per_core"])
        out["bound_items_per_s"] = stage_bound(cores, fig["preprocess_items_per_s_per_core"], broker_ms, infer_s)
    full = fig.get("e2e_full") or {}
    probes = full.get("host_probes") or []
    if len(probes) > 1:
        # each full-load run against the bound of the stage loops just before and just after it, the faster of the
        # two: this shared host's speed drifts by up to 15 % within one bench, so a run compared with stages measured
        # minutes earlier measures the drift as much as the pipeline
        pre, inf = "preprocess_items_per_s_per_core", "inference_items_per_s_per_core"
        out["bound_items_per_s_runs"] = [stage_bound(cores, max(a[pre], b[pre]), broker_ms, 1 / max(a[inf], b[inf]))
                                         for a, b in zip(probes, probes[1:])]
        out["pipeline_efficiency_runs"] = [round(rate / bound, 3) for rate, bound in
                                           zip(full["items_per_s_runs"], out["bound_items_per_s_runs"])]
        # below 1: the host ran slower after the last run than before the first
        out["host_drift"] = round(probes[-1][inf] / probes[0][inf], 3)
    if full:
        out["e2e_items_per_s"] = full["items_per_s"]
        out["p99_ms_half_load"] = fig["e2e_half"]["p99_ms"]
        out["lost"] = full["lost"] + fig["e2e_half"]["lost"]
        if "bound_items_per_s" in out:
            out["pipeline_efficiency_unpaired"] = round(out["e2e_items_per_s"] / out["bound_items_per_s"], 3)
        if "pipeline_efficiency_runs" in out:  # the median run against its own bound; without loops, the unpaired ratio
            out["pipeline_efficiency"] = round(float(np.median(out["pipeline_efficiency_runs"])), 3)
        elif "pipeline_efficiency_unpaired" in out:
            out["pipeline_efficiency"] = out["pipeline_efficiency_unpaired"]
        if "naive_items_per_s" in fig:
            out["speedup_vs_naive"] = round(out["e2e_items_per_s"] / fig["naive_items_per_s"], 2)
    return out


def plots(fig: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "inference_items_per_s" in fig:
        b = sorted(int(x) for x in fig["inference_items_per_s"])
        plt.figure(figsize=(5, 3.5))
        plt.plot(b, [fig["inference_items_per_s"][k] for k in b], "o-")
        plt.xscale("log", base=2)
        plt.xlabel("batch size")
        plt.ylabel("items/s")
        plt.title(f"inference, {fig['inference_provider']} × {fig['inference_threads']} threads")
        plt.grid(alpha=0.3)
        files.append(os.path.join(out_dir, "throughput_vs_batch.png"))
        plt.tight_layout()
        plt.savefig(files[-1], dpi=110)
        plt.close()
    if "latencies_ms" in fig:
        plt.figure(figsize=(5, 3.5))
        for label, lat in fig["latencies_ms"].items():
            plt.hist(lat, bins=50, alpha=0.6, label=label)
        plt.xlabel("event → result (ms)")
        plt.ylabel("items")
        plt.legend()
        files.append(os.path.join(out_dir, "latency_distribution.png"))
        plt.tight_layout()
        plt.savefig(files[-1], dpi=110)
        plt.close()
    return files


SUMMARY_KEYS = ("preprocess_items_per_s_per_core", "inference_items_per_s_best", "best_batch", "e2e_items_per_s",
                "pipeline_efficiency", "pipeline_efficiency_unpaired", "naive_items_per_s", "speedup_vs_naive", "p99_ms_half_load",
                "lost", "host_drift")


def markdown(fig: dict) -> str:
    cost = (fig.get("e2e_full") or {}).get("core_ms_per_item", {})  # CPU each process spent, per item
    stages = (fig.get("e2e_full") or {}).get("inference_per_batch", {})  # mean batch, ms per batch in each stage
    probes = (fig.get("e2e_full") or {}).get("host_probes", [])
    machine = fig.get("machine", {})
    cpu = f"{machine['cpu_count']} × {machine['cpu_model']} ({', '.join(machine.get('cpu_flags', []))})" if machine.get("cpu_model") else None
    rows = [("machine: cores × CPU (SIMD)", cpu, ""),
            ("preprocess, 1 core (800×800 JPEG → record)", fig.get("preprocess_items_per_s_per_core"), "items/s"),
            ("preprocess, 1 core, photos from an HTTP/1.1 image host (another process)", fig.get("preprocess_http_items_per_s_per_core"), "items/s"),
            ("decode + resize alone, 1 core", fig.get("decode_resize_per_s"), "images/s"),
            ("tokenize Latin names / Korean titles", f"{fig.get('tokenize_latin_per_s')} / {fig.get('tokenize_korean_per_s')}", "names/s"),
            *[(f"inference batch {b} ({fig.get('inference_provider')} {fig.get('inference_precision')}, {fig.get('inference_threads')} thr)",
               v, "items/s") for b, v in fig.get("inference_items_per_s", {}).items()],
            (f"inference, fp32 graph, batch {fig.get('best_batch')}", fig.get("inference_fp32_items_per_s_at_best_batch"), "items/s"),
            (f"inference, fp16 copy, best batch {fig.get('fp16_best_batch')}", fig.get("fp16_items_per_s_best"), "items/s"),
            ("fp16 copy: top-1 agreement with fp32 / max prob difference / items", None if "fp16_top1_agreement" not in fig else
             f"{fig['fp16_top1_agreement']} / {fig['fp16_max_abs_prob_diff']} / {fig['fp16_checked_items']}", ""),
            ("inference per core (best batch, 1 thread), fastest run", fig.get("inference_items_per_s_per_core"), "items/s"),
            ("inference per core, each run", fig.get("inference_items_per_s_per_core_runs"), "items/s"),
            ("tensor records through broker: produce / consume", f"{fig.get('broker_tensor_produce_per_s')} / {fig.get('broker_tensor_consume_per_s')}", "records/s"),
            ("broker + client CPU per tensor record (produce + consume), cheapest run", fig.get("broker_core_ms_per_record"), "core-ms"),
            ("broker + client CPU per tensor record, each run", fig.get("broker_core_ms_per_record_runs"), "core-ms"),
            ("preprocess via broker, 1 → 2 replicas (middle 80 % of the events)", fig.get("preprocess_replicas_items_per_s"), "items/s"),
            ("preprocess via broker, cores busy (workers + broker + publisher), 1 → 2 replicas", fig.get("preprocess_replicas_cores_busy"), ""),
            ("bound: cores ÷ Σ stage core-seconds per item (preprocess + cheapest inference + broker)", fig.get("bound_items_per_s"), "items/s"),
            ("**end to end, full load** (median run)", fig.get("e2e_items_per_s"), "items/s"),
            ("end to end, full load, each run", (fig.get("e2e_full") or {}).get("items_per_s_runs"), "items/s"),
            ("end to end latency at full load p50 / p95 / p99", _lat(fig.get("e2e_full")), "ms"),
            ("end to end latency at 50 % load p50 / p95 / p99", _lat(fig.get("e2e_half")), "ms"),
            (f"naive single process (median of the runs, {fig.get('naive_provider', 'CPU')})", fig.get("naive_items_per_s"), "items/s"),
            ("naive single process, each run", fig.get("naive_items_per_s_runs"), "items/s"),
            ("naive: core-ms per item / cores kept busy", f"{fig.get('naive_core_ms_per_item')} / {fig.get('naive_cores_busy')}", ""),
            ("stage loops around the full-load runs, before run 1 and after each: preprocess 1 core / inference 1 thread",
             " → ".join(f"{p['preprocess_items_per_s_per_core']} / {p['inference_items_per_s_per_core']}" for p in probes), "items/s"),
            ("bound of each full-load run (the faster loops on either side of it)", fig.get("bound_items_per_s_runs"), "items/s"),
            ("pipeline efficiency of each run (its items/s ÷ its bound)", fig.get("pipeline_efficiency_runs"), ""),
            ("host drift (1-thread inference after the last run ÷ before the first)", fig.get("host_drift"), ""),
            ("**pipeline efficiency**" + (" (median run ÷ its own bound)" if probes else " (e2e ÷ bound)"), fig.get("pipeline_efficiency"), ""),
            ("pipeline efficiency against the bound measured first (e2e ÷ bound)", fig.get("pipeline_efficiency_unpaired") if probes else None, ""),
            ("end to end, core-ms per item: " + " / ".join(cost), " / ".join(str(v) for v in cost.values()), "core-ms"),
            *[(f"end to end, {kind}' threads, core-ms per item: " + " / ".join(roles), " / ".join(str(v) for v in roles.values()),
               "core-ms") for kind, roles in (fig.get("e2e_full") or {}).get("core_ms_per_item_by_thread", {}).items()],
            ("end to end, inference worker per batch: " + " / ".join(stages), " / ".join(str(v) for v in stages.values()), "items, ms"),
            ("speed-up over naive", fig.get("speedup_vs_naive"), "×"),
            ("lost during the benchmark", fig.get("lost"), "items")]
    lines = ["| figure | value | unit |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {unit} |" for name, value, unit in rows if value not in (None, "None / None", "")]
    return "\n".join(lines) + "\n"


def _lat(run: dict | None):
    return None if not run else f"{run['p50_ms']} / {run['p95_ms']} / {run['p99_ms']}"


def one_thread_rate(args: argparse.Namespace, fig: dict, records) -> float:
    """Inference on one thread at the best batch, one short loop: items/s."""
    return bench_inference(args.model, args.providers, 1, [fig["best_batch"]], records, args.seconds / 2,
                           args.precision)["inference_items_per_s_best"]


def one_thread_inference(args: argparse.Namespace, fig: dict, records) -> tuple[float, list[float]]:
    """Inference on one thread at the best batch: (the fastest of --repeats short loops, every loop)."""
    return cheapest_run(args.repeats, lambda: one_thread_rate(args, fig, records), lambda rate: 1 / rate)


def run(args: argparse.Namespace) -> int:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        print(f"prodcat bench: unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    try:
        manifest = Manifest.load(args.model)
    except ModelError as e:
        print(f"prodcat bench: {e} (build one with `prodcat train` or run `prodcat demo` first)", file=sys.stderr)
        return 2
    try:
        choose_providers(args.providers)  # a typo fails here, not minutes in at the first stage that loads the model
    except ModelError as e:
        print(f"prodcat bench: {e}", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.join(args.data_dir, "myntra")):
        print(f"prodcat bench: {args.data_dir}/myntra not found", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    batches = args.batches
    tokenizer = Tokenizer(manifest.tokenizer)
    log(f"model {manifest.model_version}; generating/reading {args.photos} catalogue JPEGs (800×800, q90)")
    inputs = catalogue_inputs(args.data_dir, args.photos)
    fig: dict = {"machine": machine_info(), "model_version": manifest.model_version,
                 "settings": {k: v for k, v in vars(args).items() if k != "run"}}
    if "preprocess" in stages:
        fig.update(bench_preprocess(inputs, tokenizer, args.seconds))
        log(f"preprocess: {fig['preprocess_items_per_s_per_core']} items/s on one core ({fig['preprocess_http_items_per_s_per_core']} with photos over HTTP)")
    if "tokenize" in stages:
        fig.update(bench_tokenize(inputs, tokenizer, args.data_dir, args.seconds))
    records = preprocessed_records(inputs[:256], tokenizer) if {"inference", "broker"} & set(stages) else []
    if "inference" in stages:
        fig.update(bench_inference(args.model, args.providers, args.threads, batches, records, args.seconds, args.precision))
        # one thread, the fastest of --repeats short loops (single loops measured 172–244 items/s on the same code)
        fig["inference_items_per_s_per_core"], fig["inference_items_per_s_per_core_runs"] = one_thread_inference(args, fig, records)
        if fig["inference_precision"] == "int8":  # what quantization buys: the fp32 graph at the same batch
            fp32 = bench_inference(args.model, args.providers, args.threads, [fig["best_batch"]], records, args.seconds / 2, "fp32")
            fig["inference_fp32_items_per_s_at_best_batch"] = fp32["inference_items_per_s_best"]
        if args.fp16:
            fig.update(bench_fp16(args.model, args.providers, args.threads, batches, records, args.seconds))
    if "broker" in stages:
        fig.update(bench_broker(records, args.seconds, args.repeats))
    if "scaling" in stages:
        fig.update(bench_scaling(args.model, inputs, args.items))
    if "e2e" in stages:
        probe = None
        if {"preprocess", "inference"} <= set(stages):
            def probe() -> dict:
                """The bound's two largest terms again, one short loop each: the host's speed at this moment."""
                return {"preprocess_items_per_s_per_core": preprocess_rate(inputs, tokenizer, args.seconds / 2),
                        "inference_items_per_s_per_core": one_thread_rate(args, fig, records)}
        fig.update(bench_e2e(args.model, inputs, args.items, args.preprocess_workers, args.threads, args.max_batch,
                             args.max_delay_ms, args.providers, args.precision, args.repeats, probe))
    if "naive" in stages:  # the same graph as the pipeline: the speed-up is the architecture's, not the model's
        fig.update(bench_naive(args.model, inputs, args.items, args.precision, args.repeats, args.providers))  # as many as end to end: short runs were noisy
    fig.update(derive(fig))
    fig["plots"] = plots(fig, args.out)  # needs the latencies, which are too long for bench.json
    latencies = fig.pop("latencies_ms", None)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(fig, f, indent=2)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(markdown(fig))
    print(markdown(fig))
    if latencies is not None:
        np.savez_compressed(os.path.join(args.out, "latencies.npz"), **{k.replace(" ", "_"): v for k, v in latencies.items()})
    if args.json:
        print(json.dumps({k: fig.get(k) for k in SUMMARY_KEYS}))
    return 0
