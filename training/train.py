"""`prodcat train`: data → vocabulary → cached photo features → fused net → temperature + threshold on
validation → ONNX model directory (see training/export.py). The test split is never read here.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from common.tokenize import Tokenizer, TokenizerConfig
from training.data import DATASETS, DataError, Dataset, leaf_words_removed, load_dataset, load_table
from training.features import trunk_activations, tokenized
from training.model import IMAGE_FEATURES, FusedNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    epochs: int = 12
    batch: int = 128
    lr: float = 3e-3  # text, fusion, classifier
    lr_image: float = 5e-4  # the pretrained blocks being fine-tuned
    weight_decay: float = 1e-4
    cut: int = 15  # Lite0 blocks [0, cut) frozen + cached, [cut, 16) + head conv fine-tuned
    views: int = 2  # cached photo views: 1 = as is, 2 = + mirrored (augmentation)
    text_dim: int = 128
    hidden: int = 512
    max_tokens: int = 32
    min_count: int = 2  # rarer training words go to hashed OOV buckets (which they train)
    oov_buckets: int = 2000
    bigram_buckets: int = 50_000  # hashed word pairs, in-graph
    # modality / word dropout (why: robust to a missing name or photo, and to names without the leaf word)
    p_drop_text: float = 0.35  # of items with a photo: train on the photo alone
    p_drop_image: float = 0.4  # of items with a photo: train on the name alone
    p_drop_leaf_words: float = 0.3  # names with the leaf's own words removed (items with a photo)
    p_drop_token: float = 0.05
    label_smoothing: float = 0.05  # some labels are noisy (e.g. Tshirts filed under Belts)
    max_flagged: float = 0.10  # the "uncertain" threshold may flag at most this share of validation
    int8: bool = True  # try an int8 image tower (model.int8.onnx), kept only if validation holds
    seed: int = 0
    threads: int = 2


FAST = dict(epochs=6, views=1, int8=False)


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
    photo: np.ndarray  # int64 [N], row in the activation cache or -1


def _ids(tok: Tokenizer, words: list[str]) -> np.ndarray:
    return np.asarray([tok.token_id(w) for w in words[: tok.config.max_tokens]], dtype=np.int32)


def make_split(items, words, tok, label_index, photo_row, label_words) -> SplitData:
    full = [_ids(tok, w) for w in words]
    no_leaf = [_ids(tok, leaf_words_removed(w, it.label, label_words[it.label])) for it, w in zip(items, words)]
    return SplitData(
        tok.pad(full), tok.pad(no_leaf), np.array([label_index[it.label] for it in items], dtype=np.int64),
        np.array([photo_row.get(it.id, -1) for it in items], dtype=np.int64),
    )


def _image_vectors(net: FusedNet, acts: np.ndarray, rows: np.ndarray, present: np.ndarray) -> torch.Tensor:
    """Pooled image features for the rows that have a (kept) photo; zeros elsewhere."""
    out = torch.zeros(len(rows), IMAGE_FEATURES)
    sel = np.nonzero(present > 0)[0]
    if len(sel):
        out[sel] = net.image.head(torch.from_numpy(acts[rows[sel]].astype(np.float32)))
    return out


@torch.no_grad()
def predict_logits(net: FusedNet, acts: np.ndarray, ids: np.ndarray, photo: np.ndarray, batch: int = 512) -> np.ndarray:
    net.eval()
    out = []
    for s in range(0, len(ids), batch):
        rows = photo[s : s + batch]
        present = (rows >= 0).astype(np.float32)
        vec = _image_vectors(net, acts, rows, present)
        out.append(net(torch.from_numpy(ids[s : s + batch]), vec, torch.from_numpy(present)).numpy())
    return np.concatenate(out) if out else np.zeros((0, net.classifier[-1].out_features), np.float32)


def _augment(d: SplitData, idx: np.ndarray, cfg: Config, rng: np.random.Generator):
    """Batch inputs with word, token and modality dropout."""
    has_photo = d.photo[idx] >= 0
    # leaf words are dropped only where a photo can stand in for them: on name-only items it would
    # just teach the net to guess from brands, at the cost of plain name accuracy
    no_leaf = has_photo & (rng.random(len(idx)) < cfg.p_drop_leaf_words)
    ids = np.where(no_leaf[:, None], d.ids_no_leaf[idx], d.ids[idx])
    ids = np.where(rng.random(ids.shape) < cfg.p_drop_token, 0, ids)
    r = rng.random(len(idx))
    present = (has_photo & (r >= cfg.p_drop_image)).astype(np.float32)
    drop_text = has_photo & (present > 0) & (r >= 1 - cfg.p_drop_text)
    ids[drop_text] = 0
    return ids, present


def train_net(net: FusedNet, train: SplitData, val: SplitData, acts: list[np.ndarray], cfg: Config, progress: bool):
    rng = np.random.default_rng(cfg.seed)
    sparse = [net.text.emb.weight, net.text.wide.weight]
    image_params = [p for n, p in net.named_parameters() if n.startswith("image.") and p.requires_grad]
    other = [p for n, p in net.named_parameters() if not n.startswith(("image.", "text."))]
    opts = [
        torch.optim.AdamW([{"params": other, "lr": cfg.lr}, {"params": image_params, "lr": cfg.lr_image}],
                          weight_decay=cfg.weight_decay),
        torch.optim.SparseAdam(sparse, lr=cfg.lr),
    ]
    steps_per_epoch = math.ceil(len(train.y) / cfg.batch)
    total_steps = cfg.epochs * steps_per_epoch
    base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
    history = []
    for epoch in range(cfg.epochs):
        net.train()
        perm = rng.permutation(len(train.y))
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, mininterval=2)
        total = 0.0
        for step in bar:
            idx = perm[step * cfg.batch : (step + 1) * cfg.batch]
            ids, present = _augment(train, idx, cfg, rng)
            view = acts[rng.integers(len(acts))]
            vec = _image_vectors(net, view, train.photo[idx], present)
            logits = net(torch.from_numpy(ids), vec, torch.from_numpy(present))
            loss = F.cross_entropy(logits, torch.from_numpy(train.y[idx]), label_smoothing=cfg.label_smoothing)
            for o, lrs in zip(opts, base_lrs):
                for g, lr in zip(o.param_groups, lrs):
                    g["lr"] = lr * _lr_factor(epoch * steps_per_epoch + step, total_steps)
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            total += loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total / (step + 1):.3f}")
        acc = float((predict_logits(net, acts[0], val.ids, val.photo).argmax(1) == val.y).mean())
        history.append({"epoch": epoch + 1, "train_loss": total / steps_per_epoch, "val_acc": acc})
        log.info("epoch %d: loss %.4f, val acc %.4f", epoch + 1, total / steps_per_epoch, acc)
    return history


def _lr_factor(step: int, total: int, warmup: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to zero."""
    w = max(1, int(total * warmup))
    return (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


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


def train_model(dataset, data_dir=None, out_dir="models/model", fast=False, progress=True, csv_path=None, **overrides) -> dict:
    """Train, calibrate and export one model directory; returns its manifest. `dataset` is a name or a Dataset."""
    from training.export import export_model

    t0 = time.time()
    cfg = dataclasses.replace(Config(), **{**(FAST if fast else {}), **overrides})
    torch.set_num_threads(cfg.threads)  # explicit: the cores are shared with other processes
    torch.manual_seed(cfg.seed)
    ds = dataset if isinstance(dataset, Dataset) else load_source(dataset, data_dir, csv_path)
    train_items, val_items = ds.split("train"), ds.split("val")
    if not train_items or not val_items:
        raise DataError(f"{ds.name}: too few rows for a train and a validation split ({len(ds.items)} rows)")

    labels = sorted({it.label for it in ds.items})
    label_index = {lab: i for i, lab in enumerate(labels)}
    base_tok = Tokenizer(TokenizerConfig(max_tokens=cfg.max_tokens))
    words = dict(zip((it.id for it in ds.items), tokenized(base_tok, [it.name for it in ds.items], progress)))
    vocab = build_vocab([words[it.id] for it in train_items], cfg.min_count)
    tok_cfg = TokenizerConfig(max_tokens=cfg.max_tokens, vocab=vocab, oov_buckets=cfg.oov_buckets)
    tok = Tokenizer(tok_cfg)
    label_words = {lab: base_tok.words(lab) for lab in labels}

    # photo features of every split at once (one cache entry); the test rows are not used here
    with_photo = [it for it in ds.items if it.image]
    acts, ok = trunk_activations([it.image for it in with_photo], cfg.cut, cfg.views, progress)
    acts = [np.asarray(a) for a in acts]  # into memory: random row access during training
    photo_row = {it.id: i for i, it in enumerate(with_photo) if ok[i]}
    if not acts:
        acts = [np.zeros((0, 1, 1, 1), np.float16)]

    train = make_split(train_items, [words[it.id] for it in train_items], tok, label_index, photo_row, label_words)
    val = make_split(val_items, [words[it.id] for it in val_items], tok, label_index, photo_row, label_words)
    log.info("%s: %d labels, vocab %d, train %d (%d with photo), val %d", ds.name, len(labels), len(vocab),
             len(train.y), int((train.photo >= 0).sum()), len(val.y))

    net = FusedNet(tok_cfg.n_ids, len(labels), cfg.cut, cfg.text_dim, cfg.hidden, bigram_buckets=cfg.bigram_buckets)
    history = train_net(net, train, val, acts, cfg, progress)

    logits = predict_logits(net, acts[0], val.ids, val.photo)
    temperature = fit_temperature(logits, val.y)
    probs = softmax(logits, temperature)
    coverage = choose_threshold(probs, val.y, cfg.max_flagged)
    val_metrics = validation_metrics(net, acts[0], val, temperature)
    val_metrics["uncertain"] = coverage
    train_seconds = time.time() - t0

    manifest = export_model(
        net, temperature, out_dir, ds=ds, labels=labels, tok_cfg=tok_cfg, threshold=coverage["threshold"],
        config=dataclasses.asdict(cfg) | {"fast": fast}, val_metrics=val_metrics, history=history,
        train_seconds=train_seconds, parity_items=_parity_items(val_items, photo_row), tok=tok,
    )
    if cfg.int8 and (val.photo >= 0).any():
        manifest["int8"] = int8_variant(out_dir, val_items, val, photo_row)
        log.info("int8: %s", manifest["int8"])
    log.info("model written to %s in %.0f s", out_dir, time.time() - t0)
    return manifest


def int8_variant(out_dir: str, val_items, val: SplitData, photo_row, max_items: int = 600) -> dict:
    """Calibrate + check the int8 graph on validation photos (name + photo, and photo alone)."""
    import onnxruntime as ort

    from training.data import read_image
    from training.export import add_int8

    rows = np.nonzero(val.photo >= 0)[0][:max_items]
    images = np.stack([read_image(val_items[i].image) for i in rows])
    ids, present = val.ids[rows], np.ones(len(rows), np.float32)

    def feeds(s, e, names=True):
        return {"token_ids": ids[s:e] if names else np.zeros_like(ids[s:e]), "image": images[s:e], "image_present": present[s:e]}

    def accuracy(path: str) -> dict:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        out = {}
        for cond, names in (("name_and_photo", True), ("photo_only", False)):
            p = np.concatenate([sess.run(["probs"], feeds(s, s + 64, names))[0] for s in range(0, len(rows), 64)])
            out[cond] = float((p.argmax(1) == val.y[rows]).mean())
        return out

    calib = [feeds(s, s + 16, names=s % 32 == 0) for s in range(0, min(len(rows), 256), 16)]
    return add_int8(out_dir, calib, accuracy)


def _parity_items(val_items, photo_row, n: int = 24):
    """Held-out items for the export parity check: some with a photo, some without, one nameless."""
    with_photo = [it for it in val_items if it.id in photo_row][: n // 2]
    without = [it for it in val_items if it.id not in photo_row][: n - len(with_photo)]
    items = with_photo + without
    if items:
        items[0] = dataclasses.replace(items[0], name="")
    return items


def validation_metrics(net, acts, val: SplitData, temperature: float) -> dict:
    def acc(ids, photo, rows=slice(None)):
        if len(val.y[rows]) == 0:
            return None
        return float((predict_logits(net, acts, ids[rows], photo[rows]).argmax(1) == val.y[rows]).mean())

    has = np.nonzero(val.photo >= 0)[0]
    no_photo = np.full(len(val.y), -1)
    return {
        "n": int(len(val.y)),
        "n_with_photo": int(len(has)),
        "temperature": temperature,
        "acc_name_and_photo": acc(val.ids, val.photo),
        "acc_name_only": acc(val.ids, no_photo),
        "photo_items": {
            "acc_name_and_photo": acc(val.ids, val.photo, has),
            "acc_photo_only": acc(np.zeros_like(val.ids), val.photo, has),
            "acc_leaf_words_removed_and_photo": acc(val.ids_no_leaf, val.photo, has),
            "acc_name_only": acc(val.ids, no_photo, has),
        },
    }


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--dataset", help=f"one of: {', '.join(DATASETS)}")
    src.add_argument("--csv", dest="csv_path", help="generic CSV/JSONL: name, category[, id, image, level1..]")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding the data sets")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--fast", action="store_true", help="quick model (≤10 min on 2 cores): fewer epochs, no fine-tuned blocks")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
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
