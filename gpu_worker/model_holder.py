"""The served model, and its hot reload: a new version is loaded and warmed up beside the old one, in a
background thread while the old one keeps serving (on a GPU the warm-up prepares every batch size: 9 s on an
H200), and swapped in between batches (never mid-batch); a broken one is rejected and the old one keeps serving.

Vocabulary changes: tensor records carry the fingerprint of the vocabulary that tokenized them. When a
reload changes it, the replaced model is kept as `previous`, so records preprocessed before the preprocess
workers picked up the new vocabulary are still read by the model that knows their token ids. A record of a
vocabulary neither model knows triggers an immediate look at the model directory (the preprocess workers
may have seen the new version first); if still unknown, the caller dead-letters it.

Deploy a new version by swapping the model directory atomically (a symlink, as Kubernetes volumes do):
common.model.DirWatch sees both files change at once.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from common import metrics
from common.model import Classifier, DirWatch, ModelError, batch_buckets
from common.settings import Settings

log = logging.getLogger(__name__)


class ModelHolder:
    def __init__(self, settings: Settings, worker: str):
        self.settings = settings
        self.worker = worker
        self.watch = DirWatch(settings.model_dir, settings.model_reload_s)
        self.current = self._load()  # at start-up a broken model is fatal: there is nothing to serve
        self.previous: Classifier | None = None  # the model replaced by one with another vocabulary
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        self._loading: Future | None = None  # a new version being loaded and warmed up
        self._publish(self.current)

    def _load(self) -> Classifier:
        clf = Classifier(self.settings.model_dir, self.settings.providers, self.settings.intra_op_threads,
                         precision=self.settings.precision, cuda_options=self.settings.cuda_options,
                         batch_buckets=batch_buckets(self.settings.max_batch))
        started = time.monotonic()
        clf.warm_up()
        if clf.buckets:
            log.info("prepared batch sizes %s on %s in %.1f s", list(clf.buckets), clf.provider, time.monotonic() - started)
        return clf

    def _publish(self, clf: Classifier) -> None:
        metrics.MODEL_INFO.clear()
        metrics.MODEL_INFO.labels(self.worker, clf.version, clf.provider, clf.precision).set(1)
        log.info("serving model %s (%s, %s) on %s, vocabulary %08x", clf.version, self.settings.model_dir, clf.precision,
                 clf.providers, clf.tokenizer.config.fingerprint)

    def maybe_reload(self, force: bool = False) -> bool:
        """Called between batches (or forced by an unknown vocabulary); True when a new model was swapped in.
        A changed directory starts a load in the background; the first call after it is ready swaps it in.
        Forced, the call waits for it: the record in hand needs the new vocabulary now."""
        if self._loading is None and self.watch.changed(force):
            self._loading = self._loader.submit(self._load)
        if self._loading is None or not (force or self._loading.done()):
            return False
        loading, self._loading = self._loading, None
        try:
            candidate = loading.result()
        except (ModelError, OSError) as e:
            metrics.MODEL_RELOADS.labels(self.worker, "rejected").inc()
            log.error("new model rejected, still serving %s: %s", self.current.version, e)
            return False
        if not self.watch.still_same():
            log.warning("model directory changed while loading %s; loading it again", candidate.version)
            return False
        if candidate.tokenizer.config.fingerprint != self.current.tokenizer.config.fingerprint:
            self.previous = self.current
        self.current = candidate
        metrics.MODEL_RELOADS.labels(self.worker, "loaded").inc()
        self._publish(candidate)
        return True

    def for_vocabulary(self, fingerprint: int) -> Classifier | None:
        """The model that reads token ids of this vocabulary, or None."""
        for attempt in range(2):
            if fingerprint == self.current.tokenizer.config.fingerprint:
                return self.current
            if self.previous is not None and fingerprint == self.previous.tokenizer.config.fingerprint:
                metrics.TOKENIZER_MISMATCHES.labels(self.worker, "previous_model").inc()
                return self.previous
            if attempt == 0 and not self.maybe_reload(force=True):
                break
        metrics.TOKENIZER_MISMATCHES.labels(self.worker, "dead_letter").inc()
        return None
