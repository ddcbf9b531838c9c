"""ulsam-deploy: build, profile, export, verify and benchmark MobileNets with ULSAM.

The Python API (quiet, typed, raising :class:`UlsamError`)::

    import ulsam_deploy as ud

    model = ud.build("mv2", "13,14,16,17", num_classes=10, input_size=64)
    manifest = ud.export(model, "onnx,onnx-int8", out="runs/mine", calib="digits")
    report = ud.check(manifest, data="digits")
    assert report.passed, [r.breaches for r in report.results]

Every public name is in ``__all__``; the CLI (``ulsam-deploy``) calls the same functions.
"""

from __future__ import annotations

import sys
import types

from .api import bench, build, check, export, inspect, load, profile, train
from .errors import (BackendUnavailable, InputFileError, Interrupted, RunFailed, SpecError, StaleArtifactError,
                     UlsamError)

__version__ = "0.1.0"

__all__ = ["build", "load", "profile", "export", "check", "inspect", "bench", "train",
           "UlsamError", "SpecError", "InputFileError", "BackendUnavailable", "StaleArtifactError", "RunFailed",
           "Interrupted", "__version__"]


class _Package(types.ModuleType):
    """``ulsam_deploy.export`` and ``ulsam_deploy.bench`` are the API's functions; importing the subpackages
    of the same names (the export pipeline, the bench suite) keeps them so."""

    def __setattr__(self, name: str, value) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return   # a subpackage import binding its name: the subpackage stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
