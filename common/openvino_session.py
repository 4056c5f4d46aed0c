"""OpenVINO's CPU plugin behind the part of ONNX Runtime's session interface that `Classifier` uses
(`run`, `get_inputs`, `get_outputs`, `get_providers`): the same ONNX file and contract, one more provider.

Why a second runtime: on CPUs with AMX / AVX-512 VNNI, OpenVINO runs the int8 graph's convolutions on those
units and ORT's CPU provider mostly does not — on the 2-vCPU Xeon (AMX) of the session that added it, runs of
4 items on two single-threaded streams did 863–905 items/s against ORT's 550–576 in its best layout (one item per
run on two lanes); on an AMD EPYC without AMX an earlier session measured OpenVINO 225 vs ORT 215 images/s per
core. It goes by the name of ORT's own OpenVINO provider, which ships in `onnxruntime-openvino` — a separate
build of the `onnxruntime` package that cannot sit beside the one prodcat pins.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

PROVIDER = "OpenVINOExecutionProvider"
# items per run on a lane: one image per run is ORT's cheapest (its int8 kernels gain nothing from batching here),
# but OpenVINO's AMX kernels want a few rows — 1 lane: 355 / 410 / 390 / 365 / 377 items/s at 1 / 4 / 8 / 16 / 32
# items per run; 2 lanes: 660–676 at 1, 755–766 at 2, 863–905 at 4, 830–847 at 8, 751–808 at 16, 776–787 at 32
RUN_ITEMS = 4
# OpenVINO's CPU plugin computes an integer Mod through float32: wrong beyond 2^24 (the word-pair hash of graphs
# exported before opset 18 took a Mod of values up to ~10^10). Graphs with one are left to ORT. (Its integer Divide
# too, but the graphs' Divides are shape arithmetic on small values, exact in float32.)
INEXACT_OPS = ("FloorMod", "Mod")


@functools.cache
def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Port:
    """What ORT's NodeArg offers and Classifier reads: the name."""
    name: str


class OpenVINOSession:
    """One compiled model; each calling thread (a Classifier lane) gets its own infer request, so the lanes
    run side by side on their own streams. `lanes` 0: OpenVINO's own defaults (its latency hint, every core)."""

    def __init__(self, path: str, lanes: int):
        import openvino as ov

        # f32 where the graph is f32: on CPUs with AMX-BF16 OpenVINO otherwise runs those parts in bf16 by default,
        # which moved 1.1 % of the validation items' top-1 away from ORT's (the int8 convolutions are unaffected).
        # Pinning is off: the workers share their cores with the broker and the preprocess workers, and a stream
        # pinned to a core another process holds waits for it instead of running on the free one.
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if lanes:
            config.update(NUM_STREAMS=lanes, INFERENCE_NUM_THREADS=lanes, ENABLE_CPU_PINNING=False)
        core = ov.Core()
        model = core.read_model(path)
        inexact = [op.get_friendly_name() for op in model.get_ops()
                   if op.get_type_name() in INEXACT_OPS and op.get_output_element_type(0).is_integral_number()]
        if inexact:
            raise ValueError(f"integer {'/'.join(INEXACT_OPS)} would be computed through float32: {', '.join(inexact[:3])} "
                             "(a graph exported before the word-pair hash became a BitwiseAnd: retrain or re-export it)")
        self._model = core.compile_model(model, "CPU", config)
        self._requests = threading.local()
        self._tensor = ov.Tensor

    def get_inputs(self) -> list[Port]:
        return [Port(p.get_any_name()) for p in self._model.inputs]

    def get_outputs(self) -> list[Port]:
        return [Port(p.get_any_name()) for p in self._model.outputs]

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def run(self, output_names: list[str] | None, feeds: dict) -> list:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._model.create_infer_request()
        # inputs are read in place (the feeds are the caller's fresh arrays), except read-only ones (a one-item
        # run's view of its Kafka payload), which OpenVINO will not wrap: copied, as its infer(feeds) would. Only the
        # asked-for outputs are copied out (the request's buffers are overwritten by the lane's next run). Tensors
        # set one by one and a bare infer(): 0.19 against 0.25 ms of the lane's CPU per 4-item run for
        # infer(feeds), which dispatches the inputs in Python and copies every output
        for name, value in feeds.items():
            request.set_tensor(name, self._tensor(value, shared_memory=value.flags.writeable))
        request.infer()
        return [request.get_tensor(name).data.copy() for name in output_names or [p.name for p in self.get_outputs()]]
