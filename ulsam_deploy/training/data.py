"""Training data as a ``torch.utils.data.Dataset``: decoded and augmented one sample at a time, in the
DataLoader's worker processes, so that memory does not grow with the number of images.

Augmentation by kind of data:

* the reference sets (digits, Fashion-MNIST) keep their recipe: random shifts of up to ``max_shift`` px
  (the border filled with the image's darkest value per channel) and, where a mirror image is the same
  class, horizontal flips;
* natural-image folders get the standard ImageNet recipe at the model's input size: random resized
  crop (area 8-100 %, aspect 3/4-4/3, the preprocessing preset's interpolation) and horizontal flips.

Every random draw of a sample comes from a generator seeded by (seed, epoch, rank, index), so a run is
reproducible whatever the number of workers, and a resumed run sees the data an uninterrupted one saw.

An image that cannot be read while training runs (truncated past its header, deleted, replaced) does not stop
the run: the sample is replaced by the next readable one in index order - the same choice in every process, so
distributed batches stay the same size - and reported with its reason as the third item of the sample. The
loop counts them, stops past :data:`MAX_BAD_FRACTION`, and the card lists them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.images import class_folders, open_rgb, scan_images
from ..data.preprocess import RESAMPLING, Preprocessing
from ..data.stream import Source, files_fingerprint
from ..errors import InputFileError, UlsamError, printable

VAL_FRACTION = 0.1                 # held out of a training folder per class when no --val is given
MAX_BAD_FRACTION = 0.01            # unreadable training images tolerated per epoch and process (and at
MIN_BAD_TOLERATED = 2              # least this many, for small sets); past that the run stops
SUBSTITUTE_TRIES = 16              # readable neighbours tried in place of an unreadable image
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Recipe:
    """The augmentation of one training run (recorded in the card)."""

    kind: str                          # "shift-flip" (reference sets) or "random-resized-crop" (folders)
    max_shift: int = 0
    hflip: bool = False
    interpolation: str = "bilinear"

    def describe(self) -> str:
        if self.kind == "random-resized-crop":
            return (f"random resized crop (area {RRC_SCALE[0]:.0%}-{RRC_SCALE[1]:.0%}, aspect 3/4-4/3, "
                    f"{self.interpolation})" + (", random horizontal flips" if self.hflip else ""))
        return f"random shifts of up to {self.max_shift} px" + (", random horizontal flips" if self.hflip else "")


class TrainSet(torch.utils.data.Dataset):
    """``(CHW float32 tensor, label)`` per index; ``set_epoch`` before each epoch (workers copy it)."""

    def __init__(self, name: str, count: int, image_of, labels: np.ndarray, prep: Preprocessing, recipe: Recipe,
                 seed: int = 0, rank: int = 0, describe=None):
        self.name, self.count, self._image_of, self.labels = name, count, image_of, labels
        self.prep, self.recipe, self.seed, self.rank, self.epoch = prep, recipe, seed, rank, 0
        self._describe = describe or (lambda i: f"#{i}")

    def __len__(self) -> int:
        return self.count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        """``(image, label, skipped)``: ``skipped`` is "" or "<file>: <why it could not be read>" when the image
        at ``index`` was replaced by a readable neighbour (whose label comes with it)."""
        index, skipped = int(index), ""
        for _ in range(SUBSTITUTE_TRIES + 1):
            try:
                image = self._image_of(index)
                break
            except (InputFileError, OSError) as exc:   # truncated, deleted or replaced since the scan
                if not skipped:
                    why = exc.message if isinstance(exc, InputFileError) else printable(str(exc))
                    skipped = f"{self._describe(index)}: {why[:200]}"
                index = (index + 1) % self.count
        else:   # nothing readable near it: the bound on unreadable images stops the run
            return torch.zeros(3, self.prep.size, self.prep.size), int(self.labels[index]), skipped
        return (*self._sample(index, image), skipped)

    def _sample(self, index: int, image) -> tuple[torch.Tensor, int]:
        rng = random.Random(hash((self.seed, self.epoch, self.rank, index)))
        if self.recipe.kind == "random-resized-crop":
            image = _random_resized_crop(image, self.prep.size, RESAMPLING[self.recipe.interpolation], rng)
            if self.recipe.hflip and rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            chw = self.prep.normalise(np.asarray(image))
        else:
            chw = self.prep(image)
            chw = _shift(chw, self.recipe.max_shift, rng)
            if self.recipe.hflip and rng.random() < 0.5:
                chw = chw[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(chw, np.float32)), int(self.labels[index])


def _shift(chw: np.ndarray, max_shift: int, rng: random.Random) -> np.ndarray:
    """Translate by up to ``max_shift`` px each way, the border filled with the darkest value per channel."""
    if max_shift <= 0:
        return chw
    c, h, w = chw.shape
    dy, dx = rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift)
    out = np.broadcast_to(chw.min(axis=(1, 2), keepdims=True), chw.shape).copy()
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = chw[:, ys, xs]
    return out


def _random_resized_crop(image: Image.Image, size: int, resample, rng: random.Random) -> Image.Image:
    """The Inception-style crop: a random area fraction and log-uniform aspect ratio, ten tries, then the
    centre crop of the clamped aspect; resized to ``size`` x ``size``."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.resize((size, size), resample, box=(left, top, left + w, top + h))
    ratio = width / height
    if ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        w, h = round(height * RRC_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), resample, box=(left, top, left + w, top + h))


@dataclass
class TrainData:
    """What a training run reads: the training set, the set it is evaluated on after each epoch, and how."""

    name: str                          # the data set's name (a reference set) or the training folder
    train: TrainSet
    evaluation: Source
    preprocessing: Preprocessing       # the evaluation preprocessing, recorded with the model
    recipe: Recipe
    description: str                   # for the card: where the data come from
    evaluation_note: str               # for the card: which images the test accuracy is measured on
    num_classes: int
    extra: dict = field(default_factory=dict)
    class_names: tuple[str, ...] = ()  # in label order; recorded in the checkpoint, carried into the artifacts


def reference_data(module, name: str, size: int, model_prep: Preprocessing, max_shift: int, hflip: bool,
                   seed: int) -> TrainData:
    """A reference set (digits, fashion): its own rendering, the model's mean and std, its test split."""
    from ..data.sets import evaluation_source

    own = module.preprocessing(size)
    prep = own.with_normalisation_of(model_prep)
    pixels, labels = module.raw("train")
    recipe = Recipe("shift-flip", max_shift, hflip)
    train = TrainSet(f"{name}:train", len(labels), lambda i: module.render(pixels[i], size), np.asarray(labels),
                     prep, recipe, seed)
    evaluation = evaluation_source(name, size, model_prep)
    return TrainData(name, train, evaluation, prep, recipe, module.describe(size),
                     f"the {evaluation.count:,} images of the test split", module.NUM_CLASSES,
                     class_names=tuple(module.CLASS_NAMES))


def folder_data(root: Path, val: Path | None, prep: Preprocessing, hflip: bool, seed: int) -> TrainData:
    """An ImageFolder ``root/<class>/*``: trained with the ImageNet recipe; evaluated on ``val`` (same class
    folders) or, without one, on 10 % of each class held out of training (a fixed, seeded choice)."""
    classes, paths, labels, skipped = _scan(root)
    if len(classes) < 2:
        raise InputFileError(f"{root} has {len(classes)} class folder{'s' if len(classes) != 1 else ''}; a classifier "
                             "needs at least 2", "lay the images out as DIR/<class>/*, one folder per class")
    if val is not None:
        val_classes, val_paths, val_labels, val_skipped = _scan(val)
        skipped += val_skipped
        if val_classes != classes:
            raise InputFileError(f"--val {val} has the classes {_few(val_classes)}, the training folder {_few(classes)}",
                                 "use the same class folder names in both")
        train_paths, train_labels, note = paths, labels, f"the {len(val_paths):,} images of `--val {val}`"
    else:
        held = _held_out(labels, seed)
        train_paths = [p for i, p in enumerate(paths) if i not in held]
        train_labels = [y for i, y in enumerate(labels) if i not in held]
        val_paths = [paths[i] for i in sorted(held)]
        val_labels = [labels[i] for i in sorted(held)]
        note = (f"{len(val_paths):,} images held out of the training folder ({VAL_FRACTION:.0%} of each class, "
                f"seed {seed}); trained on the other {len(train_paths):,}")
    recipe = Recipe("random-resized-crop", 0, hflip, prep.interpolation)
    train = TrainSet(str(root), len(train_paths), lambda i: open_rgb(train_paths[i]), np.asarray(train_labels),
                     prep, recipe, seed, describe=lambda i: _relative(train_paths[i]))

    def load(i: int):
        with open_rgb(val_paths[i]) as image:
            return prep(image), val_labels[i]

    evaluation = Source(f"{val or root}:val", len(val_paths), load, prep, True,
                        files_fingerprint(val_paths, f"val:{classes}:{prep.to_dict()}"), num_classes=len(classes))
    evaluation.describe_sample = lambda i: f"{val_paths[i].parent.name}/{val_paths[i].name}"
    return TrainData(str(root), train, evaluation, prep, recipe, f"the ImageFolder `{root}` ({len(classes)} classes)",
                     note, len(classes), {"classes": classes, "scan_skipped": skipped}, _labels(root, classes))


def class_name(folder: str, index: int) -> str:
    """A class folder's name as a label: printable, no control characters or edge spaces (else class_i)."""
    name = "".join(c if c.isprintable() else " " for c in printable(folder))[:256].strip()
    return name or f"class_{index}"


def _labels(root: Path, classes: list[str]) -> tuple[str, ...]:
    """The class labels of the folders; two folders whose labels come out the same are refused."""
    labels = tuple(class_name(c, i) for i, c in enumerate(classes))
    first: dict[str, str] = {}
    for folder, label in zip(classes, labels):
        if label in first:
            raise InputFileError(f"{printable(str(root))}: the class folders {printable(first[label])!r} and "
                                 f"{printable(folder)!r} both become the label {label!r} (control characters and "
                                 "edge spaces are not kept)", "rename one of them")
        first[label] = folder
    return labels


def _relative(path: Path) -> str:
    return printable(f"{path.parent.name}/{path.name}")


def _scan(root: Path) -> tuple[list[str], list[Path], list[int], list[tuple[str, str]]]:
    """Class folders, usable image paths and labels, and the files skipped (``class/file``, why)."""
    classes = class_folders(root)
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    for index, name in enumerate(classes):
        scan = scan_images(Path(root) / name, decode=False)
        skipped += [(_relative(path), why) for path, why in scan.skipped]
        if not scan.paths:
            reason = f" ({len(scan.skipped)} file(s) skipped, e.g. {scan.skipped[0][1]})" if scan.skipped else ""
            raise InputFileError(f"{printable(str(root))}: the class folder {printable(name)!r} has no usable "
                                 f"images{reason}", "add its images, or remove the folder if it is not a class")
        paths += scan.paths
        labels += [index] * len(scan.paths)
    return classes, paths, labels, skipped


def _held_out(labels: list[int], seed: int) -> set[int]:
    """Indices held out for evaluation: a seeded ``VAL_FRACTION`` of each class (at least one image)."""
    rng = random.Random(seed)
    held: set[int] = set()
    for cls in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == cls]
        if len(members) < 2:
            raise UlsamError(f"class {cls} has {len(members)} image; holding one out for evaluation leaves none to "
                             "train on", "add images, or pass --val DIR")
        rng.shuffle(members)
        held.update(members[:max(1, round(len(members) * VAL_FRACTION))])
    return held


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
