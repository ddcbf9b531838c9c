"""TensorRT Runner: a serialized engine run through name-based I/O on torch CUDA tensors.

NCHW float32 host batch -> device -> ``execute_async_v3`` on one CUDA stream -> float32 logits on the
host. Batches larger than the engine's optimisation profile run in profile-sized chunks.
``last_gpu_ms`` is the GPU time of the last call (CUDA events around the enqueue, excluding the
host<->device copies); the bench module does the timing, this only records what the GPU reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputFileError
from .engines import check_engine, require


def _torch_dtype(trt, torch, dtype):
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, torch_dtype in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_dtype
    raise InputFileError(f"the engine has an I/O tensor of type {dtype}, which this runner does not handle")


class TensorRTRunner:
    def __init__(self, path: Path, precision: str = "fp16", threads: int = 0):
        """``threads`` is accepted for the Runner signature; the GPU does the work."""
        path = Path(path)
        trt = require("the TensorRT runner")
        import torch

        if not torch.cuda.is_available():    # the runner's buffers are torch CUDA tensors
            raise BackendUnavailable("the TensorRT runner needs a CUDA build of torch",
                                     "install torch from PyPI or https://download.pytorch.org/whl/cu128")
        check_engine(path)
        self._torch, self.device = torch, torch.device("cuda", 0)
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise InputFileError(f"TensorRT cannot deserialize {path.name}",
                                 "re-run `ulsam-deploy export` with this TensorRT and GPU")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputFileError(f"{path.name} has inputs {inputs} and outputs {outputs}; expected one of each")
        (self.input,), (self.output,) = inputs, outputs
        self.input_dtype = _torch_dtype(trt, torch, self.engine.get_tensor_dtype(self.input))
        self.output_dtype = _torch_dtype(trt, torch, self.engine.get_tensor_dtype(self.output))
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input, 0)[2][0])
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self.last_gpu_ms: float | None = None
        self.name = f"tensorrt-{precision}"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        chunks, gpu_ms = [], 0.0
        for start in range(0, len(x), self.max_batch):
            logits, ms = self._run(x[start:start + self.max_batch])
            chunks.append(logits)
            gpu_ms += ms
        self.last_gpu_ms = gpu_ms
        return np.concatenate(chunks)

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        torch, (begin, end) = self._torch, self._events
        with torch.cuda.stream(self.stream):
            images = torch.from_numpy(x).to(self.device).to(self.input_dtype).contiguous()
            if not self.context.set_input_shape(self.input, tuple(images.shape)):
                raise InputFileError(f"the engine does not take a batch of shape {tuple(images.shape)} "
                                     f"(its profile allows batch 1..{self.max_batch})")
            logits = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.output_dtype,
                                 device=self.device)
            self.context.set_tensor_address(self.input, images.data_ptr())
            self.context.set_tensor_address(self.output, logits.data_ptr())
            begin.record(self.stream)
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
            end.record(self.stream)
            host = logits.float().cpu()
        end.synchronize()
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed")   # a bug or a broken device, not user input
        return host.numpy(), begin.elapsed_time(end)

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.stream.synchronize()
        self.context = self.engine = self._runtime = self.stream = None


def engine_io(path: Path) -> dict:
    """I/O tensors of a serialised engine (needs TensorRT, not a GPU context beyond deserialisation)."""
    trt = require("reading a TensorRT engine")
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise InputFileError(f"TensorRT cannot deserialize {Path(path).name}")
    tensors: dict[str, list] = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = [None if d < 0 else int(d) for d in engine.get_tensor_shape(name)]
        kind = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
        tensors[kind].append({"name": name, "shape": shape, "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1].lower(),
                              "layout": "NCHW" if len(shape) == 4 else None, "quantization": None})
    return tensors
