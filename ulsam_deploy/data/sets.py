"""Data sets the tool feeds models: calibration arrays and evaluation streams, all deterministic.

* ``photos`` - the shipped calibration photographs (``calibration/``), expanded by a fixed
  crop/flip schedule to >= 128 samples;
* ``digits`` - the labelled reference set (``digits.py``): train split for calibration, test split
  for evaluation and parity;
* a folder - flat (calibration, unlabelled parity) or ImageFolder ``DIR/<class>/*`` (labelled).

Evaluation data are :class:`~.stream.Source` objects, decoded batch by batch (memory flat in the
number of images); calibration samples, bounded by ``--calib-samples``, are collected into an array.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputFileError, printable
from . import digits, fashion
from .images import class_folders, open_rgb, scan_images, sub_folders
from .preprocess import Preprocessing
from .stream import Source, array_source, collect, files_fingerprint

# (crop side as a fraction of the shorter side, anchor, horizontal flip); variant-major order so
# that the first N samples spread over all photos.
SCHEDULE: tuple[tuple[float, str, bool], ...] = (
    (1.0, "c", False), (1.0, "c", True), (0.8, "tl", False), (0.8, "tr", True), (0.8, "bl", False),
    (0.8, "br", True), (0.6, "c", False), (0.6, "tl", True), (0.6, "tr", False), (0.6, "bl", True),
    (0.6, "br", False), (0.8, "c", True), (0.5, "c", False), (0.7, "tl", False), (0.7, "br", True),
    (0.9, "c", True),
)
DEFAULT_CALIB_SAMPLES = 128
# The labelled reference sets by name; each module has load(split, size), preprocessing(size), NUM_CLASSES.
REFERENCE_SETS = {"digits": digits, "fashion": fashion}


def reference_set(name: str | None) -> str | None:
    """``name`` if it names one of our reference sets, else None.

    What a checkpoint or manifest says it was trained on is a label, never a path: a file must not choose
    which folder the tool reads. Folders come from the command line (``--data``, ``--calib``) only."""
    return name if isinstance(name, str) and name in REFERENCE_SETS else None


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


def _flat_source(folder: Path, prep: Preprocessing, count: int | None, name: str) -> Source:
    """``count`` samples (None: every one) of a flat image folder via the crop/flip schedule, variant-major.

    Asked for a count (calibration), every image is decoded up front so exactly ``count`` samples come out;
    otherwise only headers are read here and undecodable files are skipped by the stream."""
    scan = scan_images(folder, decode=count is not None)
    if not scan.paths:
        reason = (f" ({len(scan.skipped)} skipped, e.g. {printable(scan.skipped[0][0].name)}: {scan.skipped[0][1]})"
                  if scan.skipped else "")
        raise InputFileError(f"no usable images in {printable(str(folder))}{reason}",
                             "pass a folder of RGB/greyscale JPEG or PNG photos")
    available = len(scan.paths) * len(SCHEDULE)
    count = available if count is None else count
    if count < 1 or count > available:
        raise InputFileError(f"--calib-samples {count} is outside 1..{available} for {printable(str(folder))} "
                             f"({len(scan.paths)} images x {len(SCHEDULE)} crops)", "lower it or add images")
    paths = scan.paths

    def load(i: int):
        scale, anchor, flip = SCHEDULE[i // len(paths)]
        with open_rgb(paths[i % len(paths)]) as image:
            return prep(_schedule_crop(image, scale, anchor, flip)), None

    source = Source(name, count, load, prep, False, files_fingerprint(paths, f"flat:{count}:{prep.to_dict()}"))
    source.skipped = [(printable(p.name), why) for p, why in scan.skipped]
    source.describe_sample = lambda i: printable(paths[i % len(paths)].name)
    return source


def _labelled_source(root: Path, prep: Preprocessing) -> Source:
    """ImageFolder layout; labels are class indices in sorted class-name order."""
    classes = class_folders(root)
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    for index, name in enumerate(classes):
        scan = scan_images(Path(root) / name, decode=False)
        skipped += [(printable(f"{name}/{p.name}"), why) for p, why in scan.skipped]
        paths += scan.paths
        labels += [index] * len(scan.paths)
    if not paths:
        raise InputFileError(f"no usable images under {printable(str(root))} ({len(skipped)} skipped)")

    def load(i: int):
        with open_rgb(paths[i]) as image:
            return prep(image), labels[i]

    source = Source(printable(str(root)), len(paths), load, prep, True,
                    files_fingerprint(paths, f"labelled:{classes}:{prep.to_dict()}"), num_classes=len(classes))
    source.skipped = skipped
    source.describe_sample = lambda i: printable(f"{paths[i].parent.name}/{paths[i].name}")
    return source


def _reference_source(name: str, split: str, size: int, model_prep: Preprocessing | None = None) -> Source:
    module = REFERENCE_SETS[name]
    own = module.preprocessing(size)
    # the set's own rendering; the model's mean and std (a pretrained timm MobileNet-V1 wants 0.5, 0.5)
    prep = own.with_normalisation_of(model_prep) if model_prep is not None else own
    fingerprint = f"{name}:{split}:{size}:{prep.to_dict()}"
    if name == "digits":   # 1,797 tiny scans: rendered once, held in memory
        images, labels = digits.load(split, size)
        images = prep.renormalise(images, own)
        return array_source(f"digits:{split}", images, labels, prep, fingerprint, digits.NUM_CLASSES)
    pixels, labels = module.raw(split)

    def load(i: int):
        return prep(module.render(pixels[i], size)), int(labels[i])

    return Source(f"{name}:{split}", len(labels), load, prep, True, fingerprint, module.NUM_CLASSES)


def evaluation_source(source: str, size: int, prep: Preprocessing | None = None) -> Source:
    """What parity and evaluate stream: 'digits'/'fashion' (test split, labelled), 'photos', or a folder
    (ImageFolder: labelled). ``prep`` is the model's recorded preprocessing (folders and photos; reference sets keep their
    own rendering and take its mean and std)."""
    if source in REFERENCE_SETS:
        return _reference_source(source, "test", size, prep)
    prep = prep or Preprocessing(size=size)
    if source == "photos":
        return _flat_source(photos_dir(), prep, None, "photos")
    path = Path(source)
    if path.is_dir() and sub_folders(path):
        return _labelled_source(path, prep)
    return _flat_source(path, prep, None, printable(str(path)))


def calibration_source(source: str, size: int, count: int = DEFAULT_CALIB_SAMPLES,
                       prep: Preprocessing | None = None) -> Source:
    """Calibration samples: 'photos' (default), 'digits'/'fashion' (first ``count`` of the train split) or a folder."""
    if source in REFERENCE_SETS:
        full = _reference_source(source, "train", size, prep)
        if count < 1 or count > full.count:
            raise InputFileError(f"--calib-samples {count} is outside 1..{full.count} for {source}")
        full.count = count
        return full
    prep = prep or Preprocessing(size=size)
    if source == "photos":
        return _flat_source(photos_dir(), prep, count, "photos")
    return _flat_source(Path(source), prep, count, printable(str(source)))


def _as_dataset(source: Source) -> DataSet:
    images, labels, stats = collect(source)
    images.setflags(write=False)
    return DataSet(source.name, images, labels, source.preprocessing, skipped=stats.skipped)


def calibration_set(source: str, size: int, count: int = DEFAULT_CALIB_SAMPLES,
                    prep: Preprocessing | None = None) -> DataSet:
    """The calibration samples as one array (bounded by ``count``)."""
    return _as_dataset(calibration_source(source, size, count, prep))


def folder_samples(folder: Path, prep: Preprocessing, count: int | None, source: str) -> DataSet:
    return _as_dataset(_flat_source(Path(folder), prep, count, source))
