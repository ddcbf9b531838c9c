"""LiteRT Runner (ai_edge_litert, the maintained successor of tflite-runtime), XNNPACK on.

NCHW -> NHWC and INT8 input/output (de)quantisation happen here; the batch axis is resized to
whatever batch arrives.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from ..errors import InputFileError
from .base import quiet_fd2


def open_interpreter(path: Path, threads: int = 0, **options) -> Interpreter:
    """A LiteRT interpreter with tensors allocated; a file LiteRT refuses is one InputFileError."""
    try:
        with quiet_fd2():
            interpreter = Interpreter(model_path=str(path), num_threads=threads or None, **options)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise InputFileError(f"LiteRT cannot load {Path(path).name}: {str(exc).splitlines()[0][:200]}") from None
    return interpreter


class LiteRTRunner:
    def __init__(self, path: Path, precision: str = "fp32", threads: int = 0, **options):
        """``options`` go to the Interpreter (``inspect`` adds ``experimental_preserve_all_tensors``)."""
        self.interpreter = open_interpreter(path, threads, **options)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])
        self.name = f"litert-{precision}"

    def _resize(self, batch: int) -> None:
        if batch != self.batch:
            shape = list(self.input["shape"])
            shape[0] = batch
            self.interpreter.resize_tensor_input(self.input["index"], shape, strict=False)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self.batch = batch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(batch, np.float32).transpose(0, 2, 3, 1))
        self._resize(len(x))
        dtype = self.input["dtype"]
        if dtype != np.float32:
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        if y.dtype != np.float32:
            scale, zero = self.output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def close(self) -> None:
        self.interpreter = None


def delegate_split(path: Path) -> dict:
    """How LiteRT's default XNNPACK delegate split a TFLite graph: the number of delegate partitions, the op
    types left outside it (run by LiteRT's own kernels), and the op types of the graph.

    The interpreter lists the graph's ops and then one DELEGATE node per partition. Ops outside are those the
    delegates and the graph output need, transitively, that no delegate produces: every tensor a partition or
    an outside op reads is a graph input, a constant, a partition's output or an outside op's output."""
    interpreter = open_interpreter(path, 1)
    nodes = interpreter._get_ops_details()
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    graph = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {int(t): n["index"] for n in graph for t in n["outputs"]}
    delegated_out = {int(t) for n in delegates for t in n["outputs"]}
    wanted = [int(t) for n in delegates for t in n["inputs"]]
    wanted += [int(d["index"]) for d in interpreter.get_output_details()]
    outside: set[int] = set()
    while wanted:
        tensor = wanted.pop()
        op = producer.get(tensor)
        if op is None or tensor in delegated_out or op in outside:
            continue
        outside.add(op)
        wanted += [int(t) for t in nodes[op]["inputs"] if t >= 0]
    by_index = {n["index"]: n["op_name"] for n in graph}
    return {"delegate": "XNNPACK", "partitions": len(delegates),
            "outside_delegate": dict(collections.Counter(by_index[i] for i in sorted(outside))),
            "ops": dict(sorted(collections.Counter(n["op_name"] for n in graph).items()))}
