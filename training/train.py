"""`prodcat train`: data → vocabulary → text head (TF-IDF words + word pairs, multinomial logistic
regression) and image head (frozen Lite0 pooled features, multinomial logistic regression), each
trained on its own → late-fusion weights, temperature and "uncertain" threshold fitted on
validation → ONNX model directory (see training/export.py). The test split is never read here.

Why late fusion: a joint net trained on the training split learns to trust whichever branch fits
*the training data* best; the image branch memorises its few thousand photos, so the joint net
trusted it too much and the photo made predictions worse. Here each head gets its own loss and the
mix is fitted on held-out predictions, where an over-fitted branch shows its real reliability.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from torch.nn import functional as F

from common.settings import number
from common.tokenize import Tokenizer, TokenizerConfig
from training.data import DATASETS, DataError, Dataset, leaf_words_removed, load_dataset, load_table, singular
from training.features import pooled_features, trunk_activations, tokenized
from training.model import GATE_FLOOR, IMAGE_FEATURES, PAIR_PRIME, FusedNet, pair_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    cut: int = 15  # Lite0 blocks [0, cut) cached as activations; the rest run once to pool features
    views: int = 2  # photo views for the image head: 1 = as is, 2 = + mirrored (augmentation)
    max_tokens: int = 32
    min_count: int = 2  # rarer training words go to hashed OOV buckets (which they train)
    oov_buckets: int = 2000
    pair_space: int = 1 << 18  # hash space of adjacent word pairs (in-graph); only pairs seen in training get a row
    pair_min_count: int = 1
    text_c: float = 10.0  # inverse L2 strength of the text head (text_model "logreg")
    image_c: float = 0.05  # inverse L2 strength of the image head (standardised features)
    text_model: str = "svm"  # "logreg" (multinomial) or "svm" (one-vs-rest squared hinge, margins scaled by the mix)
    svm_c: float = 0.5
    text_leaf_removed_weight: float = 0.3  # also train the text head on photo items' names minus the leaf's words
    class_weight_power: float = 0.25  # loss weight of a class ∝ (1 / frequency)^power: rare classes count more
    # each label's own name (and its singular: "Footballs" → "football") is one more text-head training row of this
    # weight (× the mean item weight): a prior for classes with a handful of items. myntra, 5-fold over training,
    # name only, macro-F1 / accuracy: 0.831 / 0.9704 without; weight 1: 0.842; 3: 0.848; 10: 0.851 / 0.9706; 30: 0.850
    label_name_weight: float = 10.0
    max_iter: int = 300  # L-BFGS iterations per head
    epochs: int = 0  # CLI --epochs N: caps the solvers at 25·N iterations (quick runs); 0 = max_iter
    # image head: fine-tune the tower's last block + head convolution on the training photos (0 = frozen).
    # Validation, photo only: 6 epochs at 3e-4 0.895; 10 at 1e-3 0.914; 15 at 1e-3 0.911; 10 at 3e-3 0.913
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    finetune_wd: float = 0.05
    finetune_dropout: float = 0.3
    finetune_batch: int = 64
    fusion_gate: bool = True  # the photo's weight shrinks as the name gets sure (see model.FusedNet)
    fusion_leaf_removed_share: float = 0.1  # weight of names without the leaf's words in the name+photo mix fit
    max_flagged: float = 0.10  # the "uncertain" threshold may flag at most this share of validation
    int8: bool = True  # try an int8 image tower (model.int8.onnx), kept only if validation holds
    seed: int = 0
    threads: int = 2


FAST = dict(views=1, max_iter=150, finetune_epochs=3, int8=False)


def build_vocab(words: list[list[str]], min_count: int) -> tuple[str, ...]:
    """Training-split words seen ≥ min_count times, most frequent first (ties alphabetical: deterministic)."""
    counts: dict[str, int] = {}
    for ws in words:
        for w in ws:
            counts[w] = counts.get(w, 0) + 1
    return tuple(sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)))


@dataclass
class SplitData:
    """One split as arrays: padded token ids (full name / leaf words removed), labels, photo rows."""

    ids: np.ndarray  # int64 [N, L]
    ids_no_leaf: np.ndarray  # int64 [N, L]
    y: np.ndarray  # int64 [N]
    photo: np.ndarray  # int64 [N], row in the photo feature cache or -1


def _ids(tok: Tokenizer, words: list[str]) -> np.ndarray:
    return np.asarray([tok.token_id(w) for w in words[: tok.config.max_tokens]], dtype=np.int32)


def make_split(items, words, tok, label_index, photo_row, label_words) -> SplitData:
    full = [_ids(tok, w) for w in words]
    no_leaf = [_ids(tok, leaf_words_removed(w, it.label, label_words[it.label])) for it, w in zip(items, words)]
    return SplitData(
        tok.pad(full), tok.pad(no_leaf), np.array([label_index[it.label] for it in items], dtype=np.int64),
        np.array([photo_row.get(it.id, -1) for it in items], dtype=np.int64),
    )


# ---------------------------------------------------------------- text features (mirror of model.TextHead)


def feature_ids(ids: np.ndarray, n_ids: int, pair_space: int) -> np.ndarray:
    """numpy twin of model.pair_ids: [N, L] → [N, 2L-1] word + hashed word-pair feature ids."""
    ids = ids.astype(np.int64)
    a, b = ids[:, :-1], ids[:, 1:]
    pair = n_ids + ((a * PAIR_PRIME + b) & pair_mask(pair_space))
    return np.concatenate([ids, np.where((a > 0) & (b > 0), pair, 0)], axis=1)


@dataclass
class TextFeatures:
    n_ids: int
    pair_space: int
    remap: np.ndarray  # int32 [n_ids + pair_space] → compact row (0 = none)
    idf: np.ndarray  # float32 [n_rows], idf[0] = 0

    @property
    def n_rows(self) -> int:
        return len(self.idf)

    def matrix(self, ids: np.ndarray):
        """→ (CSR [N, n_rows] of L2-normalised idf weights, has_text [N]) exactly as the graph computes them."""
        rows = self.remap[feature_ids(ids, self.n_ids, self.pair_space)].astype(np.int64)
        w = self.idf[rows]
        norm = np.sqrt((w * w).sum(1, keepdims=True, dtype=np.float32))
        vals = w / np.maximum(norm, 1e-6)
        m = rows > 0
        r = np.nonzero(m)[0]
        x = sparse.csr_matrix((vals[m], (r, rows[m])), shape=(len(ids), self.n_rows), dtype=np.float32)
        x.sum_duplicates()
        return x, (norm[:, 0] > 0)


def fit_text_features(ids: np.ndarray, n_ids: int, cfg: "Config") -> TextFeatures:
    f = feature_ids(ids, n_ids, cfg.pair_space)
    uniq, counts = np.unique(f[f > 0], return_counts=True)
    keep = uniq[(uniq < n_ids) | (counts >= cfg.pair_min_count)]
    remap = np.zeros(n_ids + cfg.pair_space, np.int32)
    remap[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    rows = remap[f].astype(np.int64)
    n_rows = len(keep) + 1
    doc = np.repeat(np.arange(len(ids), dtype=np.int64), rows.shape[1])
    r = rows.ravel()
    pairs = np.unique(doc[r > 0] * n_rows + r[r > 0])
    df = np.bincount(pairs % n_rows, minlength=n_rows)
    idf = (np.log((1.0 + len(ids)) / (1.0 + df)) + 1.0).astype(np.float32)
    idf[0] = 0.0
    return TextFeatures(n_ids, cfg.pair_space, remap, idf)


# ---------------------------------------------------------------- heads


def class_weights(y: np.ndarray, n_labels: int, power: float) -> np.ndarray:
    """Per-sample loss weights ∝ (1 / class frequency)^power, mean 1."""
    counts = np.bincount(y, minlength=n_labels).astype(np.float64)
    w = np.where(counts > 0, (len(y) / np.maximum(counts, 1)) ** power, 0.0)[y]
    return w / w.mean()


def _fit_linear(estimator, x, y: np.ndarray, n_labels: int, sample_weight=None):
    """Fit an sklearn linear classifier → (W [features, n_labels], b [n_labels]); a class absent from
    training gets a bias far below the others (never predicted)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    w = np.zeros((x.shape[1], n_labels), np.float32)
    b = np.full(n_labels, -10.0, np.float32)
    classes = np.unique(y)
    if len(classes) < 2:
        b[classes] = 0.0
        return w, b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = estimator.fit(x, y, sample_weight=sample_weight)
    coef, intercept = clf.coef_, clf.intercept_
    if len(classes) == 2:  # sklearn keeps one row for two classes: the margin of the second
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    w[:, clf.classes_] = coef.T
    b[clf.classes_] = intercept
    b[np.setdiff1d(np.arange(n_labels), clf.classes_)] = intercept.min() - 10.0
    return w, b


def fit_logreg(x, y: np.ndarray, n_labels: int, c: float, max_iter: int, sample_weight=None):
    """Multinomial logistic regression (L-BFGS) → (W, b)."""
    from sklearn.linear_model import LogisticRegression

    return _fit_linear(LogisticRegression(C=c, max_iter=max_iter, tol=1e-4), x, y, n_labels, sample_weight)


def fit_linear_svm(x, y: np.ndarray, n_labels: int, c: float, sample_weight=None):
    """One-vs-rest linear SVM (squared hinge) → (W, b). Its margins are not log-probabilities: the fusion
    scale fitted by NLL on validation (and the temperature) turn them into calibrated ones."""
    from sklearn.svm import LinearSVC

    # seeded: liblinear shuffles its coordinates with it; unseeded, two runs on the same data drift apart
    return _fit_linear(LinearSVC(C=c, random_state=0), x, y, n_labels, sample_weight)


@dataclass
class Heads:
    text: TextFeatures
    text_w: np.ndarray  # float16 [n_rows, n_labels] (as stored in the graph)
    text_b: np.ndarray
    image_w: np.ndarray  # float32 [1280, n_labels], standardisation folded in
    image_b: np.ndarray
    tower_state: dict | None = None  # the image tower's weights when its last blocks were fine-tuned
    photo_feats: np.ndarray | None = None  # pooled features of every photo (view 0) through that tower

    def text_logits(self, ids: np.ndarray):
        x, has = self.text.matrix(ids)
        return np.asarray(x @ self.text_w.astype(np.float32)) + self.text_b, has

    def image_logits(self, feats: np.ndarray) -> np.ndarray:
        return feats @ self.image_w + self.image_b


def label_name_rows(labels: list[str], tok: Tokenizer) -> tuple[list[list[str]], np.ndarray]:
    """The labels' own names as tokenised names (plus their singular form where it differs), and their classes."""
    rows, y = [], []
    for j, label in enumerate(labels):
        words = tok.words(label)
        singular_form = [singular(w) for w in words]
        for ws in [words] + ([singular_form] if singular_form != words else []):
            if ws:
                rows.append(ws)
                y.append(j)
    return rows, np.asarray(y, dtype=np.int64)


def fit_heads(train: SplitData, feats: list[np.ndarray], n_ids: int, n_labels: int, cfg: "Config", acts=None,
              progress: bool = False, label_names: tuple[np.ndarray, np.ndarray] | None = None) -> Heads:
    """label_names: (padded ids, classes) of `label_name_rows`, trained with weight cfg.label_name_weight."""
    max_iter = 25 * cfg.epochs if cfg.epochs else cfg.max_iter
    t0 = time.time()
    prior_ids, prior_y = label_names if label_names is not None and cfg.label_name_weight > 0 else (train.ids[:0], train.y[:0])
    ids = np.concatenate([train.ids, prior_ids])
    text = fit_text_features(ids, n_ids, cfg)
    x, _ = text.matrix(ids)
    sw = class_weights(train.y, n_labels, cfg.class_weight_power)
    y, sw = np.concatenate([train.y, prior_y]), np.concatenate([sw, np.full(len(prior_y), cfg.label_name_weight)])
    if cfg.text_leaf_removed_weight > 0:  # + the photo items' names without the leaf's words, down-weighted
        sel = np.nonzero(train.photo >= 0)[0]
        x = sparse.vstack([x, text.matrix(train.ids_no_leaf[sel])[0]]).tocsr()
        y, sw = np.concatenate([y, train.y[sel]]), np.concatenate([sw, sw[sel] * cfg.text_leaf_removed_weight])
    if cfg.text_model == "svm":
        tw, tb = fit_linear_svm(x, y, n_labels, cfg.svm_c, sw)
    else:
        tw, tb = fit_logreg(x, y, n_labels, cfg.text_c, max_iter, sw)
    log.info("text head: %d feature rows, %.0f s", text.n_rows, time.time() - t0)

    t0 = time.time()
    iw, ib = np.zeros((IMAGE_FEATURES, n_labels), np.float32), np.zeros(n_labels, np.float32)
    sel = np.nonzero(train.photo >= 0)[0]
    if len(sel):
        f0 = feats[0][train.photo[sel]]
        mean, std = f0.mean(0), f0.std(0) + 1e-2
        xs = np.concatenate([(f[train.photo[sel]] - mean) / std for f in feats])
        ys = np.tile(train.y[sel], len(feats))
        w, b = fit_logreg(xs, ys, n_labels, cfg.image_c, max_iter, class_weights(ys, n_labels, cfg.class_weight_power))
        iw = (w / std[:, None]).astype(np.float32)
        ib = (b - mean @ iw).astype(np.float32)
        log.info("image head: %d photos × %d views, %.0f s", len(sel), len(feats), time.time() - t0)
    heads = Heads(text, tw.astype(np.float16), tb.astype(np.float32), iw, ib)
    if len(sel) and cfg.finetune_epochs > 0 and acts:
        finetune_image(heads, acts, train, n_labels, cfg, progress)
    return heads


def finetune_image(heads: Heads, acts: list, train: SplitData, n_labels: int, cfg: "Config", progress: bool) -> None:
    """Fine-tune the tower's last blocks + the linear image head (started from the logistic regression) on
    the training photos alone, with its own loss; strong regularisation (feature dropout, label
    smoothing, weight decay, few epochs, BatchNorm statistics frozen). Over-confidence on the training
    photos does no harm here: the fusion weights are fitted on validation."""
    from tqdm import tqdm

    from training.model import ImageHead

    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    head = ImageHead(cfg.cut, n_labels)
    tuned = [*head.tower.tail.parameters(), *head.tower.conv_head.parameters()]
    for p in tuned:
        p.requires_grad_(True)
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(heads.image_w.T.copy()))
        head.linear.bias.copy_(torch.from_numpy(heads.image_b))
    sel = np.nonzero(train.photo >= 0)[0]
    views = [np.asarray(a[train.photo[sel]]) for a in acts]
    y = torch.from_numpy(train.y[sel])
    sw = torch.from_numpy(class_weights(train.y[sel], n_labels, cfg.class_weight_power)).float()
    opt = torch.optim.AdamW([{"params": tuned, "lr": cfg.finetune_lr},
                             {"params": head.linear.parameters(), "lr": cfg.finetune_lr}], weight_decay=cfg.finetune_wd)
    steps = cfg.finetune_epochs * int(np.ceil(len(sel) / cfg.finetune_batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.finetune_lr, total_steps=steps, pct_start=0.1)
    for epoch in range(cfg.finetune_epochs):
        perm = rng.permutation(len(sel))
        total = 0.0
        for s in tqdm(range(0, len(sel), cfg.finetune_batch), desc=f"image fine-tune {epoch + 1}/{cfg.finetune_epochs}",
                      disable=not progress, mininterval=2):
            idx = perm[s : s + cfg.finetune_batch]
            x = torch.from_numpy(views[rng.integers(len(views))][idx].astype(np.float32))
            logits = head.linear(F.dropout(head.tower.head(x), p=cfg.finetune_dropout, training=True))
            loss = (F.cross_entropy(logits, y[idx], reduction="none", label_smoothing=0.1) * sw[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info("image fine-tune epoch %d: loss %.4f", epoch + 1, total / len(sel))
    for p in tuned:
        p.requires_grad_(False)
    out = np.zeros((len(acts[0]), IMAGE_FEATURES), np.float32)
    with torch.no_grad():
        for s in range(0, len(out), 256):
            out[s : s + 256] = head.tower.head(torch.from_numpy(np.asarray(acts[0][s : s + 256], dtype=np.float32))).numpy()
    heads.image_w = head.linear.weight.detach().numpy().T.copy()
    heads.image_b = head.linear.bias.detach().numpy().copy()
    heads.tower_state = {k: v.clone() for k, v in head.tower.state_dict().items()}
    heads.photo_feats = out
    log.info("image fine-tune: %d photos, %d epochs, %.0f s", len(sel), cfg.finetune_epochs, time.time() - t0)


# ---------------------------------------------------------------- fusion (mirror of FusedNet.combine)


def fuse(mix: np.ndarray, t: np.ndarray, has_text: np.ndarray, i: np.ndarray, present: np.ndarray) -> np.ndarray:
    """mix: [4, 2]: rows name + photo, name only, photo only (text weight, image weight), then (gate, 0)."""
    has_text, present = has_text.astype(np.float32)[:, None], present.astype(np.float32)[:, None]
    both, t_only, i_only = has_text * present, has_text * (1 - present), (1 - has_text) * present
    doubt = 1.0 - softmax(mix[0, 0] * t).max(1, keepdims=True)
    a_t = both * mix[0, 0] + t_only * mix[1, 0]
    a_i = both * mix[0, 1] * np.maximum(doubt, GATE_FLOOR) ** mix[3, 0] + i_only * mix[2, 1]
    return a_t * t + a_i * i


def fit_gated(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]], gate: bool) -> np.ndarray:
    """(a_t, a_i, gate) minimising Σ weight · NLL(a_t·t + a_i·(1 - max softmax(a_t·t))^gate · i, y) over
    the parts [(text logits, image logits, y, weight)]; gate fixed at 0 when `gate` is False."""
    params = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    data = [(torch.from_numpy(t.astype(np.float64)), torch.from_numpy(i.astype(np.float64)), torch.from_numpy(y), w)
            for t, i, y, w in parts if len(y) and w > 0]
    if not data:
        return np.array([1.0, 1.0, 0.0])

    def fused(p, t, i):
        a_t, a_i, k = p.clamp(-8, 4).exp()
        k = k if gate else torch.zeros((), dtype=torch.float64)
        doubt = 1.0 - F.softmax(a_t * t, 1).max(1).values
        return a_t * t + (a_i * doubt.clamp(min=GATE_FLOOR) ** k)[:, None] * i

    opt = torch.optim.LBFGS([params], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(w * F.cross_entropy(fused(params, t, i), y) for t, i, y, w in data)
        loss.backward()
        return loss

    opt.step(closure)
    a_t, a_i, k = params.detach().clamp(-8, 4).exp().numpy()
    return np.array([a_t, a_i, k if gate else 0.0])


def fit_scales(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]], n_scales: int) -> np.ndarray:
    """Scales a ≥ 0 minimising Σ weight · NLL(Σ_k a_k · logits_k, y) over the parts [(logits [k, N, C], y, _, weight)]."""
    log_a = torch.zeros(n_scales, dtype=torch.float64, requires_grad=True)
    data = [(torch.from_numpy(np.asarray(lg, np.float64)), torch.from_numpy(y), w) for lg, y, _, w in parts if len(y)]
    if not data:
        return np.ones(n_scales)
    opt = torch.optim.LBFGS([log_a], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        a = log_a.clamp(-8, 4).exp()
        loss = sum(w * F.cross_entropy((a[:, None, None] * lg).sum(0), y) for lg, y, w in data)
        loss.backward()
        return loss

    opt.step(closure)
    return log_a.detach().clamp(-8, 4).exp().numpy()


@dataclass
class HeldOut:
    """Head outputs on one split (validation): everything the mix fit and the metrics need."""

    y: np.ndarray
    t_full: np.ndarray
    has_full: np.ndarray
    t_no_leaf: np.ndarray
    has_no_leaf: np.ndarray
    img: np.ndarray  # image logits (zeros where no photo)
    present: np.ndarray  # bool

    def subset(self, rows) -> "HeldOut":
        return HeldOut(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def held_out(heads: Heads, d: SplitData, feats0: np.ndarray) -> HeldOut:
    if heads.photo_feats is not None:
        feats0 = heads.photo_feats
    t_full, has_full = heads.text_logits(d.ids)
    t_nl, has_nl = heads.text_logits(d.ids_no_leaf)
    present = d.photo >= 0
    img = np.zeros_like(t_full)
    if present.any():
        img[present] = heads.image_logits(feats0[d.photo[present]])
    return HeldOut(d.y, t_full, has_full, t_nl, has_nl, img, present)


def fit_mix(h: HeldOut, cfg: "Config") -> np.ndarray:
    """The 3×2 mixing weights (rows: name + photo, name only, photo only; columns: text, image)."""
    mix = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    (a_t,) = fit_scales([(h.t_full[h.has_full][None], h.y[h.has_full], None, 1.0)], 1)
    mix[1, 0] = a_t
    p = h.present
    if p.any():
        (a_i,) = fit_scales([(h.img[p][None], h.y[p], None, 1.0)], 1)
        both = p & h.has_full
        both_nl = p & h.has_no_leaf
        s = cfg.fusion_leaf_removed_share
        a_t2, a_i2, k = fit_gated([
            (h.t_full[both], h.img[both], h.y[both], 1.0 - s),
            (h.t_no_leaf[both_nl], h.img[both_nl], h.y[both_nl], s),
        ], cfg.fusion_gate)
        mix[0] = [a_t2, a_i2]
        mix[2, 1] = a_i
        mix[3, 0] = k
    else:
        mix[0] = [a_t, 0.0]
    return mix


def conditions(mix: np.ndarray, h: HeldOut) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fused logits + labels for every evaluation condition (the same ones `prodcat evaluate` scores)."""
    none = np.zeros(len(h.y), bool)
    out = {
        "name_and_photo": fuse(mix, h.t_full, h.has_full, h.img, h.present),
        "name_only": fuse(mix, h.t_full, h.has_full, h.img, none),
    }
    res = {k: (v, h.y) for k, v in out.items()}
    p = h.present
    if p.any():
        s = h.subset(p)
        no_name = np.zeros(len(s.y), bool)
        yes = np.ones(len(s.y), bool)
        res["photo:name_and_photo"] = (fuse(mix, s.t_full, s.has_full, s.img, yes), s.y)
        res["photo:name_only"] = (fuse(mix, s.t_full, s.has_full, s.img, ~yes), s.y)
        res["photo:photo_only"] = (fuse(mix, s.t_full, no_name, s.img, yes), s.y)
        res["photo:leaf_words_removed_and_photo"] = (fuse(mix, s.t_no_leaf, s.has_no_leaf, s.img, yes), s.y)
        res["photo:leaf_words_removed_only"] = (fuse(mix, s.t_no_leaf, s.has_no_leaf, s.img, ~yes), s.y)
    return res


def score(logits: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    if len(y) == 0:
        return {"acc": None, "macro_f1": None}
    pred = logits.argmax(1)
    return {"acc": float((pred == y).mean()),
            "macro_f1": float(f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0))}


def cross_fitted_metrics(h: HeldOut, cfg: "Config") -> dict:
    """Validation metrics with the mix fitted on one half of validation and scored on the other (both
    ways), so the reported figures are not scored on the data the mix was fitted to."""
    halves = np.arange(len(h.y)) % 2
    parts: dict[str, list] = {}
    for k in (0, 1):
        if not (halves == k).any():
            continue
        mix = fit_mix(h.subset(halves != k), cfg)
        for cond, (lg, y) in conditions(mix, h.subset(halves == k)).items():
            parts.setdefault(cond, []).append((lg, y))
    return {cond: score(np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps])) for cond, ps in parts.items()}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T minimising validation NLL of softmax(logits / T) (1-D search over log T: convex enough)."""
    lt, yt = torch.from_numpy(logits).double(), torch.from_numpy(y)
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 200))
    nll = [F.cross_entropy(lt / t, yt).item() for t in grid]
    return float(grid[int(np.argmin(nll))])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def choose_threshold(probs: np.ndarray, y: np.ndarray, max_flagged: float) -> dict:
    """Lowest confidence threshold that halves the error rate of the unflagged items, flagging at most
    `max_flagged`; if halving is out of reach, the threshold that flags exactly `max_flagged`."""
    conf, correct = probs.max(1), probs.argmax(1) == y
    base_err = 1 - correct.mean()
    for t in np.unique(np.round(np.sort(conf), 4)):
        kept = conf >= t
        flagged = 1 - kept.mean()
        if flagged > max_flagged:
            break
        if kept.any() and 1 - correct[kept].mean() <= base_err / 2:
            return coverage_stats(probs, y, float(t))
    return coverage_stats(probs, y, float(np.quantile(conf, max_flagged)))


def coverage_stats(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    conf, correct = probs.max(1), probs.argmax(1) == y
    kept = conf >= threshold
    return {
        "threshold": threshold,
        "flagged": float(1 - kept.mean()),
        "error_all": float(1 - correct.mean()),
        "error_unflagged": float(1 - correct[kept].mean()) if kept.any() else 0.0,
    }


def load_source(dataset: str | None, data_dir: str | None, csv_path: str | None) -> Dataset:
    if csv_path:
        return load_table(csv_path)
    if not dataset:
        raise DataError("give --dataset (with --data-dir) or --csv")
    return load_dataset(dataset, data_dir or "../shared/data")


@dataclass
class Prepared:
    ds: Dataset
    labels: list[str]
    tok_cfg: TokenizerConfig
    tok: Tokenizer
    train: SplitData
    val: SplitData
    val_items: list
    photo_row: dict
    feats: list[np.ndarray]  # pooled photo features per view [n_photos, 1280]
    acts: list  # trunk activations per view [n_photos, C, H, W] (memory-mapped cache)
    label_names: tuple[np.ndarray, np.ndarray]  # padded ids + classes of the labels' own names (text-head prior)


@dataclass
class Names:
    """The text side of a data set: its labels and the tokenizer built from the training names plus the labels' own."""

    labels: list[str]
    label_index: dict
    tok_cfg: TokenizerConfig
    tok: Tokenizer
    words: dict  # item id → tokenised name
    label_words: dict  # label → its words (for "leaf words removed")
    label_names: tuple[np.ndarray, np.ndarray]  # padded ids + classes of the labels' own names (text-head prior)

    def split(self, items, photo_row: dict) -> SplitData:
        return make_split(items, [self.words[it.id] for it in items], self.tok, self.label_index, photo_row, self.label_words)


def prepare_names(ds: Dataset, cfg: "Config", progress: bool = True) -> Names:
    labels = sorted({it.label for it in ds.items})
    base_tok = Tokenizer(TokenizerConfig(max_tokens=cfg.max_tokens))
    words = dict(zip((it.id for it in ds.items), tokenized(base_tok, [it.name for it in ds.items], progress)))
    name_rows, name_y = label_name_rows(labels, base_tok)
    vocab = build_vocab([words[it.id] for it in ds.split("train")] + name_rows, cfg.min_count)
    tok_cfg = TokenizerConfig(max_tokens=cfg.max_tokens, vocab=vocab, oov_buckets=cfg.oov_buckets)
    tok = Tokenizer(tok_cfg)
    return Names(labels, {lab: i for i, lab in enumerate(labels)}, tok_cfg, tok, words,
                 {lab: base_tok.words(lab) for lab in labels}, (tok.pad([_ids(tok, ws) for ws in name_rows]), name_y))


def prepare(ds: Dataset, cfg: "Config", progress: bool = True) -> Prepared:
    train_items, val_items = ds.split("train"), ds.split("val")
    if not train_items or not val_items:
        raise DataError(f"{ds.name}: too few rows for a train and a validation split ({len(ds.items)} rows)")
    names = prepare_names(ds, cfg, progress)

    # photo features of every split at once (one cache entry); the test rows are not used here
    with_photo = [it for it in ds.items if it.image]
    acts, ok = trunk_activations([it.image for it in with_photo], cfg.cut, cfg.views, progress)
    feats = [pooled_features(a, cfg.cut, progress) for a in acts]
    photo_row = {it.id: i for i, it in enumerate(with_photo) if ok[i]}
    if not feats:
        feats = [np.zeros((0, IMAGE_FEATURES), np.float32)]

    train, val = names.split(train_items, photo_row), names.split(val_items, photo_row)
    log.info("%s: %d labels, vocab %d, train %d (%d with photo), val %d", ds.name, len(names.labels),
             len(names.tok_cfg.vocab), len(train.y), int((train.photo >= 0).sum()), len(val.y))
    return Prepared(ds, names.labels, names.tok_cfg, names.tok, train, val, val_items, photo_row, feats, list(acts),
                    names.label_names)


def train_model(dataset, data_dir=None, out_dir="models/model", fast=False, progress=True, csv_path=None, **overrides) -> dict:
    """Train, calibrate and export one model directory; returns its manifest. `dataset` is a name or a Dataset."""
    from training.export import export_model

    t0 = time.time()
    cfg = dataclasses.replace(Config(), **{**(FAST if fast else {}), **overrides})
    torch.set_num_threads(cfg.threads)  # explicit: the cores are shared with other processes
    ds = dataset if isinstance(dataset, Dataset) else load_source(dataset, data_dir, csv_path)
    prep = prepare(ds, cfg, progress)
    # seeded after the features: a cache miss builds the Lite0 tower (random init, then the ImageNet weights),
    # which would shift the fine-tune's dropout draws — a cold and a warm cache must train the same model
    torch.manual_seed(cfg.seed)
    n_labels = len(prep.labels)

    heads = fit_heads(prep.train, prep.feats, prep.tok_cfg.n_ids, n_labels, cfg, prep.acts, progress, prep.label_names)
    h = held_out(heads, prep.val, prep.feats[0])
    val_scores = cross_fitted_metrics(h, cfg)
    mix = fit_mix(h, cfg)
    logits = conditions(mix, h)["name_and_photo"][0]
    temperature = fit_temperature(logits, prep.val.y)
    probs = softmax(logits, temperature)
    coverage = choose_threshold(probs, prep.val.y, cfg.max_flagged)
    val_metrics = validation_metrics(val_scores, prep.val, temperature)
    val_metrics["uncertain"] = coverage
    val_metrics["mix"] = {"name_and_photo": {"text": float(mix[0, 0]), "image": float(mix[0, 1])},
                          "name_only": {"text": float(mix[1, 0])}, "photo_only": {"image": float(mix[2, 1])},
                          "gate": float(mix[3, 0])}
    log.info("validation: %s", val_metrics)

    net = build_net(heads, mix, prep.tok_cfg.n_ids, n_labels, cfg)
    train_seconds = time.time() - t0
    with_int8 = cfg.int8 and (prep.train.photo >= 0).any() and (prep.val.photo >= 0).any()
    manifest = export_model(
        net, temperature, out_dir, ds=ds, labels=prep.labels, tok_cfg=prep.tok_cfg, threshold=coverage["threshold"],
        config=dataclasses.asdict(cfg) | {"fast": fast}, val_metrics=val_metrics, history=[],
        train_seconds=train_seconds, parity_items=_parity_items(prep.val_items, prep.photo_row), tok=prep.tok,
        before_swap=(lambda model_dir: int8_variant(model_dir, prep)) if with_int8 else None,
    )
    if with_int8:
        log.info("int8: %s", manifest["int8"])
    log.info("model written to %s in %.0f s", out_dir, time.time() - t0)
    return manifest


def build_net(heads: Heads, mix: np.ndarray, n_ids: int, n_labels: int, cfg: "Config") -> FusedNet:
    net = FusedNet(n_ids, n_labels, cfg.cut, cfg.pair_space, heads.text.n_rows).eval()
    with torch.no_grad():
        net.text.remap.copy_(torch.from_numpy(heads.text.remap))
        net.text.idf.copy_(torch.from_numpy(heads.text.idf))
        net.text.weight.copy_(torch.from_numpy(heads.text_w))
        net.text.bias.copy_(torch.from_numpy(heads.text_b))
        if heads.tower_state is not None:
            net.image.tower.load_state_dict(heads.tower_state)
        net.image.linear.weight.copy_(torch.from_numpy(heads.image_w.T.copy()))
        net.image.linear.bias.copy_(torch.from_numpy(heads.image_b))
        net.mix.copy_(torch.from_numpy(mix[:3].astype(np.float32)))
        net.gate.fill_(float(mix[3, 0]))
    return net


def validation_metrics(scores: dict, val: SplitData, temperature: float) -> dict:
    """Cross-fitted validation scores, in the layout of earlier manifests (acc_* keys) plus macro-F1."""
    def get(cond, key="acc"):
        return scores[cond][key] if cond in scores else None

    return {
        "n": int(len(val.y)),
        "n_with_photo": int((val.photo >= 0).sum()),
        "temperature": temperature,
        "acc_name_and_photo": get("name_and_photo"),
        "acc_name_only": get("name_only"),
        "macro_f1_name_and_photo": get("name_and_photo", "macro_f1"),
        "photo_items": {
            "acc_name_and_photo": get("photo:name_and_photo"),
            "acc_photo_only": get("photo:photo_only"),
            "acc_leaf_words_removed_and_photo": get("photo:leaf_words_removed_and_photo"),
            "acc_name_only": get("photo:name_only"),
        },
        "conditions": scores,
    }


def int8_variant(model_dir: str, prep: Prepared, max_items: int = 600, n_calib: int = 256) -> dict:
    """Calibrate the int8 graph on training photos, check it on validation photos (name + photo, photo alone)."""
    from common.model import cpu_session
    from training.data import read_image
    from training.export import add_int8

    def photo_batches(items, d: SplitData, n: int, batch: int):
        """(token ids, decoded photos, labels) of the first n photo rows, each photo read once."""
        rows = np.nonzero(d.photo >= 0)[0][:n]
        for s in range(0, len(rows), batch):
            r = rows[s : s + batch]
            yield d.ids[r], np.stack([read_image(items[i].image) for i in r]), d.y[r]

    def feeds(ids, images, names: bool) -> dict:
        return {"token_ids": ids if names else np.zeros_like(ids), "image": images,
                "image_present": np.ones(len(images), np.float32)}

    val = list(photo_batches(prep.val_items, prep.val, max_items, 64))

    def accuracy(path: str) -> dict:
        sess = cpu_session(path, torch.get_num_threads())
        return {cond: float(np.mean(np.concatenate([sess.run(["probs"], feeds(ids, im, names))[0].argmax(1) == y
                                                    for ids, im, y in val])))
                for cond, names in (("name_and_photo", True), ("photo_only", False))}

    # half the calibration batches with their names, half photo alone: both paths are served
    calib = [feeds(ids, im, names=k % 2 == 0)
             for k, (ids, im, _) in enumerate(photo_batches(prep.ds.split("train"), prep.train, n_calib, 16))]
    return add_int8(model_dir, calib, accuracy)


def _parity_items(val_items, photo_row, n: int = 24):
    """Held-out items for the export parity check: some with a photo, some without, one nameless."""
    with_photo = [it for it in val_items if it.id in photo_row][: n // 2]
    without = [it for it in val_items if it.id not in photo_row][: n - len(with_photo)]
    items = with_photo + without
    if items:
        items[0] = dataclasses.replace(items[0], name="")
    return items


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--dataset", help=f"one of: {', '.join(DATASETS)}")
    src.add_argument("--csv", dest="csv_path", help="generic CSV/JSONL: name, category[, id, image, level1..]")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding the data sets")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--fast", action="store_true", help="quick model (a few minutes on 2 cores): one photo view, fewer solver iterations, no int8 graph")
    parser.add_argument("--epochs", type=number(), help="cap the solvers at 25·N L-BFGS iterations (quick runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"epochs": args.epochs} if getattr(args, "epochs", None) else {}
    try:
        manifest = train_model(
            args.dataset, args.data_dir, args.out, fast=args.fast, progress=not args.quiet,
            csv_path=args.csv_path, **overrides,
        )
    except DataError as e:
        print(f"prodcat train: {e}", file=sys.stderr)
        return 2
    v = manifest["validation"]
    print(f"wrote {args.out}: validation acc {v['acc_name_and_photo']:.4f}, T={v['temperature']:.2f}, "
          f"threshold {manifest['threshold']:.3f} flags {v['uncertain']['flagged']:.1%}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
