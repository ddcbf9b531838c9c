"""What a deployer must feed an artifact and what it gives back, read from the artifact file itself:
tensor names, shapes (None for a dynamic axis), layout, dtypes and quantisation (scale, zero point).

Recorded in the manifest for every artifact: a full-integer TFLite model takes int8 NHWC input, and
feeding it float32 NCHW (as one might assume) silently gives garbage in another runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def describe_io(path: Path, backend: str) -> dict:
    """{"inputs": [...], "outputs": [...]} for an artifact of ``backend``."""
    reader = {"onnxruntime": _onnx, "litert": _tflite, "tflm": _tflite, "tensorrt": _engine, "executorch": _pte}[backend]
    return reader(Path(path))


def _tensor(name: str, shape, dtype: str, layout: str | None, quantization: dict | None) -> dict:
    return {"name": name, "shape": [None if d is None or (isinstance(d, int) and d < 0) else d for d in shape],
            "dtype": dtype, "layout": layout, "quantization": quantization}


def _onnx(path: Path) -> dict:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initialisers = {i.name for i in graph.initializer}

    def one(value, layout):
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return _tensor(value.name, shape, dtype, layout if len(shape) == 4 else None, None)

    inputs = [one(v, "NCHW") for v in graph.input if v.name not in initialisers]
    return {"inputs": inputs, "outputs": [one(v, "NCHW") for v in graph.output]}


def _tflite(path: Path) -> dict:
    from .litert import open_interpreter

    interpreter = open_interpreter(path)

    def one(detail):
        scale, zero = detail["quantization"]
        quant = {"scale": float(scale), "zero_point": int(zero)} if scale else None
        shape = [int(d) for d in detail.get("shape_signature", detail["shape"])]
        return _tensor(detail["name"], shape, np.dtype(detail["dtype"]).name,
                       "NHWC" if len(shape) == 4 else None, quant)

    return {"inputs": [one(d) for d in interpreter.get_input_details()],
            "outputs": [one(d) for d in interpreter.get_output_details()]}


def _engine(path: Path) -> dict:
    from .tensorrt import engine_io

    return engine_io(path)


def _pte(path: Path) -> dict:
    from .executorch import program_io

    return program_io(path)
