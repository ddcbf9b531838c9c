"""One export directory per model: the reference weights, every requested artifact, manifest.json.

Artifacts already present whose bytes, source weights and calibration still match are kept;
everything else is (re)built under a temporary name and renamed into place, and the manifest is
rewritten after each artifact.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataSet, calibration_set
from ..errors import BackendUnavailable, StaleArtifactError, UlsamError
from ..runtime.base import EXTRAS
from ..manifest import REFERENCE, Manifest, weights_sha256
from ..nets import MobileNet, save_checkpoint
from ..nets.build import sha256_file
from . import FORMATS, RECIPE

PRODUCERS = {"onnx": "ulsam_deploy.export.onnx", "onnx-int8": "ulsam_deploy.export.quantize",
             "litert": "ulsam_deploy.export.tflite", "tensorrt": "ulsam_deploy.export.tensorrt"}


@dataclass
class ExportRequest:
    model: MobileNet
    model_name: str
    checkpoint: dict                  # {"path", "sha256"} or {"random_init_seed"}
    dataset: str | None               # the labelled set the model was trained on, if any
    preprocessing: dict
    formats: tuple[str, ...]
    calib_source: str = "photos"
    calib_samples: int = 128
    calib_method: str = "minmax"


@dataclass
class ExportedArtifact:
    format: str
    file: str
    precision: str
    backend: str
    size_mb: float
    seconds: float
    status: str                        # "built" or "kept"


@dataclass
class ExportResult:
    directory: str
    model: str
    artifacts: list[ExportedArtifact] = field(default_factory=list)
    calibration: dict | None = None
    seconds: float = 0.0


def _start_manifest(out: Path, request: ExportRequest, weights: str) -> Manifest:
    spec = request.model.spec
    try:
        manifest = Manifest.load(out)
        manifest.verify_model(spec, weights, request.model_name)
        return manifest
    except (UlsamError, KeyError):
        pass   # no usable manifest, or one from another model: start afresh
    manifest = Manifest.create(out, spec, request.model_name, weights, request.checkpoint,
                               request.preprocessing, request.dataset)
    save_checkpoint(request.model, out / REFERENCE)
    manifest.data["reference_sha256"] = sha256_file(out / REFERENCE)
    manifest.save()
    return manifest


def _is_current(manifest: Manifest, name: str, calib: dict | None) -> bool:
    entry = manifest.artifacts.get(name)
    if entry is None:
        return False
    try:
        manifest.verify_artifact(name)
    except StaleArtifactError:
        return False
    if entry.get("recipe") != RECIPE:
        return False
    if FORMATS[name].backend == "tensorrt":
        from .tensorrt import engine_mismatch, environment

        try:
            if engine_mismatch(entry, environment()):
                return False      # built by another TensorRT or GPU architecture: rebuild here
        except BackendUnavailable:
            pass                  # produce() says what is missing
    if not FORMATS[name].calibrated:
        return True
    calib = calib or {}
    return entry.get("calibration_sha256") == calib.get("sha256") and entry.get("calibration_method") == calib.get("method")


def run_export(request: ExportRequest, out: Path) -> ExportResult:
    """Produce ``request.formats`` in ``out``; see the module docstring for what is rebuilt."""
    start = time.perf_counter()
    out = Path(out)
    weights = weights_sha256(request.model)
    if any(FORMATS[n].backend == "tensorrt" for n in request.formats):
        from .tensorrt import require

        require("TensorRT export")    # fail before calibrating or writing anything
    manifest = _start_manifest(out, request, weights)
    result = ExportResult(str(out), request.model_name)
    calib: DataSet | None = None
    if any(FORMATS[name].calibrated for name in request.formats):
        calib = calibration_set(request.calib_source, request.model.spec.input_size, request.calib_samples)
        described = calib.describe() | {"method": request.calib_method}
        manifest.data["calibration"] = described
        manifest.save()
    for name in request.formats:
        fmt = FORMATS[name]
        calib_info = manifest.data.get("calibration") if fmt.calibrated else None
        if _is_current(manifest, name, calib_info):
            entry = manifest.artifacts[name]
            result.artifacts.append(ExportedArtifact(name, entry["file"], fmt.precision, fmt.backend,
                                                     entry["size_bytes"] / 1e6, entry["seconds"], "kept"))
            continue
        t0 = time.perf_counter()
        details = _produce(name, request, manifest, calib)
        details["recipe"] = RECIPE
        if fmt.calibrated:
            details |= {"calibration_sha256": calib.sha256, "calibration_method": request.calib_method}
        entry = manifest.record(name, fmt.filename, fmt.precision, fmt.backend, time.perf_counter() - t0, **details)
        result.artifacts.append(ExportedArtifact(name, fmt.filename, fmt.precision, fmt.backend,
                                                 entry["size_bytes"] / 1e6, entry["seconds"], "built"))
    result.calibration = manifest.data.get("calibration")
    result.seconds = time.perf_counter() - start
    return result


def _produce(name: str, request: ExportRequest, manifest: Manifest, calib: DataSet | None) -> dict:
    fmt, directory = FORMATS[name], manifest.directory
    target = directory / fmt.filename
    spec = request.model.spec
    if name == "onnx":
        from .onnx import export_onnx

        return export_onnx(request.model, spec.input_size, target)
    if name in ("onnx-int8", "onnx-int8-trt"):
        from .quantize import quantize_int8

        return quantize_int8(directory / FORMATS["onnx"].filename, target, calib.images, request.calib_method,
                             encoding="tensorrt" if name == "onnx-int8-trt" else "ort")
    try:
        producer = importlib.import_module(PRODUCERS[fmt.backend])
    except ModuleNotFoundError as exc:
        raise BackendUnavailable(f"format {name} needs {exc.name}, which is not installed",
                                 f"pip install 'ulsam-deploy[{EXTRAS.get(fmt.backend, 'all')}]'") from None
    return producer.produce(name, manifest, target, calib)
