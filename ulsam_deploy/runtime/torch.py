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
        self.threads = threads

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return self.model(torch.from_numpy(np.array(batch, np.float32))).numpy()
        finally:
            torch.set_num_threads(previous)

    def close(self) -> None:
        pass
