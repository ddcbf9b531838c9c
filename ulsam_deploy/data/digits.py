"""The labelled reference set: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans).

Fixed stratified split: 20 % test (360 images), ``random_state=0``. Each 8x8 scan (values 0..16)
is scaled to 0..255, upsampled bilinearly to the model's input size and repeated over RGB, then
normalised by the one :class:`Preprocessing` (already square at the right size, so resize and
crop are the identity).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .preprocess import Preprocessing

SPLIT_SEED = 0
TEST_FRACTION = 0.2
NUM_CLASSES = 10
CLASS_NAMES = tuple(str(d) for d in range(10))
DEFAULT_SIZE = 112
HFLIP = False          # a mirrored digit is another symbol


@lru_cache(maxsize=1)
def _split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target)
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(8x8 scans 0..16, int64 labels) of ``split`` ('train' or 'test'), in a fixed order."""
    scans, labels = _split()[split]
    return scans, labels.astype(np.int64)


def render(scan: np.ndarray, size: int) -> Image.Image:
    """One 8x8 scan (0..16) as a size x size RGB image."""
    grey = Image.fromarray(np.clip(scan * (255.0 / 16.0), 0, 255).round().astype(np.uint8), "L")
    return grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


@lru_cache(maxsize=4)
def load(split: str, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """(images NCHW float32 normalised, labels int64) of ``split`` ('train' or 'test'), in a fixed order."""
    scans, labels = _split()[split]
    prep = preprocessing(size)
    images = np.stack([prep(render(scan, size)) for scan in scans])
    images.setflags(write=False)
    return images, labels.astype(np.int64)


def preprocessing(size: int) -> Preprocessing:
    return Preprocessing(size=size, crop_fraction=1.0)


def describe(size: int) -> str:
    """Where the data come from and how they are rendered, for model cards."""
    return ("scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`, 1,797 real 8x8 scans, "
            "10 classes), split with `train_test_split(test_size=0.2, random_state=0, stratify=target)` into 1,437 "
            f"train and 360 test images, each rendered to {size}x{size} RGB")
