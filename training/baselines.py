"""Classic baselines on the same splits, to show what the fused net adds.

- names: TF-IDF over our tokenizer's words (uni + bigrams) + LinearSVC
- photos: frozen ImageNet Lite0 pooled features (no fine-tuning) + cosine 5-NN vote
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC


def name_svm(train_words: list[list[str]], train_y: np.ndarray, test_words: list[list[str]]) -> np.ndarray:
    vec = TfidfVectorizer(analyzer=lambda ws: ws + [a + " " + b for a, b in zip(ws, ws[1:])], sublinear_tf=True)
    clf = LinearSVC(C=1.0, random_state=0).fit(vec.fit_transform(train_words), train_y)
    return clf.predict(vec.transform(test_words))


@torch.no_grad()
def frozen_image_features(acts: np.ndarray, cut: int, batch: int = 256) -> np.ndarray:
    """Cached trunk activations → pooled 1280-d features of the untouched pretrained net, L2-normalised."""
    from training.model import ImageTower

    tower = ImageTower(cut).eval()
    out = [tower.head(torch.from_numpy(np.asarray(acts[s : s + batch], dtype=np.float32))) for s in range(0, len(acts), batch)]
    feats = torch.cat(out).numpy() if out else np.zeros((0, 1280), np.float32)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-8)


def image_knn(train_feats: np.ndarray, train_y: np.ndarray, test_feats: np.ndarray, k: int = 5) -> np.ndarray:
    """Similarity-weighted vote of the k nearest training photos (cosine)."""
    sims = test_feats @ train_feats.T
    top = np.argsort(-sims, axis=1)[:, :k]
    n_labels = int(train_y.max()) + 1
    preds = np.empty(len(test_feats), dtype=np.int64)
    for i, (idx, s) in enumerate(zip(top, np.take_along_axis(sims, top, axis=1))):
        preds[i] = np.bincount(train_y[idx], weights=s, minlength=n_labels).argmax()
    return preds
