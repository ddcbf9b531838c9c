"""The second labelled reference set: Fashion-MNIST (Zalando SE, Expat licence), 60,000 train and
10,000 test greyscale 28x28 photos of clothing in 10 classes, several of them genuinely confusable
(shirt, T-shirt, pullover, coat).

The IDX files ship in ``datasets/fashion-mnist/`` (see its README for source and licence); the Debian
package ``dataset-fashion-mnist`` installs the same files under ``/usr/share/datasets/fashion-mnist``.
Each image is upsampled bilinearly to the model's input size and repeated over RGB, then normalised
by the one :class:`Preprocessing` (square already, so resize and crop are the identity).
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputFileError
from .preprocess import Preprocessing

NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_SIZE = 48      # ULSAM at layers 13/14 sees 3x3, at 16/17 2x2; the reference models train in ~1 h on 2 cores
HFLIP = True           # clothing is left-right symmetric


def data_dir() -> Path:
    """The folder holding the IDX files: ULSAM_FASHION_DIR, the vendored copy, or Debian's."""
    env = os.environ.get("ULSAM_FASHION_DIR")
    candidates = [Path(env)] if env else [Path(__file__).resolve().parents[2] / "datasets" / "fashion-mnist",
                                          DEBIAN_DIR]
    for folder in candidates:
        if all((folder / name).is_file() for pair in FILES.values() for name in pair):
            return folder
    raise InputFileError(f"Fashion-MNIST is not in {' or '.join(str(c) for c in candidates)}",
                         "restore datasets/fashion-mnist from the repository, or `apt-get install "
                         "dataset-fashion-mnist`, or set ULSAM_FASHION_DIR")


def _read_idx(path: Path, kind: int) -> np.ndarray:
    """An IDX file of unsigned bytes (kind 1: labels, 3: images)."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise InputFileError(f"{path} is not a readable gzip file: {exc}") from None
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + kind:
        raise InputFileError(f"{path} is not an IDX file of {kind} dimension(s) (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(kind)]
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * kind)
    if body.size != int(np.prod(dims)):
        raise InputFileError(f"{path} is truncated: {body.size} bytes for shape {tuple(dims)}")
    return body.reshape(dims)


@lru_cache(maxsize=2)
def raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 28, 28), int64 labels) of ``split`` ('train' or 'test'), in file order."""
    images_name, labels_name = FILES[split]
    folder = data_dir()
    images, labels = _read_idx(folder / images_name, 3), _read_idx(folder / labels_name, 1)
    if len(images) != len(labels):
        raise InputFileError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    images.setflags(write=False)
    return images, labels.astype(np.int64)


def render(pixels: np.ndarray, size: int) -> Image.Image:
    """One 28x28 greyscale image as a size x size RGB image."""
    grey = Image.fromarray(np.asarray(pixels, np.uint8), "L")
    return grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def preprocessing(size: int) -> Preprocessing:
    return Preprocessing(size=size, crop_fraction=1.0)


def load(split: str, size: int, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images NCHW float32 normalised, labels) of the first ``count`` images of ``split`` (all by default)."""
    images, labels = raw(split)
    images, labels = images[:count], labels[:count]
    prep = preprocessing(size)
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, pixels in enumerate(images):
        out[i] = prep(render(pixels, size))
    return out, labels


def describe(size: int) -> str:
    """Where the data come from and how they are rendered, for model cards."""
    return ("Fashion-MNIST (Zalando SE, Expat licence; vendored from Debian's `dataset-fashion-mnist`, see "
            "`datasets/fashion-mnist/README.md`): 60,000 train and 10,000 test greyscale 28x28 images, 10 classes, "
            f"each upsampled bilinearly to {size}x{size} RGB")
