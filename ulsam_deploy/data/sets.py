"""Data sets the tool feeds models: calibration arrays and evaluation sets, all deterministic.

* ``photos`` - the shipped calibration photographs (``calibration/``), expanded by a fixed
  crop/flip schedule to >= 128 samples;
* ``digits`` - the labelled reference set (``digits.py``): train split for calibration, test split
  for evaluation and parity;
* a folder - flat (calibration, unlabelled parity) or ImageFolder ``DIR/<class>/*`` (labelled).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputFileError
from . import digits
from .images import class_folders, open_rgb, scan_images
from .preprocess import Preprocessing

# (crop side as a fraction of the shorter side, anchor, horizontal flip); variant-major order so
# that the first N samples spread over all photos.
SCHEDULE: tuple[tuple[float, str, bool], ...] = (
    (1.0, "c", False), (1.0, "c", True), (0.8, "tl", False), (0.8, "tr", True), (0.8, "bl", False),
    (0.8, "br", True), (0.6, "c", False), (0.6, "tl", True), (0.6, "tr", False), (0.6, "bl", True),
    (0.6, "br", False), (0.8, "c", True), (0.5, "c", False), (0.7, "tl", False), (0.7, "br", True),
    (0.9, "c", True),
)
DEFAULT_CALIB_SAMPLES = 128


@dataclass(frozen=True)
class DataSet:
    """A fixed, preprocessed batch of images (NCHW float32) with optional labels."""

    source: str
    images: np.ndarray
    labels: np.ndarray | None
    preprocessing: Preprocessing
    skipped: int = 0

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "count": self.count, "sha256": self.sha256, "skipped": self.skipped,
                "labelled": self.labels is not None, "preprocessing": self.preprocessing.to_dict()}


def photos_dir() -> Path:
    """The shipped calibration photographs (override with ULSAM_CALIBRATION_DIR)."""
    env = os.environ.get("ULSAM_CALIBRATION_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "calibration"


def _schedule_crop(image: Image.Image, scale: float, anchor: str, flip: bool) -> Image.Image:
    w, h = image.size
    side = max(1, round(min(w, h) * scale))
    x = {"c": (w - side) // 2, "tl": 0, "bl": 0, "tr": w - side, "br": w - side}[anchor]
    y = {"c": (h - side) // 2, "tl": 0, "tr": 0, "bl": h - side, "br": h - side}[anchor]
    crop = image.crop((x, y, x + side, y + side))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop


def folder_samples(folder: Path, prep: Preprocessing, count: int | None, source: str) -> DataSet:
    """``count`` samples (None: every one) from a flat image folder via the crop/flip schedule."""
    scan = scan_images(folder)
    if not scan.paths:
        reason = f" ({len(scan.skipped)} skipped, e.g. {scan.skipped[0][0].name}: {scan.skipped[0][1]})" if scan.skipped else ""
        raise InputFileError(f"no usable images in {folder}{reason}", "pass a folder of RGB/greyscale JPEG or PNG photos")
    available = len(scan.paths) * len(SCHEDULE)
    count = available if count is None else count
    if count < 1 or count > available:
        raise InputFileError(f"--calib-samples {count} is outside 1..{available} for {folder} "
                             f"({len(scan.paths)} images x {len(SCHEDULE)} crops)", "lower it or add images")
    images = [open_rgb(p) for p in scan.paths]
    out = []
    for scale, anchor, flip in SCHEDULE:
        for image in images:
            if len(out) == count:
                break
            out.append(prep(_schedule_crop(image, scale, anchor, flip)))
    array = np.stack(out)
    array.setflags(write=False)
    return DataSet(source, array, None, prep, skipped=len(scan.skipped))


def labelled_folder(root: Path, prep: Preprocessing) -> DataSet:
    """ImageFolder layout; labels are class indices in sorted class-name order."""
    images, labels, skipped = [], [], 0
    for index, name in enumerate(class_folders(root)):
        scan = scan_images(Path(root) / name)
        skipped += len(scan.skipped)
        for path in scan.paths:
            images.append(prep(open_rgb(path)))
            labels.append(index)
    if not images:
        raise InputFileError(f"no usable images under {root} ({skipped} skipped)")
    array = np.stack(images)
    array.setflags(write=False)
    return DataSet(str(root), array, np.asarray(labels, np.int64), prep, skipped=skipped)


def calibration_set(source: str, size: int, count: int = DEFAULT_CALIB_SAMPLES) -> DataSet:
    """Calibration samples from 'photos' (default), 'digits' (train split) or a folder."""
    if source == "digits":
        images, _ = digits.load("train", size)
        if count < 1 or count > len(images):
            raise InputFileError(f"--calib-samples {count} is outside 1..{len(images)} for digits")
        return DataSet("digits:train", images[:count], None, digits.preprocessing(size))
    prep = Preprocessing(size=size)
    if source == "photos":
        return folder_samples(photos_dir(), prep, count, "photos")
    return folder_samples(Path(source), prep, count, str(source))


def evaluation_set(source: str, size: int) -> DataSet:
    """What parity and evaluate run on: 'digits' (test split, labelled), 'photos', or a folder."""
    if source == "digits":
        images, labels = digits.load("test", size)
        return DataSet("digits:test", images, labels, digits.preprocessing(size))
    prep = Preprocessing(size=size)
    if source == "photos":
        return folder_samples(photos_dir(), prep, None, "photos")
    path = Path(source)
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return labelled_folder(path, prep)
    return folder_samples(path, prep, None, str(path))
