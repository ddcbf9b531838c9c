"""The one preprocessing definition: resize shorter side, centre crop, scale to [0, 1], normalise.

Calibration, parity, evaluation and training all go through :class:`Preprocessing`, and every
artifact records it (``to_dict``) so a deployed model can be fed exactly as it was checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    size: int = 224                      # output side (pixels)
    crop_fraction: float = 0.875         # centre crop covers this fraction of the resized shorter side
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    interpolation: str = "bilinear"

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side to size / crop_fraction, then take the centre size x size."""
        image = image.convert("RGB")
        short = round(self.size / self.crop_fraction)
        w, h = image.size
        scale = short / min(w, h)
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                             Image.Resampling.BILINEAR)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 or [0, 1] float HWC RGB -> float32 CHW, normalised."""
        x = rgb.astype(np.float32)
        if rgb.dtype == np.uint8:
            x /= 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalise(np.asarray(self.resize_crop(image)))

    def denormalise(self, batch: np.ndarray) -> np.ndarray:
        """NCHW normalised -> NHWC in [0, 1] (what converters that take raw pixels want)."""
        x = batch.transpose(0, 2, 3, 1) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        return np.clip(x, 0.0, 1.0).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)
