"""The Runner interface every backend implements, and the registry that opens one lazily."""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import BackendUnavailable
from ..extras import install_hint


@runtime_checkable
class Runner(Protocol):
    name: str            # e.g. "onnxruntime-int8", "litert-fp16", "tensorrt-fp16", "torch-fp32"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 (normalised) in, float32 logits out. Layout/quantisation handled inside."""

    def close(self) -> None: ...


# backend -> "module:Class"; nothing heavy is imported until a backend is chosen.
RUNNERS = {
    "torch": "ulsam_deploy.runtime.torch:TorchRunner",
    "onnxruntime": "ulsam_deploy.runtime.onnxruntime:OnnxRuntimeRunner",
    "litert": "ulsam_deploy.runtime.litert:LiteRTRunner",
    "tensorrt": "ulsam_deploy.runtime.tensorrt:TensorRTRunner",
    "executorch": "ulsam_deploy.runtime.executorch:ExecuTorchRunner",
    "tflm": "ulsam_deploy.runtime.tflm:TFLiteMicroRunner",
}


@contextlib.contextmanager
def quiet_fd2():
    """Native runtimes (LiteRT, ExecuTorch) print INFO lines to fd 2 as they load; keep CLI output to our own lines."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # no affinity on this system (macOS, Windows)
        return os.cpu_count() or 1


def runner_class(backend: str):
    if backend not in RUNNERS:
        raise BackendUnavailable(f"backend {backend!r} is unknown", f"choose one of {', '.join(RUNNERS)}")
    module_name, cls_name = RUNNERS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"the {backend} backend is not installed ({exc.name or exc})",
                                 install_hint(backend)) from None
    return getattr(module, cls_name)



def open_artifact(path: Path, backend: str, precision: str, threads: int = 0, **options) -> Runner:
    """A Runner for one artifact file (the manifest says which backend and precision)."""
    return runner_class(backend)(Path(path), precision=precision, threads=threads, **options)


def runner_options(entry: dict) -> dict:
    """Options a manifest entry asks its runner for (an ONNX run as its Q/DQ graph: ``ort_graph``)."""
    return {"graph": "qdq"} if entry.get("ort_graph") == "qdq" else {}


def open_entry(path: Path, entry: dict, threads: int = 0, **options) -> Runner:
    """A Runner for the artifact a manifest ``entry`` describes: its backend, precision and runner options."""
    return open_artifact(path, entry["backend"], entry["precision"], threads, **runner_options(entry), **options)


def run_batched(runner: Runner, images: np.ndarray, batch: int) -> np.ndarray:
    """Logits for all ``images`` in chunks of ``batch``."""
    return np.concatenate([runner(np.ascontiguousarray(images[i:i + batch], np.float32))
                           for i in range(0, len(images), batch)])
