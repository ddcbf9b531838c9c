"""The eager PyTorch reference as a Runner."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..nets import load_model


class TorchRunner:
    """Runs in NHWC (channels_last): oneDNN's CPU convolutions, depthwise ones most, are faster on it (1.3-1.5x
    per batch at 112 px here). The caller's model is copied, never re-laid out in place."""

    def __init__(self, path: Path | None = None, precision: str = "fp32", threads: int = 0, model=None):
        model = copy.deepcopy(model) if model is not None else load_model(path)
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.name = f"torch-{precision}"
        if threads:
            # process-wide; setting it per call would rebuild the thread pool every time
            torch.set_num_threads(threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.array(batch, np.float32))
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).numpy()

    def close(self) -> None:
        pass
