"""A tiny ONNX model with the real input/output contract and outputs the tests can predict.

STAND-IN for pipeline tests only (manifest `stand_in: true`), never presented as a trained model.
Logits = Σ over tokens of W[token] + image_present · (mean pixel / 255) · IMAGE_WEIGHT on "Watches":
  a name with "shirt" → Shirts, "shoes" → Shoes, "watch" → Watches; an unknown name with no photo is
  uniform (uncertain); an unknown name with a white photo → Watches.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common.model import MANIFEST, MANIFEST_FORMAT, ONNX_FILE, seal_graph

LABELS = ["Shirts", "Shoes", "Watches"]
VOCAB = ["shirt", "shoes", "watch"]
PARENTS = {"Shirts": ["Topwear", "Apparel"], "Shoes": ["Footwear", "Footwear"], "Watches": ["Watches", "Accessories"]}
MAX_TOKENS = 8
EMBED_DIM = 3
IMAGE_WEIGHT = 6.0
# the provider a Classifier of this model reports for each `providers` the tests ask for: it has no int8 graph,
# so `auto` serves it on ONNX Runtime's CPU provider
PROVIDER_LABEL = {"auto": "CPU", "cpu": "CPU", "openvino": "OpenVINO"}


def _graph(scale: float, vocab: list[str]) -> onnx.ModelProto:
    n_ids = 2 + len(vocab)
    w = np.zeros((n_ids, len(LABELS)), np.float32)
    for i, word in enumerate(vocab):
        w[2 + i, VOCAB.index(word)] = 6.0 * scale  # the word's label, wherever the vocabulary puts the word
    image_dir = np.array([0.0, 0.0, IMAGE_WEIGHT], np.float32)
    nodes = [
        helper.make_node("Gather", ["W", "token_ids"], ["tok_logits"], axis=0),  # [B, L, C]
        helper.make_node("ReduceSum", ["tok_logits", "axis1"], ["text_logits"], keepdims=0),  # [B, C]
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["image_f", "axes123"], ["mean_px"], keepdims=0),  # [B]
        helper.make_node("Mul", ["mean_px", "inv255"], ["brightness"]),
        helper.make_node("Mul", ["brightness", "image_present"], ["img_strength"]),
        helper.make_node("Unsqueeze", ["img_strength", "axis1"], ["img_col"]),  # [B, 1]
        helper.make_node("Mul", ["img_col", "image_dir"], ["img_logits"]),
        helper.make_node("Add", ["text_logits", "img_logits"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("LpNormalization", ["logits"], ["embedding"], axis=1, p=2),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes123"),
        numpy_helper.from_array(np.array(1 / 255.0, np.float32), "inv255"),
        numpy_helper.from_array(image_dir, "image_dir"),
    ]
    graph = helper.make_graph(
        nodes, "prodcat_tiny",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch", MAX_TOKENS]),
         helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 224, 224, 3]),
         helper.make_tensor_value_info("image_present", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(LABELS)]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_tiny_model(model_dir: str, version: str = "tiny-1", scale: float = 1.0, vocab: list[str] | None = None) -> str:
    """Write model.onnx + manifest.json; a different `scale` gives a different (still valid) model, a reordered
    `vocab` a model with other token ids and the same answers (token ids of one fed to the other answer wrong)."""
    vocab = list(vocab or VOCAB)
    os.makedirs(model_dir, exist_ok=True)
    onnx.save(_graph(scale, vocab), os.path.join(model_dir, ONNX_FILE))
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_version": version,
        "stand_in": True,
        "labels": LABELS,
        "hierarchy": {"levels": ["masterCategory", "subCategory", "articleType"], "parents": PARENTS},
        "tokenizer": {"max_tokens": MAX_TOKENS, "korean_tagger": "okt", "oov_buckets": 0, "vocab": vocab},
        "threshold": 0.5,
    }
    with open(os.path.join(model_dir, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return seal_graph(model_dir)


def expected_category(name: str) -> str | None:
    """What the tiny model answers for a name that holds exactly one vocabulary word."""
    words = name.lower()
    for label, word in zip(LABELS, VOCAB):
        if word in words:
            return label
    return None
