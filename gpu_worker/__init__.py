"""Inference stage: tensor records → dynamic batches → ONNX Runtime → Redis + results topic."""
