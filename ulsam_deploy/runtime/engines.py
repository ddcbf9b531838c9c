"""What a TensorRT engine is tied to, checked before it is built or deserialized.

An engine is specific to the TensorRT version and GPU architecture that built it: the manifest records
both (:func:`environment`), and :func:`check_engine` refuses an engine from elsewhere. Both the engine
producer (``export.tensorrt``) and the runner (``runtime.tensorrt``) use these checks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import BackendUnavailable, StaleArtifactError
from ..store.manifest import MANIFEST, Manifest

INSTALL_HINT = ("pip install 'ulsam-deploy[tensorrt]' --extra-index-url https://pypi.nvidia.com, "
                "on a machine with an NVIDIA GPU and driver")


def gpu_info() -> dict | None:
    """``{"gpu", "compute_capability"}`` of CUDA device 0 (torch, else cuda-python); None if none is visible."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    try:   # a CPU build of torch on a GPU machine: ask the CUDA runtime directly
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}"}


def require(what: str = "TensorRT export"):
    """The ``tensorrt`` module, or BackendUnavailable (one line) when it or a CUDA GPU is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable(f"{what} needs TensorRT, which is not installed", INSTALL_HINT)
    if gpu_info() is None:
        raise BackendUnavailable(f"{what} needs an NVIDIA GPU, and no CUDA device is visible",
                                 "check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES")
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:   # e.g. the wheel is there but its CUDA libraries are not
        raise BackendUnavailable(f"{what}: TensorRT is installed but cannot load ({str(exc).splitlines()[0][:160]})",
                                 INSTALL_HINT) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"{what} needs TensorRT 10 or newer, not {trt.__version__}", INSTALL_HINT)
    return trt


def environment() -> dict:
    """What an engine built here is tied to: TensorRT version, GPU name, compute capability."""
    trt = require("TensorRT")
    return {"tensorrt_version": trt.__version__, **gpu_info()}


def engine_mismatch(recorded: dict, current: dict) -> str | None:
    """Why an engine recorded as ``recorded`` cannot run in ``current``; None if it can.

    TensorRT refuses engines from another version, and engines are built for one compute capability;
    another GPU model of the same capability runs them (perhaps with other tactics than the fastest).
    """
    problems = [f"{label} {recorded.get(key)} (here {current.get(key)})"
                for key, label in (("tensorrt_version", "TensorRT"), ("compute_capability", "compute capability"))
                if recorded.get(key) != current.get(key)]
    if not problems:
        return None
    return f"built with {', '.join(problems)} on {recorded.get('gpu', 'an unknown GPU')}"


def check_engine(path: Path) -> None:
    """Refuse ``path`` when its manifest entry names another TensorRT version or GPU architecture."""

    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        return      # a bare engine file: TensorRT itself refuses what it cannot run
    entry = next((e for e in Manifest.load(path.parent).artifacts.values() if e.get("file") == path.name), None)
    reason = engine_mismatch(entry, environment()) if entry else None
    if reason:
        raise StaleArtifactError(f"{path.name} was {reason}",
                                 f"delete {path} and re-run `ulsam-deploy export` on this machine")
