"""ONNX Runtime (CPU) Runner for fp32 and Q/DQ INT8 ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import InputFileError


def session_options(threads: int = 0) -> ort.SessionOptions:
    """The CPU session options every ONNX Runtime session of ours uses (runner, op profile)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle intra-op threads spin by default; with two sessions timed side by side the spinning
    # pool of one steals the cores of the other (p50 doubled in an interleaved bench here).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeRunner:
    """``graph="qdq"`` runs a Q/DQ file as its graph says (DequantizeLinear -> float op -> QuantizeLinear, no
    fused integer kernels): the arithmetic TensorRT gives the ``onnx-int8-trt`` file, on every CPU."""

    def __init__(self, path: Path, precision: str = "fp32", threads: int = 0, graph: str = "fused"):
        options = session_options(threads)
        if graph == "qdq":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise InputFileError(f"ONNX Runtime cannot load {Path(path).name}: {str(exc).splitlines()[0][:200]}") from None
        self.input = self.session.get_inputs()[0].name
        self.name = f"onnxruntime-{precision}" + ("-qdq" if graph == "qdq" else "")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(batch, np.float32)})[0]

    def close(self) -> None:
        self.session = None
