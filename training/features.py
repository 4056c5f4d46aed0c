"""Cached features, keyed by content, in $PRODCAT_CACHE (default ~/.cache/prodcat).

- tokenised names (konlpy is the slow part for Korean): key = tagger + every name
- Lite0 trunk activations per photo and view (original / mirrored): key = weights + cut + view +
  sha1 of every photo's bytes. The trunk runs in ONNX Runtime (≈4× faster than PyTorch here).
A rerun over the same data only reads .npy files. Delete the folder to start cold.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile

import numpy as np
import torch
from tqdm import tqdm

from common.errors import ProcessingError
from common.settings import cache_dir

log = logging.getLogger(__name__)
CACHE_VERSION = "4"  # 2: photos not 224×224 are resized by OpenCV (common.images), not Pillow; 3: bicubic for ≤ 2×;
# 4: JPEGs decoded at ≥ 200 px a side


def _atomic_save(path: str, write) -> None:
    """Write via a temp file + rename: an interrupted run never leaves a half cache entry."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def tokenized(tokenizer, names: list[str], progress: bool = True) -> list[list[str]]:
    h = hashlib.sha1(f"{CACHE_VERSION}:{tokenizer.config.korean_tagger}".encode())
    for n in names:
        h.update(n.encode("utf-8") + b"\0")
    path = os.path.join(cache_dir(), f"words-{h.hexdigest()[:20]}.pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    words = [tokenizer.words(n) for n in tqdm(names, desc="tokenize", disable=not progress, mininterval=2)]
    _atomic_save(path, lambda f: pickle.dump(words, f))
    return words


def _read_bytes(ref: str) -> bytes | None:
    from training.data import read_image_bytes

    try:
        return read_image_bytes(ref)
    except (OSError, ProcessingError) as e:
        log.warning("image %s unreadable, item used as name-only: %s", ref, e)
        return None


def _trunk_session(cut: int):
    """ONNX Runtime session over the frozen trunk, exported once per cut and cached."""
    from common.model import cpu_session
    from training.model import ImageTower, TrunkOnly

    path = os.path.join(cache_dir(), f"lite0-trunk-cut{cut}-v{CACHE_VERSION}.onnx")
    if not os.path.exists(path):
        module = TrunkOnly(ImageTower(cut)).eval()
        tmp = path + f".{os.getpid()}.tmp"
        torch.onnx.export(
            module, (torch.zeros(1, 224, 224, 3, dtype=torch.uint8),), tmp, input_names=["image"],
            output_names=["act"], dynamic_axes={"image": {0: "b"}, "act": {0: "b"}}, opset_version=17, dynamo=False,
        )
        os.replace(tmp, path)
    return cpu_session(path, torch.get_num_threads())


def trunk_activations(refs: list[str], cut: int, views: int = 1, progress: bool = True):
    """Photo references → (activations float16 [views, N, C, H, W], ok bool [N]).

    View 0 is the photo, view 1 its mirror image (augmentation). Unreadable photos get ok=False.
    """
    from common.images import decode_resize
    from training.model import lite0_weights_path

    if not refs:
        return [], np.zeros(0, bool)
    blobs = [_read_bytes(r) for r in tqdm(refs, desc="read photos", disable=not progress, mininterval=2)]
    h = hashlib.sha1(f"{CACHE_VERSION}:{cut}:{os.path.getsize(lite0_weights_path())}".encode())
    for b in blobs:
        h.update(hashlib.sha1(b or b"").digest())
    key = h.hexdigest()[:20]
    paths = [os.path.join(cache_dir(), f"acts-{key}-view{v}.npy") for v in range(views)]
    ok_path = os.path.join(cache_dir(), f"acts-{key}-ok.npy")

    ok = np.array([b is not None for b in blobs])
    session = None
    out = []
    for view, path in enumerate(paths):
        if os.path.exists(path) and os.path.exists(ok_path):
            out.append(np.load(path, mmap_mode="r"))
            continue
        session = session or _trunk_session(cut)
        acts = None
        batch = 32
        bar = tqdm(total=len(blobs), desc=f"photo features (view {view})", disable=not progress, mininterval=2)
        for start in range(0, len(blobs), batch):
            imgs = []
            for i in range(start, min(start + batch, len(blobs))):
                img = np.zeros((224, 224, 3), np.uint8)
                if ok[i]:
                    try:
                        img = decode_resize(blobs[i])
                    except ProcessingError as e:
                        log.warning("image %s undecodable, item used as name-only: %s", refs[i], e)
                        ok[i] = False
                imgs.append(img[:, ::-1] if view == 1 else img)
            a = session.run(None, {"image": np.ascontiguousarray(np.stack(imgs))})[0]
            if acts is None:
                acts = np.zeros((len(blobs), *a.shape[1:]), np.float16)
            acts[start : start + len(imgs)] = a
            bar.update(len(imgs))
        bar.close()
        _atomic_save(path, lambda f: np.save(f, acts))
        _atomic_save(ok_path, lambda f: np.save(f, ok))
        out.append(acts)
    if os.path.exists(ok_path):
        ok = np.load(ok_path)
    return out, ok


def pooled_features(acts: np.ndarray, cut: int, progress: bool = True, batch: int = 256) -> np.ndarray:
    """Trunk activations of one view → pooled 1280-d features of the frozen Lite0 tower (float32 [N, 1280]).

    Cached beside the activations; the key is a sample of the activations' bytes (+ shape, cut, weights)."""
    from training.model import ImageTower, lite0_weights_path

    acts = np.asarray(acts)
    h = hashlib.sha1(f"{CACHE_VERSION}:{cut}:{acts.shape}:{os.path.getsize(lite0_weights_path())}".encode())
    h.update(np.ascontiguousarray(acts[:: max(1, len(acts) // 512)]).tobytes())
    path = os.path.join(cache_dir(), f"pooled-{h.hexdigest()[:20]}.npy")
    if os.path.exists(path):
        return np.load(path)
    tower = ImageTower(cut).eval()
    out = np.zeros((len(acts), 1280), np.float32)
    with torch.no_grad():
        for s in tqdm(range(0, len(acts), batch), desc="pooled photo features", disable=not progress, mininterval=2):
            out[s : s + batch] = tower.head(torch.from_numpy(acts[s : s + batch].astype(np.float32))).numpy()
    _atomic_save(path, lambda f: np.save(f, out))
    return out
