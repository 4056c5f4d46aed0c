"""Model directory (model.onnx + manifest.json) and the inference contract shared by the inference
worker, `prodcat predict` and the benchmark: load once, run a batch, one result (or error) per item.

ONNX graph contract (manifest "inputs"/"outputs" repeat it):
  inputs   token_ids      int64  [B, max_tokens]   0 = padding (the graph derives the mask)
           image          uint8  [B, 224, 224, 3]  RGB; normalisation happens inside the graph
           image_present  float32 [B]              1 = real photo, 0 = no photo (image is zeros)
  outputs  probs          float32 [B, n_labels]    calibrated class probabilities (leaf level)
           embedding      float32 [B, D]           L2-normalised product embedding
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from common import openvino_session, runtime
from common.images import IMAGE_SHAPE
from common.settings import key_values
from common.tokenize import Tokenizer, TokenizerConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # optional: the image tower's convolutions in int8, written only if validation held
PRECISIONS = ("auto", "fp32", "int8")  # auto = int8 where it exists and the session runs on CPU, else fp32
# On CPU a batch runs as several runs spread over the lanes: with ORT one item per run, its cheapest per item
# (int8 graph, one lane: 480 / 467 / 460 images/s in runs of 1 / 2 / 4; 393 at 8, 343 at 16: larger runs spill
# activations out of cache), with OpenVINO a few (openvino_session.RUN_ITEMS) — so the worker's batch (one
# checkpoint) can be large.
MANIFEST_FORMAT = "prodcat-model/1"


class ModelError(Exception):
    """The model directory is missing, incomplete or broken; callers keep the model they had."""


@dataclass(frozen=True)
class Manifest:
    model_version: str
    labels: tuple[str, ...]
    parents: dict  # leaf → [parent, grandparent, ...] (leaf excluded), may be empty
    levels: tuple[str, ...]  # names of the taxonomy levels, root first
    tokenizer: TokenizerConfig
    threshold: float  # confidence below this → "uncertain"
    stand_in: bool  # True for test/benchmark models that were not trained on data
    int8_file: str | None  # INT8_FILE when training kept an int8 graph
    raw: dict

    @classmethod
    def load(cls, model_dir: str) -> "Manifest":
        path = os.path.join(model_dir, MANIFEST)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read {path}: {e}") from None
        if raw.get("format") != MANIFEST_FORMAT:
            raise ModelError(f"{path}: format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        try:
            manifest = cls(
                model_version=str(raw["model_version"]),
                labels=tuple(raw["labels"]),
                parents=dict(raw.get("hierarchy", {}).get("parents", {})),
                levels=tuple(raw.get("hierarchy", {}).get("levels", ())),
                tokenizer=TokenizerConfig.from_manifest(raw["tokenizer"]),
                threshold=float(raw.get("threshold", 0.0)),
                stand_in=raw.get("stand_in", False),
                int8_file=INT8_FILE if (raw.get("int8") or {}).get("file") == INT8_FILE
                and os.path.exists(os.path.join(model_dir, INT8_FILE)) else None,
                raw=raw,
            )
            manifest._check()
            return manifest
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"{path}: invalid manifest ({type(e).__name__}: {e})") from None

    def _check(self) -> None:
        """What load would accept and serving would get wrong, quietly: a category that is not a string, two
        classes of one name, a threshold in percent (every item "uncertain") or NaN (none), a path made of letters."""
        if not self.labels or not all(isinstance(label, str) and label for label in self.labels):
            raise ValueError("labels: expected a non-empty list of non-empty strings")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: duplicate categories")
        if not 0.0 <= self.threshold <= 1.0:  # NaN fails this too
            raise ValueError(f"threshold {self.threshold}: expected a probability in [0, 1]")
        if not all(isinstance(x, str) for x in self.levels):
            raise ValueError("hierarchy.levels: expected a list of strings")
        if not all(isinstance(path, list) and all(isinstance(x, str) for x in path) for path in self.parents.values()):
            raise ValueError("hierarchy.parents: expected leaf → list of parent names")
        if not isinstance(self.stand_in, bool):
            raise ValueError(f"stand_in {self.stand_in!r}: expected true or false")

    def sha256_of(self, filename: str) -> str | None:
        """The digest training recorded for one of the graph files (older manifests: the fp32 graph's only)."""
        section = self.raw.get("onnx" if filename == ONNX_FILE else "int8") or {}
        return section.get("sha256") if section.get("file") == filename else None

    def verify(self, model_dir: str, filename: str) -> None:
        """ModelError when the graph file is not the one this manifest describes: a copy still under way, or the
        files of two versions side by side — whose token ids and categories would disagree without an error."""
        expected = self.sha256_of(filename)
        if expected is None:
            return
        try:
            actual = file_sha256(os.path.join(model_dir, filename))
        except OSError as e:
            raise ModelError(f"cannot read {model_dir}/{filename}: {e}") from None
        if actual != expected:
            raise ModelError(f"{model_dir}/{filename} is not the graph its manifest describes (sha256 {actual[:12]}…, "
                             f"manifest {expected[:12]}…): a partial copy, or files of two versions")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal_graph(model_dir: str) -> str:
    """Record model.onnx's digest in the manifest beside it, as export does, for a graph rewritten after export
    (the bench's fp16 copy, tests' edited graphs): `Manifest.verify` then accepts it."""
    path = os.path.join(model_dir, MANIFEST)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest.setdefault("onnx", {}).update(file=ONNX_FILE, sha256=file_sha256(os.path.join(model_dir, ONNX_FILE)))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False)
    return model_dir


def _session_options(intra_op_threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # explicit pools: several worker processes × ORT's default (one thread per core) oversubscribe
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # idle pool threads would busy-wait between batches, taking the core from the preprocess workers and broker
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # an absent CUDA library is reported by get_providers(), not by log spam
    return opts


CPU_PROVIDERS = ("CPUExecutionProvider", openvino_session.PROVIDER)  # int8 graphs, lanes, no shape buckets


def cpu_session(path: str, threads: int):
    """A CPU session with the serving options: training's parity and int8 checks, feature extraction, speed probes."""
    import onnxruntime as ort

    return ort.InferenceSession(path, sess_options=_session_options(threads), providers=["CPUExecutionProvider"])


_NO_IMAGE = np.zeros((1, *IMAGE_SHAPE), dtype=np.uint8)  # read-only input for items without a photo
_NO_IMAGE.flags.writeable = False


def _one_image(img) -> np.ndarray:
    """A [1, 224, 224, 3] input for one item: a view of its uint8 image (checked here, as a batch copy would)."""
    if img is None:
        return _NO_IMAGE
    img = np.asarray(img)
    if img.shape != IMAGE_SHAPE or img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 {IMAGE_SHAPE}, got {img.dtype} {img.shape}")
    return img[None]


LANE_THREAD_NAME = "prodcat-lane"  # the lanes' name, in Python (py-spy) and for the OS (top -H, perf, prodcat bench)


@functools.cache
def _lane_pool(lanes: int) -> ThreadPoolExecutor:
    """One pool per process and lane count, shared by every Classifier (a hot reload adds no threads)."""
    return ThreadPoolExecutor(lanes, thread_name_prefix=LANE_THREAD_NAME, initializer=runtime.name_this_thread,
                              initargs=(LANE_THREAD_NAME,))


def choose_providers(preference: str, int8: bool = False) -> list[str]:
    """`auto` → TensorRT, CUDA, OpenVINO (for an int8 graph), CPU (those installed); otherwise a comma list, CPU
    always last."""
    import onnxruntime as ort

    available = ort.get_available_providers() + ([openvino_session.PROVIDER] if openvino_session.available() else [])
    if preference == "auto":
        # OpenVINO's gain is the int8 convolutions; an fp32 graph ran faster on ORT's lanes (337–348 against
        # 270–285 items/s, 2 lanes, the myntra graph on the AMX Xeon)
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *([openvino_session.PROVIDER] if int8 else []),
                  "CPUExecutionProvider"]
    else:  # any case, with or without the suffix: "cuda", "OpenVINO", "CPUExecutionProvider"
        wanted = [p.strip().lower().removesuffix("executionprovider") for p in preference.split(",") if p.strip()] + ["cpu"]
        # a name no runtime knows is a typo ("cdua"): refused, where one merely not installed here falls back to CPU
        # by design (one setting for CPU and GPU nodes; prodcat_model_info says which runs)
        known = {p.lower().removesuffix("executionprovider") for p in ort.get_all_providers()} | {"openvino"}
        typos = [p for p in wanted if p not in known]
        if typos:
            raise ModelError(f"unknown provider(s) {', '.join(map(repr, typos))}: 'auto' or a comma list of "
                             "tensorrt, cuda, openvino, cpu (any ONNX Runtime provider name)")
        by_name = {p.lower().removesuffix("executionprovider"): p for p in available}
        wanted = [by_name[p] for p in wanted if p in by_name]
    return list(dict.fromkeys(p for p in wanted if p in available))


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a GPU session runs: powers of two below max_batch, and max_batch — a handful of shapes
    to prepare once, and at most 2× padding for a batch just over a bucket (under full load batches are full)."""
    return tuple(sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch}))


def provider_options(pairs: tuple[str, ...]) -> dict[str, str]:
    """("KEY=VALUE", …) → {KEY: VALUE}; a pair without '=' is a ModelError, not a silent default."""
    try:
        return key_values(pairs, "a provider option")
    except ValueError as e:
        raise ModelError(str(e)) from None


@dataclass
class Prediction:
    category: str
    confidence: float
    top_k: list  # [{"category": str, "p": float}]
    uncertain: bool
    category_path: list  # leaf → root


class PendingRun:
    """One batch's runs, submitted to the lane pool. `result()`: probs in input order (re-raises a run's
    error); `seconds`: first run's start to last run's end — the batch's own inference time, not its wait
    behind the batch before."""

    def __init__(self, runs: list[Future], items: int | None = None):
        self._runs = runs
        self._items = items  # rows beyond it are bucket padding (GPU sessions)

    def done(self) -> bool:
        return all(r.done() for r in self._runs)

    def result(self) -> np.ndarray:
        return np.concatenate([r.result()[0] for r in self._runs])[: self._items]

    @property
    def seconds(self) -> float:
        spans = [r.result()[1:] for r in self._runs]
        return max(end for _, end in spans) - min(start for start, _ in spans)


class Classifier:
    """One session over a model directory: ONNX Runtime's, or OpenVINO's behind the same interface (on CPU,
    where installed: `auto` prefers it there for int8 graphs; a graph it cannot run falls back to ORT's CPU
    provider).

    precision: the int8 graph is ~2× faster on CPU (its accuracy was checked on validation when it was
    written); on CUDA/TensorRT fp32 (or fp16) graphs are the fast ones, so `auto` takes int8 only when the
    session really runs on CPU.

    intra_op_threads: ORT's intra-op pool on a GPU session; on CPU that many lanes: concurrent single-threaded
    runs over chunks of each batch — one item each with ORT, up to RUN_ITEMS with OpenVINO (0 = the runtime's
    own pool, one run per batch).

    session_options: ORT options instead of the serving ones (the bench's naive process: ORT's own defaults).
    An OpenVINO session takes its own defaults when intra_op_threads is 0 instead.

    cuda_options: "KEY=VALUE" options of the CUDA provider, passed through (ONNX Runtime's defaults otherwise).

    batch_buckets: on a GPU session each batch is padded up to the next of these sizes, and `warm_up` runs each
    once. The CUDA provider prepares every new input shape on its first run — cuDNN's algorithm search: 0.7–1.5 s
    per batch size on an H200 (0.1–0.6 s with HEURISTIC search) — so a dynamic batcher that ships 100-, 117-,
    125-item batches pays it again and again (1,094 → 826 items/s end to end, `infer` at 98 ms per ~125-item
    batch against 20 ms warm). On CPU there is no such cost and padding would be wasted work: ignored there."""

    def __init__(self, model_dir: str, providers: str = "auto", intra_op_threads: int = 1, top_k: int = 3,
                 precision: str = "auto", session_options=None, cuda_options: tuple[str, ...] = (),
                 batch_buckets: tuple[int, ...] = ()):
        if precision not in PRECISIONS:
            raise ModelError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.model_dir = model_dir
        self.manifest = Manifest.load(model_dir)
        self.tokenizer = Tokenizer(self.manifest.tokenizer)
        self.top_k = top_k
        self._options_override = session_options  # None: the serving options (_session_options)
        if precision == "int8" and self.manifest.int8_file is None:
            raise ModelError(f"{model_dir}: precision int8 asked for, but the model has no int8 graph (see manifest 'int8')")
        self._cuda_options = provider_options(cuda_options)
        wanted = choose_providers(providers, int8=self._int8_graph(precision))
        try:
            self._start(precision, intra_op_threads, wanted)
        except ModelError as e:
            if wanted[0] != openvino_session.PROVIDER:
                raise
            log.warning("OpenVINO cannot run %s (%s); ONNX Runtime's CPU provider serves it", model_dir, e)
            self._start(precision, intra_op_threads, wanted[1:])
        if wanted[0] not in CPU_PROVIDERS and self.session.get_providers()[0] == "CPUExecutionProvider":
            self._start(precision, intra_op_threads, ["CPUExecutionProvider"])  # the GPU provider did not load
        self.providers = self.session.get_providers()
        self.buckets = () if self.providers[0] in CPU_PROVIDERS else tuple(sorted(set(batch_buckets)))
        self._check_contract()

    def _start(self, precision: str, intra_op_threads: int, providers: list[str]) -> None:
        """Open the one session: on CPU the int8 graph (`auto`) and one single-threaded stream per lane, elsewhere
        ORT's pool. On CPU, N single-threaded runs side by side beat one run on an N-thread pool (ORT: +29 % at
        batch 8 here): the small convnet's layers leave the pool's threads waiting on each other."""
        on_cpu = providers[0] in CPU_PROVIDERS
        self.precision = "int8" if precision == "int8" or (on_cpu and self._int8_graph(precision)) else "fp32"
        self.lanes = max(1, intra_op_threads) if on_cpu else 1  # concurrent runs over chunks of one batch
        # items per run: 0 = the whole batch in one run (a GPU session, or the runtime's own pool); on CPU lanes
        # ORT's kernels are cheapest one image at a time, OpenVINO's want a few
        self.run_items = 0 if not on_cpu or intra_op_threads == 0 else (
            openvino_session.RUN_ITEMS if providers[0] == openvino_session.PROVIDER else 1)
        threads = 1 if self.lanes > 1 else intra_op_threads
        import onnxruntime as ort

        filename = self.manifest.int8_file if self.precision == "int8" else ONNX_FILE
        self.manifest.verify(self.model_dir, filename)
        path = os.path.join(self.model_dir, filename)
        try:
            if providers[0] == openvino_session.PROVIDER:
                self.session = openvino_session.OpenVINOSession(path, self.lanes if self.run_items else 0)
            else:
                self.session = ort.InferenceSession(
                    path, sess_options=self._options_override or _session_options(threads),
                    providers=[(p, self._cuda_options) if p == "CUDAExecutionProvider" else p for p in providers])
        except Exception as e:  # both runtimes raise their own exception types for bad files
            raise ModelError(f"cannot load {self.model_dir}/{filename}: {e}") from None

    def _int8_graph(self, precision: str) -> bool:
        """The int8 graph is asked for, or `auto` finds one (which it takes when the session runs on CPU)."""
        return precision == "int8" or (precision == "auto" and self.manifest.int8_file is not None)

    @property
    def version(self) -> str:
        return self.manifest.model_version

    @property
    def provider(self) -> str:
        return self.providers[0].removesuffix("ExecutionProvider")

    def _check_contract(self) -> None:
        names = {i.name for i in self.session.get_inputs()}
        if names != {"token_ids", "image", "image_present"}:
            raise ModelError(f"model inputs {sorted(names)} do not match the contract")
        outs = [o.name for o in self.session.get_outputs()]
        if "probs" not in outs:
            raise ModelError(f"model outputs {outs} lack 'probs'")

    def warm_up(self) -> None:
        """One tiny batch so the first real batch does not pay for lazy allocation; also validates the pair of
        files: a full row of the highest token id (the graph's name table and token width must cover the
        manifest's) and one probability per label."""
        config = self.tokenizer.config
        probe = np.full(config.max_tokens, config.n_ids - 1, np.int32)
        try:
            probs = self.run([probe], [None])
            for size in self.buckets:  # each shape's one-time preparation now, not under the first real batches
                self.run([np.zeros(0, np.int32)] * size, [None] * size)
        except Exception as e:  # noqa: BLE001 — each runtime raises its own types
            raise ModelError(f"{self.model_dir}: the graph does not run as its manifest describes: "
                             f"{type(e).__name__}: {e}") from None
        if probs.shape != (1, len(self.manifest.labels)) or not np.all(np.isfinite(probs)):
            raise ModelError(f"warm-up produced {probs.shape} / non-finite values")

    def run(self, token_ids: list[np.ndarray], images: list) -> np.ndarray:
        """Batch of (token ids, uint8 image or None) → probs [B, n_labels]; a single run stays in the calling thread."""
        chunks = self._chunks(token_ids, images)
        if len(chunks) > 1:
            return self._on_lanes(chunks, len(token_ids)).result()
        return self._timed_run(chunks[0])[0][: len(token_ids)]  # bucket padding rows dropped

    def submit(self, token_ids: list[np.ndarray], images: list) -> "PendingRun":
        """The same batch started on the lanes (a GPU session: its one lane), so the caller can checkpoint the
        batch before meanwhile; its runs queue behind those of batches submitted earlier. Never raises: a
        batch that cannot run fails in `result()`, where the caller isolates its items."""
        try:
            return self._on_lanes(self._chunks(token_ids, images), len(token_ids))
        except Exception as e:  # noqa: BLE001 — e.g. token ids the tokenizer cannot pad
            failed: Future = Future()
            failed.set_exception(e)
            return PendingRun([failed])

    def padded_size(self, batch: int) -> int:
        """The bucket a batch of this size runs as (itself when larger than every bucket, or on CPU)."""
        return next((b for b in self.buckets if b >= batch), batch)

    def _chunks(self, token_ids: list[np.ndarray], images: list) -> list[tuple]:
        """The batch cut into runs: (token ids, images, image_present) per run. Only slices here: each run's
        input arrays are built on its lane (`_feeds`), off the caller's thread, which meanwhile checkpoints the
        batch before."""
        extra = self.padded_size(len(token_ids)) - len(token_ids)
        if extra:  # padding rows: no tokens, no photo; their outputs are dropped
            token_ids, images = [*token_ids, *[np.zeros(0, np.int32)] * extra], [*images, *[None] * extra]
        batch = len(token_ids)
        tokens = self.tokenizer.pad(token_ids)
        present = np.array([img is not None for img in images], dtype=np.float32)
        size = batch if not self.run_items else min(self.run_items, -(-batch // self.lanes))
        return [(tokens[a : a + size], images[a : a + size], present[a : a + size]) for a in range(0, batch, size)]

    def _on_lanes(self, chunks: list[tuple], items: int) -> "PendingRun":
        # the lanes take chunks as they free up; both runtimes release the GIL while they run
        pool = _lane_pool(self.lanes)
        return PendingRun([pool.submit(self._timed_run, c) for c in chunks], items)

    @staticmethod
    def _feeds(tokens: np.ndarray, images: list, present: np.ndarray) -> dict:
        if len(images) == 1:  # one item: a view of its record's own image (the Kafka payload), no copy
            image = _one_image(images[0])
        else:
            image = np.empty((len(images), *IMAGE_SHAPE), dtype=np.uint8)  # every row is written below: no zero fill
            for i, img in enumerate(images):
                image[i] = 0 if img is None else _one_image(img)[0]
        return {"token_ids": tokens, "image": image, "image_present": present}

    def _timed_run(self, chunk: tuple) -> tuple[np.ndarray, float, float]:
        feeds = self._feeds(*chunk)
        t0 = time.perf_counter()
        probs = self.session.run(["probs"], feeds)[0]
        return probs, t0, time.perf_counter()

    def predictions(self, probs: np.ndarray) -> list[Prediction]:
        labels = self.manifest.labels
        k = min(self.top_k, len(labels))
        order = np.argsort(-probs, axis=1)[:, :k]
        top = np.take_along_axis(probs, order, axis=1).astype(np.float64).tolist()  # Python floats, one call per batch
        paths, threshold = self._category_paths, self.manifest.threshold
        return [
            Prediction(category=labels[idx[0]], confidence=p[0],
                       top_k=[{"category": labels[j], "p": round(pj, 6)} for j, pj in zip(idx, p)],
                       uncertain=p[0] < threshold, category_path=list(paths[idx[0]]))
            for idx, p in zip(order.tolist(), top)
        ]

    @functools.cached_property
    def _category_paths(self) -> list[tuple[str, ...]]:
        """Leaf → root for every label index, built once per model."""
        return [(leaf, *self.manifest.parents.get(leaf, [])) for leaf in self.manifest.labels]


def _signature(model_dir: str) -> tuple:
    """Changes whenever either file is replaced or rewritten."""
    sig = []
    for name in (MANIFEST, ONNX_FILE, INT8_FILE):
        try:
            st = os.stat(os.path.join(model_dir, name))
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append(None)
    return tuple(sig)


class DirWatch:
    """Notices a changed model directory, looking at most every `interval_s` (or now, when forced).
    Shared by the inference worker (model) and the preprocess workers (tokenizer)."""

    def __init__(self, model_dir: str, interval_s: float):
        self.model_dir = model_dir
        self.interval_s = interval_s
        self.signature = _signature(model_dir)
        self._next_check = time.monotonic() + interval_s

    def changed(self, force: bool = False) -> bool:
        """True once per change; a version rejected by the caller is therefore not retried in a loop."""
        if not force and time.monotonic() < self._next_check:
            return False
        self._next_check = time.monotonic() + self.interval_s
        sig = _signature(self.model_dir)
        if sig == self.signature:
            return False
        self.signature = sig
        return True

    def still_same(self) -> bool:
        """False when the directory changed again while it was being loaded: load it again at the next check."""
        if _signature(self.model_dir) == self.signature:
            return True
        self.signature = None
        return False
