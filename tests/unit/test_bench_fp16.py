"""The benchmark's fp16 copy: made from a graph that already holds an fp16 table (as the served models'
name tables are), in fp16 inside, the contract's types outside, and answering as the fp32 graph does."""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common.model import ONNX_FILE, Classifier, seal_graph
from prodcat.bench import fp16_copy
from tests.support.tiny_model import build_tiny_model, expected_category


def _with_fp16_table(model_dir: str) -> None:
    """Store the tiny model's token table in fp16 and cast its rows back, as the exported graphs do."""
    path = os.path.join(model_dir, ONNX_FILE)
    model = onnx.load(path)
    table = next(i for i in model.graph.initializer if i.name == "W")
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), "W"))
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    gather.output[0] = "tok_logits16"
    model.graph.node.insert(1, helper.make_node("Cast", ["tok_logits16"], ["tok_logits"], to=TensorProto.FLOAT))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    seal_graph(model_dir)


def test_fp16_copy_of_a_graph_with_an_fp16_table_answers_as_fp32(tmp_path):
    src = build_tiny_model(str(tmp_path / "fp32"))
    _with_fp16_table(src)
    copy = fp16_copy(src, str(tmp_path))
    graph = onnx.load(os.path.join(copy, ONNX_FILE)).graph
    floats = {TensorProto.DataType.Name(i.data_type) for i in graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert floats == {"FLOAT16"}  # every float weight converted, the fp16 table left as it was
    assert [i.type.tensor_type.elem_type for i in graph.input] == [TensorProto.INT64, TensorProto.UINT8, TensorProto.FLOAT]
    assert {o.type.tensor_type.elem_type for o in graph.output} == {TensorProto.FLOAT}

    fp32, fp16 = Classifier(src, "cpu"), Classifier(copy, "cpu")
    names = ["Blue shirt", "Running shoes", "Steel watch", "Gift box"]
    ids = [fp32.tokenizer.encode(n) for n in names]
    images = [np.full((224, 224, 3), v, np.uint8) for v in (0, 40, 255, 255)]
    p32, p16 = fp32.run(ids, images), fp16.run(ids, images)
    assert p16.dtype == np.float32 and np.abs(p32 - p16).max() < 1e-2
    assert [p.category for p in fp16.predictions(p16)][:3] == [expected_category(n) for n in names[:3]]
    assert p16[3].argmax() == p32[3].argmax() == 2  # an unknown name with a white photo: the image decides
