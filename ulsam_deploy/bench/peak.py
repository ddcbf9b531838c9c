"""The machine's achievable GEMM rate, the denominator of the benchmark's efficiency column.

Measured the way the backends reach it: the best of several shapes, through torch and through the
ONNX Runtime Runner (MLAS), with the benchmark's thread count. INT8 rows are measured against an
INT8 peak (QuantizeLinear + MatMulInteger, u8 x s8 as ORT's INT8 models run), not the fp32 one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .timing import time_calls
from ..runtime import open_artifact

SHAPES = ((1024, 1024, 1024), (256, 2048, 2048), (2048, 512, 2048))   # (m, k, n)


def _gemm_onnx(m: int, k: int, n: int, int8: bool, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    if int8:
        inits += [numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "B"),
                  numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
                  numpy_helper.from_array(np.array(128, np.uint8), "zero")]
        nodes += [helper.make_node("QuantizeLinear", ["A", "scale", "zero"], ["Aq"]),
                  helper.make_node("MatMulInteger", ["Aq", "B", "zero"], ["Y"])]
        out_type = TensorProto.INT32
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "B"))
        nodes.append(helper.make_node("MatMul", ["A", "B"], ["Y"]))
        out_type = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", out_type, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, str(path))


def _best_gops(call, ops: float, repeats: int) -> float:
    call()
    return ops / (min(time_calls(call, repeats)) / 1000.0) / 1e9


def gemm_peak(threads: int, int8: bool = False, repeats: int = 8) -> float:
    """Best GOP/s (multiply-add = 2 ops) over :data:`SHAPES`, fp32 or INT8, with ``threads`` threads."""
    best = 0.0
    with tempfile.TemporaryDirectory(prefix="ulsam-peak-") as scratch:
        for m, k, n in SHAPES:
            ops = 2.0 * m * k * n
            path = Path(scratch) / f"gemm-{m}-{k}-{n}-{int8}.onnx"
            _gemm_onnx(m, k, n, int8, path)
            runner = open_artifact(path, "onnxruntime", "int8" if int8 else "fp32", threads)
            a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            try:
                best = max(best, _best_gops(lambda: runner(a), ops, repeats))
            finally:
                runner.close()
            if not int8:
                best = max(best, _torch_gops(m, k, n, threads, repeats))
    return best


def _torch_gops(m: int, k: int, n: int, threads: int, repeats: int) -> float:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        return _best_gops(lambda: a @ b, 2.0 * m * k * n, repeats)
    finally:
        torch.set_num_threads(previous)
