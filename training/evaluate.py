"""`prodcat evaluate`: score a model directory exactly as served (common.model.Classifier on ONNX
Runtime) on one split, with ablations and baselines on the same items, into summary.md + metrics.json
+ plots.

Conditions: the split as it is (name + photo where one exists) and name only; on the items that
have a photo: name + photo, photo only, name with the leaf's own words removed (+ photo / alone).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from common.model import PRECISIONS
from training.data import DATASETS, DataError, leaf_words_removed, read_image
from training.train import load_source

log = logging.getLogger(__name__)
ECE_BINS = 15


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins, and the bins (for the diagram)."""
    conf, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    total, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(conf[m].mean() - correct[m].mean())
            table.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "conf": float(conf[m].mean()),
                          "acc": float(correct[m].mean())})
    return float(total), table


def scores(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true)  # macro-F1 over the classes that occur in this split
    return {"n": int(len(y_true)), "acc": float((y_true == y_pred).mean()) if len(y_true) else None,
            "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)) if len(y_true) else None}


def level_scores(items, pred_labels, parents: dict, levels) -> dict:
    """Accuracy / macro-F1 at every taxonomy level: a predicted leaf implies its parents."""
    out = {}
    depth = len(levels)
    if any(len(it.path) != depth for it in items):  # data of another taxonomy's depth: only the leaves compare
        return {levels[-1]: scores([it.label for it in items], pred_labels)}

    def root_first(leaf):
        path = [*reversed(parents.get(leaf, [])), leaf]
        return path if len(path) == depth else ["?"] * (depth - 1) + [leaf]

    pred_paths = [root_first(p) for p in pred_labels]
    for lv, name in enumerate(levels):
        out[name] = scores([it.path[lv] for it in items], [p[lv] for p in pred_paths])
    return out


def run_classifier(clf, token_ids, images, batch: int = 64) -> np.ndarray:
    return np.concatenate([clf.run(token_ids[s : s + batch], images[s : s + batch]) for s in range(0, len(token_ids), batch)])


def evaluate(model_dir, dataset=None, data_dir=None, csv_path=None, split="test", report_dir=None, baselines=True,
             threads=2, precision="auto", providers="auto") -> dict:
    import torch

    from common.model import Classifier
    from common.tokenize import Tokenizer, TokenizerConfig
    from training.features import tokenized, trunk_activations

    torch.set_num_threads(threads)
    t0 = time.time()
    clf = Classifier(model_dir, providers=providers, intra_op_threads=threads, precision=precision)
    man = clf.manifest
    ds = load_source(dataset or (None if csv_path else man.raw.get("dataset")), data_dir, csv_path)
    items = ds.split(split)
    if not items:
        raise DataError(f"{ds.name}: the {split} split is empty")
    labels = list(man.labels)
    index = {lab: i for i, lab in enumerate(labels)}
    split_labels = {it.label for it in items}
    unknown = sorted(split_labels - set(index))
    if len(unknown) == len(split_labels):
        raise DataError(f"{ds.name}: none of its {split} labels ({', '.join(unknown[:3])}, …) is a category of model "
                        f"{man.model_version} (trained on {man.raw.get('dataset', 'other data')}): every prediction "
                        "would be wrong — evaluate a model on the data it was trained for")
    if unknown:
        log.warning("%d %s labels unknown to the model (always wrong): %s", len(unknown), split, unknown[:5])
    y = np.array([index.get(it.label, -1) for it in items])

    tok = clf.tokenizer
    words = [tok.words(it.name) for it in items]
    ids = [np.asarray([tok.token_id(w) for w in ws[: tok.config.max_tokens]], np.int32) for ws in words]
    label_words = {lab: tok.words(lab) for lab in split_labels}
    no_leaf_words = [leaf_words_removed(ws, it.label, label_words[it.label]) for ws, it in zip(words, items)]
    ids_no_leaf = [np.asarray([tok.token_id(w) for w in ws[: tok.config.max_tokens]], np.int32) for ws in no_leaf_words]
    images = [read_image(it.image) if it.image else None for it in items]
    has = [i for i, im in enumerate(images) if im is not None]
    empty = [np.zeros(0, np.int32)] * len(items)
    none = [None] * len(items)

    def sub(seq, rows):
        return [seq[i] for i in rows]

    probs = {"name_and_photo": run_classifier(clf, ids, images), "name_only": run_classifier(clf, ids, none)}
    if has:
        probs["photo:name_and_photo"] = probs["name_and_photo"][has]
        probs["photo:name_only"] = probs["name_only"][has]
        probs["photo:photo_only"] = run_classifier(clf, sub(empty, has), sub(images, has))
        probs["photo:leaf_words_removed_and_photo"] = run_classifier(clf, sub(ids_no_leaf, has), sub(images, has))
        probs["photo:leaf_words_removed_only"] = run_classifier(clf, sub(ids_no_leaf, has), sub(none, has))
    if len(probs) == 2:  # no photos at all: the words-removed ablation on the names
        probs["leaf_words_removed_only"] = run_classifier(clf, ids_no_leaf, none)

    metrics = {"model_dir": os.path.abspath(model_dir), "model_version": man.model_version, "dataset": ds.name,
               "split": split, "n": len(items), "n_with_photo": len(has), "conditions": {}}
    for cond, p in probs.items():
        yy = y[has] if cond.startswith("photo:") else y
        e, bins = ece(p, yy)
        conf = p.max(1)
        flagged = conf < man.threshold
        correct = p.argmax(1) == yy
        metrics["conditions"][cond] = {
            **scores(yy, p.argmax(1)), "ece": e,
            "uncertain": {"threshold": man.threshold, "flagged": float(flagged.mean()),
                          "error_all": float(1 - correct.mean()),
                          "error_unflagged": float(1 - correct[~flagged].mean()) if (~flagged).any() else None},
        }
    main = probs["name_and_photo"]
    pred_labels = [labels[i] for i in main.argmax(1)]
    metrics["levels"] = level_scores(items, pred_labels, man.parents, man.levels)
    metrics["reliability"] = ece(main, y)[1]
    metrics["per_class"] = per_class(items, pred_labels)

    metrics["precision"], metrics["provider"] = clf.precision, clf.provider
    if clf.provider != "CPU":  # another runtime (OpenVINO) or device: does it answer like ORT's CPU provider?
        ref = run_classifier(Classifier(model_dir, "cpu", threads, precision=clf.precision), ids, images)
        metrics["onnxruntime_cpu"] = {"name_and_photo": scores(y, ref.argmax(1)),
                                      "top1_agreement": float((ref.argmax(1) == main.argmax(1)).mean()),
                                      "max_abs_prob_diff": float(np.abs(ref - main).max())}
    if clf.precision == "int8":  # what the quantization costs: the same rows through the fp32 graph
        fp32 = Classifier(model_dir, providers=providers, intra_op_threads=threads, precision="fp32")
        metrics["fp32"] = {"name_and_photo": scores(y, run_classifier(fp32, ids, images).argmax(1))}
        if has:
            metrics["fp32"]["photo:photo_only"] = scores(y[has], run_classifier(fp32, sub(empty, has), sub(images, has)).argmax(1))
            metrics["fp32"]["photo:leaf_words_removed_and_photo"] = scores(
                y[has], run_classifier(fp32, sub(ids_no_leaf, has), sub(images, has)).argmax(1))

    if baselines:
        train_items = ds.split("train")
        base_tok = Tokenizer(TokenizerConfig(max_tokens=tok.config.max_tokens, korean_tagger=tok.config.korean_tagger))
        train_words = tokenized(base_tok, [it.name for it in train_items], progress=False)
        train_y = np.array([index.get(it.label, -1) for it in train_items])
        from training.baselines import frozen_image_features, image_knn, name_svm

        name_svm_preds = name_svm(train_words, train_y, words)
        svm = {"all": scores(y, name_svm_preds)}
        if has:
            svm["photo_items"] = scores(y[has], name_svm_preds[has])
            svm["photo_items_leaf_words_removed"] = scores(y[has], name_svm(train_words, train_y, sub(no_leaf_words, has)))
        metrics["baselines"] = {"name_tfidf_linearsvc": svm}
        if has:
            # the same photo list as training, so the cached trunk activations are reused
            with_photo = [it for it in ds.items if it.image]
            cut = int(man.raw.get("config", {}).get("cut", 15))
            acts, ok = trunk_activations([it.image for it in with_photo], cut, 1, progress=False)
            row = {it.id: i for i, it in enumerate(with_photo) if ok[i]}
            tr_rows = [(row[it.id], index.get(it.label, -1)) for it in train_items if it.id in row]
            te_rows = [row.get(items[i].id, -1) for i in has]
            if tr_rows and min(te_rows) >= 0:
                feats = frozen_image_features(acts[0], cut)
                knn = image_knn(feats[[r for r, _ in tr_rows]], np.array([l for _, l in tr_rows]), feats[te_rows])
                metrics["baselines"]["photo_frozen_lite0_knn5"] = {"photo_items": scores(y[has], knn)}
    metrics["seconds"] = round(time.time() - t0, 1)

    if report_dir:
        write_report(report_dir, metrics, y, main, labels)
    return metrics


def per_class(items, pred_labels) -> list[dict]:
    true = [it.label for it in items]
    rows = []
    for lab in sorted(set(true)):
        t = np.array([x == lab for x in true])
        p = np.array([x == lab for x in pred_labels])
        tp = int((t & p).sum())
        prec = tp / p.sum() if p.sum() else 0.0
        rec = tp / t.sum()
        rows.append({"label": lab, "support": int(t.sum()), "precision": float(prec), "recall": float(rec),
                     "f1": float(2 * prec * rec / (prec + rec)) if prec + rec else 0.0})
    return sorted(rows, key=lambda r: -r["support"])


# ---------------------------------------------------------------- report


def write_report(report_dir, metrics, y, probs, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, ensure_ascii=False, indent=1)

    # confusion matrix over the classes seen in the split, rows normalised
    present = np.unique(y[y >= 0])
    cm = confusion_matrix(y, probs.argmax(1), labels=present).astype(float)
    cm /= np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(6, 0.12 * len(present))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(present)), [labels[i] for i in present], rotation=90, fontsize=6)
    ax.set_yticks(range(len(present)), [labels[i] for i in present], fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{metrics['dataset']} {metrics['split']}: confusion (row-normalised), name + photo")
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, "confusion.png"), dpi=120)
    plt.close(fig)

    bins = metrics["reliability"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.bar([b["conf"] for b in bins], [b["acc"] for b in bins], width=1 / ECE_BINS, alpha=0.6, edgecolor="k")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, ECE {metrics['conditions']['name_and_photo']['ece']:.4f}")
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, "reliability.png"), dpi=120)
    plt.close(fig)

    with open(os.path.join(report_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(metrics))


def _f(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def summary_markdown(m: dict) -> str:
    c = m["conditions"]
    lines = [
        f"# Evaluation: {m['dataset']} / {m['split']} split",
        "",
        f"Model `{m['model_version']}`, run exactly as served on CPU ({m.get('precision', 'fp32')} graph, "
        f"{_runtime(m.get('provider', 'CPU'))}). {m['n']} items, "
        f"{m['n_with_photo']} with a photo. Rows marked *photo items* use only the items that have a photo.",
        "",
        "| condition | n | accuracy | macro-F1 | ECE | flagged uncertain | error of the rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for cond, s in c.items():
        u = s["uncertain"]
        name = cond.replace("photo:", "*photo items:* ").replace("_", " ")
        lines.append(f"| {name} | {s['n']} | {_f(s['acc'])} | {_f(s['macro_f1'])} | {_f(s['ece'])} | "
                     f"{u['flagged']:.1%} | {_f(u['error_unflagged'])} (all: {_f(u['error_all'])}) |")
    lines += comparison_lines(m)
    lines += ["", "## Taxonomy levels (name + photo)", "", "| level | accuracy | macro-F1 |", "|---|---|---|"]
    lines += [f"| {lv} | {_f(s['acc'])} | {_f(s['macro_f1'])} |" for lv, s in m["levels"].items()]
    if "baselines" in m:
        lines += ["", "## Baselines (same split, trained on the train split)", "", "| baseline | items | n | accuracy | macro-F1 |",
                  "|---|---|---|---|---|"]
        for b, subsets in m["baselines"].items():
            lines += [f"| {b} | {k} | {s['n']} | {_f(s['acc'])} | {_f(s['macro_f1'])} |" for k, s in subsets.items()]
    if "onnxruntime_cpu" in m:
        ref = m["onnxruntime_cpu"]
        lines += ["", f"The same graph through ONNX Runtime's CPU provider: accuracy {_f(ref['name_and_photo']['acc'])}, "
                      f"top-1 agreement {ref['top1_agreement']:.4f}, largest probability difference {ref['max_abs_prob_diff']:.4f}."]
    if "fp32" in m:
        lines += ["", "## int8 graph (served on CPU) against the fp32 graph", "", "| condition | int8 accuracy | fp32 accuracy |",
                  "|---|---|---|"]
        lines += [f"| {k.replace('photo:', '*photo items:* ').replace('_', ' ')} | {_f(c[k]['acc'])} | {_f(s['acc'])} |"
                  for k, s in m["fp32"].items()]
    worst = sorted((r for r in m["per_class"] if r["support"] >= 5), key=lambda r: r["f1"])[:8]
    lines += ["", "## Weakest classes (support ≥ 5; full table in metrics.json)", "", "| class | support | precision | recall | F1 |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['support']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |" for r in worst]
    lines += ["", "Plots: `confusion.png`, `reliability.png` (name + photo).", ""]
    return "\n".join(lines)


COMPARISONS = [  # (items, model condition, baseline, baseline subset)
    ("all items, as served (name + photo where there is one)", "name_and_photo", "name_tfidf_linearsvc", "all"),
    ("all items, name only", "name_only", "name_tfidf_linearsvc", "all"),
    ("photo items, name + photo", "photo:name_and_photo", "name_tfidf_linearsvc", "photo_items"),
    ("photo items, leaf words removed from the name", "photo:leaf_words_removed_and_photo", "name_tfidf_linearsvc",
     "photo_items_leaf_words_removed"),
    ("photo items, photo only", "photo:photo_only", "photo_frozen_lite0_knn5", "photo_items"),
]


def comparison_lines(m: dict) -> list[str]:
    """The fused model beside the baselines on exactly the same items."""
    base = m.get("baselines")
    if not base:
        return []
    lines = ["", "## Fused model vs baselines (same items)", "",
             "| items | n | model: accuracy | model: macro-F1 | baseline | baseline: accuracy | baseline: macro-F1 | Δ accuracy | Δ macro-F1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for items, cond, b, subset in COMPARISONS:
        s, bs = m["conditions"].get(cond), base.get(b, {}).get(subset)
        if not s or not bs:
            continue
        lines.append(f"| {items} | {s['n']} | {_f(s['acc'])} | {_f(s['macro_f1'])} | {b} | {_f(bs['acc'])} | {_f(bs['macro_f1'])} | "
                     f"{s['acc'] - bs['acc']:+.4f} | {s['macro_f1'] - bs['macro_f1']:+.4f} |")
    photo = m["conditions"].get("photo:name_and_photo")
    if photo:
        best = max(m["conditions"]["photo:name_only"]["acc"], m["conditions"]["photo:photo_only"]["acc"])
        lines += ["", f"On the photo items the fused model scores {photo['acc']:.4f}, its best single input "
                      f"{best:.4f} ({photo['acc'] - best:+.4f}): adding the photo "
                      f"{'helps' if photo['acc'] > best else 'does not help'}."]
    return lines


# ---------------------------------------------------------------- CLI


def _runtime(provider: str) -> str:
    return "ONNX Runtime" if provider == "CPU" else f"{provider} ({'OpenVINO runtime' if provider == 'OpenVINO' else 'ONNX Runtime provider'})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--dataset", help=f"one of: {', '.join(DATASETS)} (default: the manifest's)")
    src.add_argument("--csv", dest="csv_path", help="generic CSV/JSONL")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--report", help="folder for summary.md, metrics.json and plots")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="graph to score (auto = as served on CPU)")
    parser.add_argument("--providers", default="auto", help="runtime to score it on (auto = as served: OpenVINO on CPU "
                        "where installed, else ONNX Runtime); other than ORT's CPU, agreement with it is reported too")


def run(args: argparse.Namespace) -> int:
    from common.model import ModelError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        m = evaluate(args.model, args.dataset, args.data_dir, args.csv_path, args.split, args.report,
                     baselines=not args.no_baselines, precision=args.precision, providers=args.providers)
    except (DataError, ModelError) as e:
        print(f"prodcat evaluate: {e}", file=sys.stderr)
        return 2
    if args.report:
        print(open(os.path.join(args.report, "summary.md"), encoding="utf-8").read())
    else:
        print(json.dumps(m["conditions"], indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
