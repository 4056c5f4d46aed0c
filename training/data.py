"""Training data: loaders for the shared data sets and for a generic CSV / JSONL, and the splits.

Every loader returns a `Dataset` of `Item`s: id, name, leaf label, the root-first category path,
and an optional image reference (a file path or an http(s)/file URL).

Splits are deterministic and need no stored file: sha1("<dataset>:<id>") → bucket 0..99;
buckets 0–79 train, 80–89 validation, 90–99 test. The same id always lands in the same split,
whatever else is in the file. kr_shop has no id column, so the id is the title itself: duplicate
titles share a split and cannot leak from train into test.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from common.model import file_sha256

DATASETS = ("myntra", "kr_shop")
SPLITS = ("train", "val", "test")


class DataError(Exception):
    """The data cannot be loaded; the message says what to fix (shown without a traceback)."""


@dataclass(frozen=True)
class Item:
    id: str
    name: str
    label: str  # the leaf category
    path: tuple[str, ...]  # root → leaf, the last element is `label`
    image: str | None = None  # absolute file path or URL


@dataclass
class Dataset:
    name: str
    items: list[Item]
    levels: tuple[str, ...]  # names of the taxonomy levels, root first
    fingerprint: str  # sha256 of the source file(s): which data a model was trained on
    sources: list[str] = field(default_factory=list)

    def split(self, which: str) -> list[Item]:
        return [it for it in self.items if split_of(self.name, it.id) == which]

    def labels(self) -> list[str]:
        return sorted({it.label for it in self.items})

    def parents(self) -> dict[str, list[str]]:
        """leaf → [parent, grandparent, …]; the most frequent path wins (the data has a few strays)."""
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for it in self.items:
            counts[it.label][it.path[:-1]] += 1
        return {leaf: list(reversed(c.most_common(1)[0][0])) for leaf, c in counts.items()}


def split_of(dataset: str, item_id: str) -> str:
    bucket = int(hashlib.sha1(f"{dataset}:{item_id}".encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def _read_csv_rows(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as UTF-8 CSV: {e}") from None


def load_dataset(name: str, data_dir: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or use --csv")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist")
    return {"myntra": _load_myntra, "kr_shop": _load_kr_shop}[name](os.path.join(data_dir, name))


def _load_myntra(root: str) -> Dataset:
    path = os.path.join(root, "products.csv")
    items = []
    for r in _read_csv_rows(path):
        image = os.path.join(root, r["image"]) if r.get("image") else None
        cat = (r["masterCategory"], r["subCategory"], r["articleType"])
        items.append(Item(r["id"], r["name"], r["articleType"], cat, image))
    return Dataset("myntra", items, ("masterCategory", "subCategory", "articleType"), file_sha256(path), [path])


def _load_kr_shop(root: str) -> Dataset:
    path = os.path.join(root, "titles.csv")
    items = [Item(r["name"], r["name"], r["category"], (r["category"],)) for r in _read_csv_rows(path)]
    return Dataset("kr_shop", items, ("category",), file_sha256(path), [path])


def load_table(path: str) -> Dataset:
    """Generic CSV or JSONL (by extension).

    Columns / keys: `name` (required), `category` (required, the leaf), `id` (optional; default the
    row number), `image` (optional: path relative to the file, or a URL), and optional parent levels
    `level1`, `level2`, … root first (the leaf is `category`). Split name = the file's base name.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if path.endswith((".jsonl", ".ndjson")):
        rows = _read_jsonl(path)
    else:
        rows = _read_csv_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    missing = {"name", "category"} - set(rows[0])
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} (have: {', '.join(rows[0])})")
    level_cols = sorted((k for k in rows[0] if k.startswith("level") and k[5:].isdigit()), key=lambda k: int(k[5:]))
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for n, r in enumerate(rows, start=2 if not path.endswith((".jsonl", ".ndjson")) else 1):
        label = str(r.get("category") or "").strip()
        if not label:
            raise DataError(f"{path}: row {n} has an empty category")
        image = str(r.get("image") or "").strip() or None
        if image and "://" not in image:
            image = os.path.join(base, image)
        parents = tuple(str(r.get(c) or "").strip() for c in level_cols)
        if any(not p for p in parents):
            raise DataError(f"{path}: row {n} has an empty {'/'.join(level_cols)} value")
        items.append(Item(str(r.get("id") or n), str(r.get("name") or ""), label, (*parents, label), image))
    levels = (*level_cols, "category")
    dataset = os.path.splitext(os.path.basename(path))[0]
    return Dataset(dataset, items, levels, file_sha256(path), [path])


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}: line {n} is not JSON: {e}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {n} is not a JSON object")
                rows.append(row)
    return rows


def read_image_bytes(ref: str) -> bytes:
    """Image reference (a path, or a URL fetched with the worker's own code) → encoded bytes."""
    from common.images import FetchPolicy, fetch_image

    if "://" in ref:
        return fetch_image(ref, FetchPolicy(allow_private_addresses=True))
    with open(ref, "rb") as f:
        return f.read()


def read_image(ref: str) -> np.ndarray:
    """Image reference → uint8 (224, 224, 3), through the same code the preprocess worker uses."""
    from common.images import decode_resize

    return decode_resize(read_image_bytes(ref))


def leaf_words_removed(words: list[str], label: str, label_words: list[str]) -> list[str]:
    """Drop the leaf's own words from a tokenised name ("black casual shoes" − "Casual Shoes" → "black").

    Matches singular/plural and a word split in two ("t shirt" for "Tshirts").
    """
    stems = set().union(*(_variants(w) for w in [*label_words, "".join(label_words)]))
    keep, i = [], 0
    while i < len(words):
        if i + 1 < len(words) and _variants(words[i] + words[i + 1]) & stems:
            i += 2
        elif _variants(words[i]) & stems:
            i += 1
        else:
            keep.append(words[i])
            i += 1
    return keep


def singular(w: str) -> str:
    """English singular of a label word: "shoes" → shoe, "dresses" → dress, "watches" → watch, "jeans" → jean."""
    if w.endswith(("sses", "ches", "shes", "xes")) and len(w) > 5:
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        return w[:-1]
    return w


def _variants(w: str) -> set[str]:
    """The word and its possible singulars ("shoes" → shoe, "dresses" → dress)."""
    out = {w}
    for suffix in ("s", "es"):
        if w.endswith(suffix) and len(w) > len(suffix) + 2:
            out.add(w[: -len(suffix)])
    return out
