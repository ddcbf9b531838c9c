"""Which pip extra installs each optional backend, and the check that names it when it is missing.

Both the producers (``export/``) and the consumers (``runtime/``) of an artifact ask here, so the
table lives below both.
"""

from __future__ import annotations

import importlib.util

from .errors import BackendUnavailable

# backend -> (pip extra, modules that backend imports)
EXTRAS: dict[str, str] = {"litert": "tflite", "tensorrt": "tensorrt", "executorch": "executorch", "ethos-u": "npu",
                          "tflm": "npu"}
MODULES: dict[str, tuple[str, ...]] = {"litert": ("onnx2tf", "tensorflow", "ai_edge_litert"),
                                       "tensorrt": ("tensorrt",), "executorch": ("executorch", "torchao"),
                                       "ethos-u": ("ethosu",), "tflm": ("tflite_micro",)}


def install_hint(backend: str) -> str:
    return f"pip install 'ulsam-deploy[{EXTRAS.get(backend, 'all')}]'"


def require(backend: str, what: str) -> None:
    """Raise BackendUnavailable naming the pip extra when a module ``backend`` needs is not installed."""
    missing = [m for m in MODULES.get(backend, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailable(f"{what} needs {', '.join(missing)}, which is not installed", install_hint(backend))
