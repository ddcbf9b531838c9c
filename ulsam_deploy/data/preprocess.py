"""The one preprocessing definition: resize shorter side, centre crop, scale to [0, 1], normalise.

Calibration, parity, evaluation and training all go through :class:`Preprocessing`, and every
artifact records it (``to_dict``) so a deployed model can be fed exactly as it was checked.
A pretrained model brings its library's preprocessing; :func:`preset` names those (``PRESETS``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import SpecError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    size: int = 224                      # output side (pixels)
    crop_fraction: float = 0.875         # centre crop covers this fraction of the resized shorter side
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    interpolation: str = "bilinear"      # or "bicubic" (timm's pretrained models)

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLING:
            raise SpecError(f"interpolation {self.interpolation!r} is unknown", f"use {' or '.join(RESAMPLING)}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise SpecError(f"crop fraction {self.crop_fraction!r} is outside (0, 1]")

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side to size / crop_fraction, then take the centre size x size.

        The arithmetic is torchvision's ``Resize(int)`` + ``CenterCrop`` (longer side truncated, crop
        offset rounded) with timm's ``floor(size / crop_pct)``, so a preset reproduces the library's
        pixels, not just its numbers; the epsilon keeps 224 / (224 / 232) at 232.
        """
        image = image.convert("RGB")
        short = max(self.size, math.floor(self.size / self.crop_fraction + 1e-6))
        w, h = image.size
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        image = image.resize(new, RESAMPLING[self.interpolation])
        left, top = int(round((new[0] - self.size) / 2.0)), int(round((new[1] - self.size) / 2.0))
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

    def with_normalisation_of(self, other: "Preprocessing") -> "Preprocessing":
        """This geometry with ``other``'s mean and std (a reference set fed to a pretrained model)."""
        return replace(self, mean=tuple(other.mean), std=tuple(other.std))

    def renormalise(self, images: np.ndarray, source: "Preprocessing") -> np.ndarray:
        """NCHW ``images`` normalised by ``source`` -> normalised by this mean and std (same pixels)."""
        if tuple(source.mean) == tuple(self.mean) and tuple(source.std) == tuple(self.std):
            return images
        shape = (1, -1, 1, 1)
        pixels = images * np.asarray(source.std, np.float32).reshape(shape) + np.asarray(source.mean, np.float32).reshape(shape)
        out = (pixels - np.asarray(self.mean, np.float32).reshape(shape)) / np.asarray(self.std, np.float32).reshape(shape)
        out = np.ascontiguousarray(out, dtype=np.float32)
        out.setflags(write=False)
        return out


class PreprocessingModel(BaseModel):
    """The schema of a recorded :class:`Preprocessing` (``to_dict``), wherever it is read back: a checkpoint's
    metadata or an export manifest. Complete, finite, and nothing else."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    size: int = Field(ge=1, le=4096)
    crop_fraction: float = Field(gt=0, le=1, allow_inf_nan=False)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    channel_order: Literal["RGB"]
    layout: Literal["NCHW"]
    interpolation: Literal["bilinear", "bicubic"]

    @field_validator("mean")
    @classmethod
    def _finite(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(v) for v in value):
            raise ValueError("mean must be finite")
        return value

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(v) and v > 0 for v in value):
            raise ValueError("std must be finite and positive")
        return value


# The libraries' own eval transforms at 224 px: torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 resizes to 256
# (V2 weights: 232) and crops 224, bilinear; timm's pretrained configs crop 0.875 bicubic, with ImageNet
# statistics for mobilenetv2_* and mean = std = 0.5 for mobilenetv1_*. "ours" is what the tool always used.
PRESETS: dict[str, dict[str, Preprocessing]] = {
    "ours": {"mv1": Preprocessing(), "mv2": Preprocessing()},
    "torchvision": {"mv1": Preprocessing(crop_fraction=224 / 256), "mv2": Preprocessing(crop_fraction=224 / 256)},
    "torchvision-v2": {"mv1": Preprocessing(crop_fraction=224 / 232), "mv2": Preprocessing(crop_fraction=224 / 232)},
    "timm": {"mv1": Preprocessing(interpolation="bicubic", mean=INCEPTION_MEAN, std=INCEPTION_STD),
             "mv2": Preprocessing(interpolation="bicubic")},
}


def preset(name: str, size: int, arch: str = "mv2") -> Preprocessing:
    """The named preset for ``arch`` at ``size`` px (the crop fraction, so the resize, scales with it)."""
    chosen = PRESETS.get(str(name).strip().lower())
    if chosen is None:
        raise SpecError(f"preprocessing preset {name!r} is unknown", f"choose one of {', '.join(PRESETS)}")
    return replace(chosen[arch], size=size)
