"""The served model, and its hot reload: a new version is loaded and warmed up beside the old one and
swapped in between batches (never mid-batch); a broken one is rejected and the old one keeps serving."""
from __future__ import annotations

import logging
import os
import time

from common import metrics
from common.model import MANIFEST, ONNX_FILE, Classifier, ModelError
from common.settings import Settings

log = logging.getLogger(__name__)


def _signature(model_dir: str) -> tuple:
    """Changes whenever either file is replaced or rewritten."""
    sig = []
    for name in (MANIFEST, ONNX_FILE):
        try:
            st = os.stat(os.path.join(model_dir, name))
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append(None)
    return tuple(sig)


class ModelHolder:
    def __init__(self, settings: Settings, worker: str):
        self.settings = settings
        self.worker = worker
        self._signature = _signature(settings.model_dir)
        self.current = self._load()  # at start-up a broken model is fatal: there is nothing to serve
        self._publish(self.current)
        self._next_check = time.monotonic() + settings.model_reload_s

    def _load(self) -> Classifier:
        clf = Classifier(self.settings.model_dir, self.settings.providers, self.settings.intra_op_threads)
        clf.warm_up()
        return clf

    def _publish(self, clf: Classifier) -> None:
        metrics.MODEL_INFO.clear()
        metrics.MODEL_INFO.labels(self.worker, clf.version, clf.provider).set(1)
        log.info("serving model %s (%s) on %s", clf.version, self.settings.model_dir, clf.providers)

    def maybe_reload(self) -> bool:
        """Called between batches; True when a new model was swapped in."""
        if time.monotonic() < self._next_check:
            return False
        self._next_check = time.monotonic() + self.settings.model_reload_s
        sig = _signature(self.settings.model_dir)
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            candidate = self._load()
        except (ModelError, OSError) as e:
            metrics.MODEL_RELOADS.labels(self.worker, "rejected").inc()
            log.error("new model rejected, still serving %s: %s", self.current.version, e)
            return False
        self.current = candidate
        metrics.MODEL_RELOADS.labels(self.worker, "loaded").inc()
        self._publish(candidate)
        return True
