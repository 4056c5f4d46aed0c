"""Export: the fused net (text head + image head + mix) + temperature → one ONNX graph + manifest.json,
checked before it is kept.

The directory is assembled beside the target and swapped in at the end, so a reader never sees a
half-written model. Parity: ONNX Runtime and PyTorch must agree on held-out items (with and without
a photo, and a nameless one) within PARITY_ATOL on every probability and embedding value.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil

import numpy as np
import torch

from common.model import INT8_FILE, MANIFEST, MANIFEST_FORMAT, ONNX_FILE, cpu_session, file_sha256
from training.data import read_image
from training.model import ServingGraph

log = logging.getLogger(__name__)
PARITY_ATOL = 1e-4
OPSET = 18  # BitwiseAnd (the word-pair hash, training.model.pair_mask)


class ExportError(Exception):
    pass


def export_onnx(graph: ServingGraph, path: str, max_tokens: int) -> None:
    inputs = (
        torch.zeros(2, max_tokens, dtype=torch.int64),
        torch.zeros(2, 224, 224, 3, dtype=torch.uint8),
        torch.zeros(2, dtype=torch.float32),
    )
    torch.onnx.export(
        graph, inputs, path, input_names=["token_ids", "image", "image_present"], output_names=["probs", "embedding"],
        dynamic_axes={n: {0: "batch"} for n in ("token_ids", "image", "image_present", "probs", "embedding")},
        opset_version=OPSET, dynamo=False,
    )


def parity_feeds(items, tok) -> dict:
    images, present = np.zeros((len(items), 224, 224, 3), np.uint8), np.zeros(len(items), np.float32)
    for i, it in enumerate(items):
        if it.image:
            images[i], present[i] = read_image(it.image), 1.0
    return {"token_ids": tok.pad([tok.encode(it.name) for it in items]), "image": images, "image_present": present}


def check_parity(graph: ServingGraph, onnx_path: str, feeds: dict) -> dict:
    sess = cpu_session(onnx_path, torch.get_num_threads())
    ort_probs, ort_emb = sess.run(["probs", "embedding"], feeds)
    with torch.no_grad():
        t_probs, t_emb = graph(*(torch.from_numpy(feeds[k]) for k in ("token_ids", "image", "image_present")))
    diff = {
        "probs_max_abs_diff": float(np.abs(ort_probs - t_probs.numpy()).max()),
        "embedding_max_abs_diff": float(np.abs(ort_emb - t_emb.numpy()).max()),
        "argmax_agree": float((ort_probs.argmax(1) == t_probs.numpy().argmax(1)).mean()),
        "n_items": int(len(ort_probs)),
        "tolerance_abs": PARITY_ATOL,
    }
    if max(diff["probs_max_abs_diff"], diff["embedding_max_abs_diff"]) > PARITY_ATOL or diff["argmax_agree"] < 1:
        raise ExportError(f"ONNX Runtime and PyTorch disagree beyond {PARITY_ATOL}: {diff}")
    return diff


def export_model(net, temperature, out_dir, *, ds, labels, tok_cfg, threshold, config, val_metrics, history,
                 train_seconds, parity_items, tok, before_swap=None) -> dict:
    """The model directory written whole in a temporary one, checked by the serving loader, then swapped in: a
    worker watching `out_dir` sees the old version or the new one, never a part. `before_swap(tmp_dir)` adds to
    it first (the int8 graph; its return value goes into the manifest returned under "int8")."""
    out_dir = os.path.abspath(out_dir)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    graph = ServingGraph(net.eval(), temperature).eval()
    onnx_path = os.path.join(tmp_dir, ONNX_FILE)
    export_onnx(graph, onnx_path, tok_cfg.max_tokens)
    parity = check_parity(graph, onnx_path, parity_feeds(parity_items, tok))
    log.info("parity ORT vs torch: %s", parity)

    now = dt.datetime.now(dt.timezone.utc)
    digest = file_sha256(onnx_path)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_version": f"{ds.name}-{now:%Y%m%d-%H%M%S}-{digest[:8]}",
        "created": now.isoformat(timespec="seconds"),
        "stand_in": False,
        "dataset": ds.name,
        "training_data": {"fingerprint_sha256": ds.fingerprint, "files": [os.path.basename(s) for s in ds.sources],
                          "rows": len(ds.items), "split": "sha1(dataset:id) % 100: <80 train, <90 val, else test"},
        "labels": list(labels),
        "hierarchy": {"levels": list(ds.levels), "parents": ds.parents()},
        "tokenizer": tok_cfg.to_manifest(),
        "threshold": threshold,
        "temperature": temperature,
        "inputs": {
            "token_ids": {"dtype": "int64", "shape": ["batch", tok_cfg.max_tokens], "note": "0 = padding"},
            "image": {"dtype": "uint8", "shape": ["batch", 224, 224, 3], "note": "RGB, common.images.decode_resize"},
            "image_present": {"dtype": "float32", "shape": ["batch"], "note": "1 = photo, 0 = none (image zeros)"},
        },
        "outputs": {
            "probs": {"dtype": "float32", "shape": ["batch", len(labels)], "note": "calibrated (temperature inside)"},
            "embedding": {"dtype": "float32", "shape": ["batch", len(labels)],
                          "note": "L2-normalised fused logits (position in category space)"},
        },
        "onnx": {"file": ONNX_FILE, "sha256": digest, "opset": OPSET, "parity": parity},
        "validation": val_metrics,
        "training": {"seconds": round(train_seconds, 1), "history": history},
        "config": config,
    }
    with open(os.path.join(tmp_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    if before_swap is not None:
        manifest["int8"] = before_swap(tmp_dir)

    from common.model import Classifier

    Classifier(tmp_dir).warm_up()  # the serving loader accepts it (the int8 graph on CPU), or we keep the old model
    _swap_in(tmp_dir, out_dir)
    return manifest


def _swap_in(tmp_dir: str, out_dir: str) -> None:
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- optional int8 graph

IMAGE_TOWER_SCOPE = "/net/image/tower/"  # ONNX node names of ServingGraph.net.image.tower (torch export scopes)
INT8_MAX_DROP = 0.01  # kept only if validation accuracy falls by at most this much (absolute)


class _Feeds:
    """onnxruntime.quantization calibration reader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def add_int8(model_dir: str, calib_feeds: list[dict], val_accuracy) -> dict:
    """Quantize the convolutions (the image tower: nearly all of the cost) to int8 with static QDQ
    calibration on training photos; keep `model.int8.onnx` only if `val_accuracy(path)` holds on validation.
    The Classifier serves it on CPU (precision `auto`); the manifest records the outcome either way.

    The stem convolution stays fp32: it reads the normalised pixels directly, and quantizing it cost 5 pt of
    photo-only validation accuracy (0.893 → 0.842), against < 1 pt for all the other 48 convolutions
    together. Percentile calibration (clip the 0.001 % tails) beat min/max by another ~0.5 pt. The tower's
    ReLU6 (Clip) and residual Adds are quantized too, so activations stay int8 from one convolution to the
    next: 1.4× faster than convolutions alone at the same validation accuracy. The name head and the fusion
    stay fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = os.path.join(model_dir, ONNX_FILE)
    pre, dst = os.path.join(model_dir, "pre.tmp.onnx"), os.path.join(model_dir, INT8_FILE)
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    ops = ("Conv", "Clip", "Add")
    tower = [n for n in onnx.load(pre).graph.node if n.op_type in ops and n.name.startswith(IMAGE_TOWER_SCOPE)]
    stem = next(n.name for n in tower if n.op_type == "Conv")  # nodes are in topological order
    size = len(calib_feeds[0]["image"])  # the percentile calibrator stacks its batches: one batch size only
    calib_feeds = [f for f in calib_feeds if len(f["image"]) == size]
    quantize_static(pre, dst, _Feeds(calib_feeds), op_types_to_quantize=list(ops), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_quantize=[n.name for n in tower if n.name != stem], calibrate_method=CalibrationMethod.Percentile)
    os.unlink(pre)
    fp32, int8 = val_accuracy(src), val_accuracy(dst)
    kept = all(int8[k] >= fp32[k] - INT8_MAX_DROP for k in fp32)
    info = {"file": INT8_FILE if kept else None, "sha256": file_sha256(dst) if kept else None, "kept": kept,
            "max_drop": INT8_MAX_DROP,
            "val_fp32": fp32, "val_int8": int8, "speed_images_per_s_1_thread": {"fp32": _speed(src), "int8": _speed(dst)}}
    if not kept:
        os.unlink(dst)
    path = os.path.join(model_dir, MANIFEST)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["int8"] = info
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)
    return info


def _speed(path: str, batch: int = 16, rounds: int = 3) -> float:
    import time

    sess = cpu_session(path, 1)
    max_tokens = sess.get_inputs()[0].shape[1]
    feeds = {"token_ids": np.ones((batch, max_tokens), np.int64),
             "image": np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3)).astype(np.uint8),
             "image_present": np.ones(batch, np.float32)}
    sess.run(None, feeds)
    t = time.perf_counter()
    for _ in range(rounds):
        sess.run(None, feeds)
    return round(batch * rounds / (time.perf_counter() - t), 1)
