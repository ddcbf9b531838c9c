"""ExecuTorch Runner: a ``.pte`` program run by ``executorch.runtime`` (the XNNPACK delegate and portable kernels).

The programs are exported for batch 1 (what a phone runs), so a larger batch runs image by image.
Threads: the XNNPACK delegate runs on ExecuTorch's one process-wide thread pool, which the Python runtime
resizes only through ``_unsafe_reset_threadpool`` (experimental): it replaces the pool, and every program loaded
before keeps running on the freed one (docs/runtimes.md, ExecuTorch: ``--threads 1`` hung or aborted). So the pool
is resized before the runner loads its program, and never while another runner's program is open: runners in
one process share one count, as eager runners share ``torch.set_num_threads``.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch

from ..errors import InputFileError, UlsamError
from .base import quiet_fd2

with quiet_fd2():   # torchao, imported by the runtime, logs that its CUDA kernels are absent
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime


def load_method(path: Path):
    """The ``forward`` method of the program at ``path``; a file ExecuTorch refuses is one InputFileError."""
    try:
        with quiet_fd2():   # the CPU probe prints its findings to fd 2 on first load
            program = Runtime.get().load_program(Path(path))
            return program, program.load_method("forward")
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InputFileError(f"ExecuTorch cannot load {Path(path).name}: {str(exc).splitlines()[0][:200]}") from None


_OPEN: "weakref.WeakSet[ExecuTorchRunner]" = weakref.WeakSet()   # runners whose program holds the pool


def set_threads(threads: int) -> None:
    """Resize the process-wide thread pool the XNNPACK delegate runs on (0: leave the runtime's default);
    refused while a runner's program, which holds the current pool, is open."""
    with quiet_fd2():   # the first call makes the pool, whose CPU probe prints to fd 2
        current = portable_lib._threadpool_get_thread_count()
    if not threads or current == threads:
        return
    if any(runner.method is not None for runner in _OPEN):
        raise UlsamError(f"ExecuTorch runs every program of a process on one thread pool, in use with {current} "
                         f"threads by an open program; {threads} threads need it closed first",
                         "give every ExecuTorch runner of one process the same --threads")
    with quiet_fd2():
        portable_lib._unsafe_reset_threadpool(threads)


class ExecuTorchRunner:
    def __init__(self, path: Path, precision: str = "fp32", threads: int = 0):
        set_threads(threads)                       # before the load: the delegate keeps the pool it finds
        self._program, self.method = load_method(path)
        _OPEN.add(self)
        self.batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        self.name = f"executorch-{precision}"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.array(batch, np.float32))   # a copy: the runtime may keep the buffer
        chunks = [self.method.execute([x[i:i + self.batch].contiguous()])[0] for i in range(0, len(x), self.batch)]
        return torch.cat(chunks).numpy().astype(np.float32, copy=False)

    def close(self) -> None:
        self.method = self._program = None


# c10::ScalarType codes, as MethodMeta reports them
_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
           11: "bool", 15: "bfloat16"}


def program_io(path: Path) -> dict:
    """I/O tensors of a ``.pte`` program's ``forward`` (the format stores no tensor names: by position)."""
    _, method = load_method(path)
    meta = method.metadata
    tensors: dict[str, list] = {"inputs": [], "outputs": []}
    for kind, count, info in (("inputs", meta.num_inputs(), meta.input_tensor_meta),
                              ("outputs", meta.num_outputs(), meta.output_tensor_meta)):
        for i in range(count):
            shape = [int(d) for d in info(i).sizes()]
            dtype = _DTYPES.get(int(info(i).dtype()), f"scalar type {int(info(i).dtype())}")
            tensors[kind].append({"name": f"{kind[:-1]}_{i}", "shape": shape, "dtype": dtype,
                                  "layout": "NCHW" if len(shape) == 4 else None, "quantization": None})
    return tensors
