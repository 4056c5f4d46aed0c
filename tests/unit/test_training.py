"""Fast checks of the training package on generated data (no shared data set needed)."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # plain `pytest` from anywhere

from training.data import DataError, Item, leaf_words_removed, load_table, split_of  # noqa: E402
from training.train import build_vocab, choose_threshold, fit_temperature, softmax  # noqa: E402

COLOURS = {"Shirts": (200, 30, 30), "Shoes": (30, 200, 30), "Watches": (30, 30, 200)}
PARENTS = {"Shirts": "Apparel", "Shoes": "Footwear", "Watches": "Accessories"}
WORDS = {"Shirts": ["cotton", "collar", "shirt"], "Shoes": ["running", "lace", "shoes"], "Watches": ["dial", "strap", "watch"]}


def test_split_is_deterministic_disjoint_and_80_10_10():
    ids = [str(i) for i in range(20_000)]
    first = [split_of("myntra", i) for i in ids]
    assert first == [split_of("myntra", i) for i in ids]  # same id → same split, every time
    share = {s: first.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.02 and abs(share["val"] - 0.1) < 0.01 and abs(share["test"] - 0.1) < 0.01
    # the data set name is part of the key: another data set shuffles differently
    assert first != [split_of("kr_shop", i) for i in ids]


def test_vocabulary_is_frequency_ordered_with_min_count():
    vocab = build_vocab([["b", "a"], ["a", "c"], ["a", "b"], ["d"]], min_count=2)
    assert vocab == ("a", "b")


def test_leaf_words_removed():
    assert leaf_words_removed(["black", "casual", "shoes"], "Casual Shoes", ["casual", "shoes"]) == ["black"]
    assert leaf_words_removed(["polo", "t", "shirt"], "Tshirts", ["tshirts"]) == ["polo"]


def test_threshold_and_temperature_on_known_cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3))
    logits[np.arange(2000), y] += 3.0
    # the fitted T follows the logits' scale: 4× sharper logits need a 4× larger T
    assert fit_temperature(logits * 4, y) == pytest.approx(4 * fit_temperature(logits, y), rel=0.05)
    cov = choose_threshold(softmax(logits), y, max_flagged=0.3)
    assert cov["flagged"] <= 0.3 and cov["error_unflagged"] < cov["error_all"]


def _write_dataset(tmp_path, n_per_class=16) -> str:
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    rows = []
    for label, colour in COLOURS.items():
        for k in range(n_per_class):
            item_id = f"{label}-{k}"
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
            image = ""
            if k % 2 == 0:  # half the items have a photo
                image = f"img/{item_id}.jpg"
                Image.fromarray(pixels).save(tmp_path / image, quality=90)
            name = " ".join(rng.permutation(WORDS[label])[:2]) + f" model {k}"
            rows.append({"id": item_id, "name": name, "image": image, "level1": PARENTS[label], "category": label})
    path = tmp_path / "products.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run through the --csv path (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("train")
    csv_path = _write_dataset(tmp)
    from training.train import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp / "model"
    args = parser.parse_args(["--csv", csv_path, "--out", str(out), "--fast", "--epochs", "3", "--quiet"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRODCAT_CACHE", str(tmp / "cache"))  # a cold, private cache
        assert run(args) == 0
    return csv_path, str(out)


def test_tiny_training_exports_a_servable_model(trained):
    from common.model import Classifier

    csv_path, model_dir = trained
    manifest = json.load(open(os.path.join(model_dir, "manifest.json"), encoding="utf-8"))
    assert manifest["labels"] == sorted(COLOURS)
    assert manifest["hierarchy"]["parents"]["Shoes"] == ["Footwear"]
    assert manifest["onnx"]["parity"]["probs_max_abs_diff"] <= manifest["onnx"]["parity"]["tolerance_abs"]
    assert len(manifest["training_data"]["fingerprint_sha256"]) == 64

    clf = Classifier(model_dir)
    ds = load_table(csv_path)
    items = ds.items[:5] + [Item("x", "", "Shoes", ("Footwear", "Shoes"))]  # includes a nameless, photoless one
    from training.data import read_image

    ids = [clf.tokenizer.encode(it.name) for it in items]
    images = [read_image(it.image) if it.image else None for it in items]
    probs = clf.run(ids, images)
    assert probs.shape == (len(items), 3)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    preds = clf.predictions(probs)
    assert len(preds) == len(items) and preds[0].category_path[-1] in PARENTS.values()
    # OpenVINO serves the exported graph (its word-pair hash is a BitwiseAnd, not a Mod it would compute through
    # float32) and answers as ORT does, pairs of the highest token ids included
    ov, ort_cpu = Classifier(model_dir, "openvino", 2), Classifier(model_dir, "cpu", 2)
    top = clf.tokenizer.config.n_ids - 1
    ids += [np.array([top, top - 1, top, 2], np.int32)]
    images += [None]
    assert ov.provider == "OpenVINO" and np.allclose(ov.run(ids, images), ort_cpu.run(ids, images), atol=1e-4)


def test_a_warm_feature_cache_trains_the_same_model(trained, tmp_path, monkeypatch):
    """The fixture trained on a cold cache; the same data again on the now warm cache gives the same graph."""
    from training.train import train_model

    csv_path, model_dir = trained
    monkeypatch.setenv("PRODCAT_CACHE", os.path.join(os.path.dirname(model_dir), "cache"))
    again = train_model(None, out_dir=str(tmp_path / "again"), fast=True, progress=False, csv_path=csv_path, epochs=3)
    first = json.load(open(os.path.join(model_dir, "manifest.json"), encoding="utf-8"))
    assert again["onnx"]["sha256"] == first["onnx"]["sha256"]


def test_onnx_matches_torch_within_tolerance():
    import torch

    from training.export import PARITY_ATOL, check_parity, export_onnx
    from training.model import FusedNet, ServingGraph

    torch.manual_seed(0)
    net = FusedNet(n_ids=50, n_labels=4, cut=15, pair_space=16, n_rows=40).eval()
    with torch.no_grad():  # random heads: the graph must agree on every path, not only on zeros
        net.text.remap.copy_(torch.randint(0, 40, net.text.remap.shape, dtype=torch.int32))
        net.text.idf.uniform_(0.5, 3.0)
        net.text.idf[0] = 0
        net.text.weight.copy_(torch.randn(net.text.weight.shape).half())
        net.image.linear.weight.normal_(0, 0.05)
        net.mix.copy_(torch.tensor([[0.8, 0.6], [1.1, 0.0], [0.0, 1.3]]))
    graph = ServingGraph(net, temperature=1.5).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        export_onnx(graph, path, max_tokens=8)
        rng = np.random.default_rng(0)
        feeds = {
            "token_ids": rng.integers(0, 50, (3, 8)).astype(np.int64),
            "image": rng.integers(0, 255, (3, 224, 224, 3)).astype(np.uint8),
            "image_present": np.array([1, 0, 1], np.float32),
        }
        feeds["token_ids"][1] = 0  # no name
        diff = check_parity(graph, path, feeds)
    assert diff["probs_max_abs_diff"] <= PARITY_ATOL and diff["argmax_agree"] == 1.0


@pytest.mark.parametrize(
    "content, message",
    [
        ("title,label\nfoo,bar\n", "missing column(s) category, name"),
        ("name,category\nfoo,\n", "row 2 has an empty category"),
        ("", "no rows"),
    ],
)
def test_bad_csv_gives_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_table(str(path))

    from training.train import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--csv", str(path), "--out", str(tmp_path / "m"), "--quiet"])) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_dataset_and_missing_dir_are_clear_errors(tmp_path, capsys):
    from training.train import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--dataset", "nope", "--out", str(tmp_path / "m")])) != 0
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert run(parser.parse_args(["--dataset", "myntra", "--data-dir", str(tmp_path / "absent"), "--out", "x"])) != 0
    assert "does not exist" in capsys.readouterr().err


def test_text_features_in_training_match_the_graph():
    """The sparse TF-IDF matrix the text head is trained on = what the exported TextHead computes."""
    import dataclasses

    import torch

    from training.model import TextHead
    from training.train import Config, Heads, fit_text_features

    rng = np.random.default_rng(0)
    ids = rng.integers(2, 30, (40, 8))
    for row, n in zip(ids, rng.integers(0, 9, 40)):
        row[n:] = 0  # padding, including an empty name
    cfg = dataclasses.replace(Config(), pair_space=64, pair_min_count=2)
    text = fit_text_features(ids[:30], 30, cfg)
    w = rng.normal(size=(text.n_rows, 5)).astype(np.float16)
    heads = Heads(text, w, rng.normal(size=5).astype(np.float32), np.zeros((1280, 5), np.float32), np.zeros(5, np.float32))
    head = TextHead(30, 64, text.n_rows, 5)
    with torch.no_grad():
        head.remap.copy_(torch.from_numpy(text.remap))
        head.idf.copy_(torch.from_numpy(text.idf))
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(heads.text_b))
        t_logits, t_has = head(torch.from_numpy(ids))
    logits, has = heads.text_logits(ids)
    assert np.array_equal(has, t_has.numpy() > 0) and not has[(ids == 0).all(1)].any()
    assert np.allclose(logits, t_logits.numpy(), atol=1e-4)


def test_label_names_teach_the_text_head_a_class_its_items_never_name():
    """A class with one item whose name lacks the class's words is still found by them: its label is a row."""
    from common.tokenize import Tokenizer, TokenizerConfig
    from training.train import Config, SplitData, _ids, fit_heads, label_name_rows

    labels = ["Key chain", "Shirts", "Watches"]
    names = [("metal ring silver", 0)] + [(f"cotton collar shirt {k}", 1) for k in range(20)] \
        + [(f"dial strap watch {k}", 2) for k in range(20)]
    base = Tokenizer()
    rows, row_y = label_name_rows(labels, base)
    assert rows == [["key", "chain"], ["shirts"], ["shirt"], ["watches"], ["watch"]] and list(row_y) == [0, 1, 1, 2, 2]
    words = [base.words(n) for n, _ in names]
    tok = Tokenizer(TokenizerConfig(vocab=build_vocab(words + rows, min_count=1)))
    train = SplitData(tok.pad([_ids(tok, w) for w in words]), tok.pad([_ids(tok, w) for w in words]),
                      np.array([y for _, y in names]), np.full(len(names), -1))
    prior = (tok.pad([_ids(tok, w) for w in rows]), row_y)
    query = tok.pad([_ids(tok, base.words("leather key chain"))])

    def predicted(cfg_overrides: dict) -> int:
        heads = fit_heads(train, [np.zeros((0, 1280), np.float32)], tok.config.n_ids, 3,
                          dataclasses.replace(Config(), **cfg_overrides), label_names=prior)
        return int(heads.text_logits(query)[0].argmax())

    assert predicted({}) == 0
    assert predicted({"label_name_weight": 0.0}) != 0  # without the label rows "key chain" means nothing


def test_int8_graph_is_kept_only_when_validation_holds_and_served_on_cpu(trained, tmp_path):
    import shutil

    from common.model import INT8_FILE, Classifier, ModelError
    from training.data import read_image
    from training.export import INT8_MAX_DROP, add_int8

    csv_path, src = trained
    model_dir = str(tmp_path / "model")
    shutil.copytree(src, model_dir)  # the module's model stays as it was
    with pytest.raises(ModelError, match="no int8 graph"):
        Classifier(model_dir, "cpu", precision="int8")
    assert Classifier(model_dir, "cpu").precision == "fp32"

    fp32 = Classifier(model_dir, "cpu", precision="fp32")
    items = [it for it in load_table(csv_path).items if it.image][:16]
    ids = [fp32.tokenizer.encode(it.name) for it in items]
    images = np.stack([read_image(it.image) for it in items])
    calib = [{"token_ids": fp32.tokenizer.pad(ids[s:e]), "image": images[s:e], "image_present": np.ones(e - s, np.float32)}
             for s, e in ((0, 8), (8, 13))]  # a short last batch, as a catalogue with a few photos gives

    falls = iter([{"photo_only": 0.9}, {"photo_only": 0.9 - 2 * INT8_MAX_DROP}])  # fp32, then int8
    info = add_int8(model_dir, calib, lambda path: next(falls))
    assert not info["kept"] and not os.path.exists(os.path.join(model_dir, INT8_FILE))
    assert Classifier(model_dir, "cpu").precision == "fp32"

    info = add_int8(model_dir, calib, lambda path: {"photo_only": 0.9})
    assert info["kept"] and info["file"] == INT8_FILE
    int8 = Classifier(model_dir, "cpu")  # auto: the int8 graph, because the session runs on CPU
    # `auto` runs an int8 graph on OpenVINO (installed with the cpu extra), an fp32 one on ORT's CPU provider
    assert Classifier(model_dir).provider == "OpenVINO" and Classifier(model_dir, precision="fp32").provider == "CPU"
    assert int8.precision == "int8" and Classifier(model_dir, "cpu", precision="fp32").precision == "fp32"
    p8, p32 = int8.run(ids, list(images)), fp32.run(ids, list(images))
    assert p8.shape == p32.shape and np.allclose(p8.sum(1), 1.0, atol=1e-4)
    assert np.mean(p8.argmax(1) == p32.argmax(1)) >= 0.9
    with open(os.path.join(model_dir, INT8_FILE), "ab") as f:  # the manifest records the int8 graph's digest too
        f.write(b"\0")
    with pytest.raises(ModelError, match="not the graph its manifest describes"):
        Classifier(model_dir, "cpu")


def test_evaluate_scores_data_of_another_taxonomy_by_leaf_and_refuses_data_it_shares_no_label_with(tiny_model, tmp_path,
                                                                                                 capsys):
    from tests.support.tiny_model import LABELS, VOCAB
    from training.evaluate import add_arguments, evaluate, run

    # one level (name, category) against the tiny model's three: the leaves compare (was an IndexError)
    leaves = tmp_path / "leaves.csv"
    leaves.write_text("name,category\n" + "".join(f"a {w} no {i},{label}\n" for i in range(30) for label, w in zip(LABELS, VOCAB)))
    m = evaluate(tiny_model, csv_path=str(leaves), baselines=False)
    assert list(m["levels"]) == ["articleType"] and m["levels"]["articleType"]["acc"] == 1.0
    # no label in common: every prediction would be wrong — a clear error, not a report of zeros
    other = tmp_path / "other.csv"
    other.write_text("name,category\n" + "".join(f"item {i},{c}\n" for i in range(30) for c in ("Beauty", "Food")))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--model", tiny_model, "--csv", str(other), "--no-baselines"])) == 2
    err = capsys.readouterr().err
    assert "none of its test labels" in err and "Traceback" not in err


def test_the_int8_graph_is_made_before_the_new_version_is_swapped_in(trained, tmp_path, monkeypatch):
    """It was quantized into the live directory after the swap: workers watching it loaded the new version without
    its int8 graph, then again with it — a version never meant to serve, and a second reload."""
    import json
    import shutil

    from training import export
    from training.train import train_model

    _, src = trained
    csv_path = _write_dataset(tmp_path, n_per_class=40)  # enough that validation holds photos: int8 is tried
    out = str(tmp_path / "model")
    shutil.copytree(src, out)  # the version in service while the new one trains
    in_service = json.load(open(os.path.join(out, "manifest.json")))["model_version"]
    seen, quantize = [], export.add_int8

    def spy(model_dir, calib, val_accuracy):
        seen.append((model_dir, json.load(open(os.path.join(out, "manifest.json")))["model_version"]))
        return quantize(model_dir, calib, val_accuracy)

    monkeypatch.setattr(export, "add_int8", spy)
    monkeypatch.setenv("PRODCAT_CACHE", str(tmp_path / "cache"))
    manifest = train_model(None, out_dir=out, fast=True, progress=False, csv_path=csv_path, int8=True, epochs=3)
    [(quantized_in, live_version)] = seen
    assert quantized_in != out and live_version == in_service  # the old version served while the new one was made
    final = json.load(open(os.path.join(out, "manifest.json")))
    assert final["model_version"] == manifest["model_version"] != in_service and final["int8"] == manifest["int8"]
    assert not any(name.endswith(".tmp.onnx") for name in os.listdir(out))
