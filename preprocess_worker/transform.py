"""Event → tensor record: the whole preprocessing of one product, shared by the worker and `prodcat predict`."""
from __future__ import annotations

import time

import numpy as np

from common import metrics
from common.images import FetchPolicy, decode_resize, fetch_image, image_bytes_from_b64
from common.schemas import ProductEvent, TensorRecord
from common.tokenize import Tokenizer


def load_image(event: ProductEvent, policy: FetchPolicy, worker: str = "preprocess") -> np.ndarray | None:
    if event.image_b64:
        return decode_resize(image_bytes_from_b64(event.image_b64, policy), policy)
    if event.image_url:
        def retried() -> None:  # an image host's passing trouble, tried again; rare, so the label is looked up then
            metrics.RETRIES.labels(worker, "image_fetch").inc()

        return decode_resize(fetch_image(event.image_url, policy, retried), policy)
    return None


def preprocess(event: ProductEvent, tokenizer: Tokenizer, policy: FetchPolicy, event_time: float,
               source_partition: int = -1, source_offset: int = -1, worker: str = "preprocess") -> TensorRecord:
    """Raises ProcessingError (→ dead letter) for anything wrong with the event itself."""
    t0 = time.perf_counter()
    token_ids = tokenizer.encode(event.name)
    t1 = time.perf_counter()
    image = load_image(event, policy, worker)
    t2 = time.perf_counter()
    metrics.STAGE_SECONDS.labels(worker, "tokenize").observe(t1 - t0)
    metrics.STAGE_SECONDS.labels(worker, "image").observe(t2 - t1)
    return TensorRecord(event.product_id, token_ids, image, event_time, time.time(), source_partition, source_offset,
                        tokenizer.config.fingerprint)
