"""Reading user images safely: every odd file is converted or skipped with a reason, never a crash."""

from __future__ import annotations

import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputFileError, printable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_PIXELS = 40_000_000   # decompression-bomb guard: 40 MP, e.g. 8000 x 5000
MIN_SIDE = 8
DOCS = {"README", "LICENSE", "LICENCE", "NOTICE"}
# Kernel pseudo-file systems: their "regular" files are views of the machine (memory, processes), not data.
PSEUDO_FILE_SYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


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
                    raise InputFileError(f"{printable(path.name)} is {w}x{h} pixels, over the {MAX_PIXELS:,}-pixel "
                                         "decompression-bomb guard")
                if min(w, h) < MIN_SIDE:
                    raise InputFileError(f"{printable(path.name)} is {w}x{h} pixels, too small (min side {MIN_SIDE})")
                if not decode:
                    return image
                image.load()
                return _to_rgb(image)
    except InputFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputFileError(f"{printable(path.name)} is too large to decode safely (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise InputFileError(f"{printable(path.name)} is not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated, corrupt, unreadable
        raise InputFileError(f"{printable(path.name)} could not be decoded: "
                             f"{printable(str(exc).splitlines()[0][:120])}") from None


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


def scan_images(folder: Path, decode: bool = True) -> ImageScan:
    """All decodable images in ``folder`` (sorted by name, not recursive); the rest counted in ``skipped``.

    Only regular files are opened: a symlink to a regular file is followed wherever it points (data sets
    link images into class folders), except into /proc, /sys or /dev; FIFOs, sockets, devices, broken
    links and empty files are skipped with their reason, unopened. ``decode=False`` checks headers only
    (fast on large folders); a file that then fails to decode is skipped, with its reason, by the stream
    that reads it."""
    folder = Path(folder)
    if not folder.exists():
        raise InputFileError(f"image folder {printable(str(folder))} does not exist")
    if not folder.is_dir():
        raise InputFileError(f"{printable(str(folder))} is not a folder", "pass a folder of images")
    scan = ImageScan()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.stem.upper() in DOCS or path.is_dir():   # a folder's own README
            continue
        why = unusable_file(path) or (None if path.suffix.lower() in IMAGE_SUFFIXES else "not an image file name")
        if why is None:
            try:
                open_rgb(path, decode).close()
            except InputFileError as exc:
                why = exc.message
        if why is not None:
            scan.skipped.append((path, why))
            continue
        scan.paths.append(path)
    return scan


def unusable_file(path: Path) -> str | None:
    """Why ``path`` is not opened as data (not a regular file, empty, a link into a pseudo-file system), or None."""
    try:
        info = path.stat()   # follows a symlink
    except OSError as exc:
        return "a broken symlink" if path.is_symlink() else f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        return f"{kind}, not a regular file"
    if path.is_symlink() and any(path.resolve().is_relative_to(root) for root in PSEUDO_FILE_SYSTEMS):
        return "a symlink into a kernel pseudo-file system"
    if info.st_size == 0:
        return "an empty file"
    return None


def sub_folders(root: Path) -> list[str]:
    """The class folders of an ImageFolder ``root``, sorted by name: visible sub-folders, and symlinked ones
    only when they lead to another folder inside ``root`` (never out of the tree, never back to ``root``)."""
    root = Path(root)
    base = root.resolve()
    names = []
    for path in root.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        if path.is_symlink():
            target = path.resolve()
            if target == base or not target.is_relative_to(base):
                continue
        names.append(path.name)
    return sorted(names)


def class_folders(root: Path) -> list[str]:
    """ImageFolder layout: one sub-folder per class (see :func:`sub_folders`), sorted by name."""
    classes = sub_folders(root)
    if not classes:
        raise InputFileError(f"{printable(str(root))} has no class sub-folders", "use the layout DIR/<class>/*.jpg")
    return classes
