"""What the command line asked of an export, parsed once at the CLI boundary into one typed object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..formats import DEFAULT_FORMATS
from .vela import DEFAULT_NPU


@dataclass(frozen=True)
class ExportOptions:
    """Formats (dependencies first), output folder, calibration and the INT8 float layers of one export."""

    formats: tuple[str, ...] = DEFAULT_FORMATS
    out: Path | None = None                # None: runs/<model name>
    calib: str | None = None               # None: the model's own training set if it has one, else photos
    calib_samples: int = 128
    calib_method: str = "minmax"
    keep_float: tuple[int, ...] = ()       # paper layers kept in float in the INT8 formats that honour it
    allow_large: bool = False              # build a network over the size limit (nets.build.MAX_BUILD_BYTES)
    npu: str = DEFAULT_NPU                 # the Ethos-U configuration tflite-int8-npu is compiled for
