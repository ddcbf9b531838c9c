"""The eager PyTorch reference as a Runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..nets import load_model


class TorchRunner:
    def __init__(self, path: Path | None = None, precision: str = "fp32", threads: int = 0, model=None):
        self.model = (model if model is not None else load_model(path)).eval()
        self.name = f"torch-{precision}"
        if threads:
            # process-wide; setting it per call would rebuild the thread pool every time
            torch.set_num_threads(threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.array(batch, np.float32))).numpy()

    def close(self) -> None:
        pass
