"""Reading user images safely: every odd file is converted or skipped with a reason, never a crash."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputFileError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_PIXELS = 40_000_000   # decompression-bomb guard: 40 MP, e.g. 8000 x 5000
MIN_SIDE = 8
DOCS = {"README", "LICENSE", "LICENCE", "NOTICE"}


@dataclass
class ImageScan:
    """What a folder held: usable images (RGB) in sorted order, and what was skipped and why."""

    paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def open_rgb(path: Path, decode: bool = True) -> Image.Image:
    """Open ``path`` fully decoded as 8-bit RGB; raise InputFileError with the reason otherwise.

    With ``decode=False`` only the header is read and checked (size guards); the image is returned unloaded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                w, h = image.size
                if w * h > MAX_PIXELS:
                    raise InputFileError(f"{path.name} is {w}x{h} pixels, over the {MAX_PIXELS:,}-pixel "
                                         "decompression-bomb guard")
                if min(w, h) < MIN_SIDE:
                    raise InputFileError(f"{path.name} is {w}x{h} pixels, too small (min side {MIN_SIDE})")
                if not decode:
                    return image
                image.load()
                return _to_rgb(image)
    except InputFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputFileError(f"{path.name} is too large to decode safely (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise InputFileError(f"{path.name} is not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated, corrupt, unreadable
        raise InputFileError(f"{path.name} could not be decoded: {str(exc).splitlines()[0][:120]}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):   # 16/32-bit grey: scale the full range to 8 bits
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
        image = Image.fromarray(array.round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def scan_images(folder: Path, recursive: bool = False, decode: bool = True) -> ImageScan:
    """All decodable images in ``folder`` (sorted by path); the rest counted in ``skipped``.

    ``decode=False`` checks headers only (fast on large folders); a file that then fails to decode is
    skipped, with its reason, by the stream that reads it."""
    folder = Path(folder)
    if not folder.exists():
        raise InputFileError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise InputFileError(f"{folder} is not a folder", "pass a folder of images")
    scan = ImageScan()
    candidates = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    for path in candidates:
        if path.name.startswith(".") or path.stem.upper() in DOCS:   # a folder's own README/LICENSE
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            scan.skipped.append((path, "not an image file name"))
            continue
        try:
            open_rgb(path, decode).close()
        except InputFileError as exc:
            scan.skipped.append((path, exc.message))
            continue
        scan.paths.append(path)
    return scan


def class_folders(root: Path) -> list[str]:
    """ImageFolder layout: one sub-folder per class, sorted by name."""
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputFileError(f"{root} has no class sub-folders", "use the layout DIR/<class>/*.jpg")
    return classes
