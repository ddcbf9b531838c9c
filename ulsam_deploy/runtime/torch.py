"""The eager PyTorch reference as a Runner."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..nets import load_model
from ..nets.build import fold_batchnorm
from .base import usable_cores


class TorchRunner:
    """Runs in NHWC (channels_last): oneDNN's CPU convolutions, depthwise ones most, are faster on it (1.3-1.5x
    per batch at 112 px here). The caller's model is copied, never re-laid out in place.

    ``fold_bn``: every BatchNorm folded into the convolution before it (:func:`fold_batchnorm`), the form
    parity and evaluation run: one kernel instead of two per convolution. ``split``: the batch is cut into
    one slice per thread, each run on one core (torch's intra-op threads set to 1): no per-op barrier, which
    at 112 px costs more than the op when another process holds a core (the eager reference ran 2-8x slower
    on 2 intra-op threads than on 1 on a busy 2-core machine; split slices were never slower than 1 thread)."""

    def __init__(self, path: Path | None = None, precision: str = "fp32", threads: int = 0, model=None,
                 fold_bn: bool = False, split: bool = False):
        model = copy.deepcopy(model) if model is not None else load_model(path)
        model = model.eval()
        if fold_bn:
            fold_batchnorm(model)
        self.model = model.to(memory_format=torch.channels_last)
        self.name = f"torch-{precision}"
        self._pool, self._restore = None, None
        if split:
            self._restore = torch.get_num_threads()   # given back on close: the setting is process-wide
            slices = threads or usable_cores()
            torch.set_num_threads(1)
            if slices > 1:
                self._pool = ThreadPoolExecutor(slices, thread_name_prefix="reference")
        elif threads:
            # process-wide; setting it per call would rebuild the thread pool every time
            torch.set_num_threads(threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.array(batch, np.float32))
        if self._pool is None or x.dim() != 4 or len(x) < 2:
            return self._run(x)
        parts = torch.tensor_split(x, min(self._pool._max_workers, len(x)))
        return np.concatenate(list(self._pool.map(self._run, parts)))

    def _run(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).numpy()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._restore is not None:
            torch.set_num_threads(self._restore)
            self._restore = None
