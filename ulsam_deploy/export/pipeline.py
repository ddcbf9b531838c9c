"""One export directory per model: the reference weights, every requested artifact, manifest.json.

Artifacts already present whose bytes, source weights and calibration still match are kept;
everything else is (re)built under a temporary name and renamed into place, and the manifest is
rewritten after each artifact. Every option and input is validated before the first write (a refused
command leaves nothing behind), and the whole export holds the directory's write lock, so concurrent
exports into one directory serialise and the manifest always lists every artifact with its true hash.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataSet, Preprocessing, calibration_set
from ..errors import BackendUnavailable, InputFileError, Interrupted, StaleArtifactError, UlsamError
from ..extras import install_hint, require
from ..store.manifest import REFERENCE, Manifest, locked, weights_sha256
from ..runtime.base import usable_cores
from ..runtime.io import describe_io
from ..nets import MobileNet, save_checkpoint
from ..nets.build import sha256_file
from ..formats import NPU_FORMATS, TFLITE_BACKENDS
from . import FORMATS, KEEP_FLOAT_FORMATS, RECIPE, check_keep_float
from .describe import embed
from .vela import DEFAULT_NPU

PRODUCERS = {"onnx": "ulsam_deploy.export.onnx", "onnx-int8": "ulsam_deploy.export.quantize",
             "litert": "ulsam_deploy.export.tflite", "tflm": "ulsam_deploy.export.tflite", "tensorrt": "ulsam_deploy.export.tensorrt",
             "executorch": "ulsam_deploy.export.executorch"}
# The Q/DQ ONNX formats and the INT8 encoding each is written in (export/quantize.py).
ONNX_ENCODINGS = {"onnx-int8": "ort", "onnx-int8-vnni": "ort-vnni", "onnx-int8-trt": "tensorrt"}


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
    keep_float: tuple[int, ...] = ()  # paper layers kept in float in the INT8 formats that honour it
    class_names: tuple[str, ...] = ()  # written into the artifacts that can carry them (default class_0 ...)
    accuracy: str | None = None        # the checkpoint's recorded test accuracy, for the artifacts' description
    npu: str = DEFAULT_NPU             # the Ethos-U configuration tflite-int8-npu is compiled for (export/vela.py)

    def facts(self):
        from importlib.metadata import PackageNotFoundError, version

        from .describe import ModelFacts

        try:
            ours = version("ulsam-deploy")
        except PackageNotFoundError:
            ours = ""
        names = self.class_names or tuple(f"class_{i}" for i in range(self.model.spec.num_classes))
        return ModelFacts(self.model_name, self.model.spec.to_dict(), self.preprocessing, names, self.dataset,
                          self.accuracy, ours)


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
    """The directory's manifest if it is this model's (entries that no longer fit the schema dropped),
    else a fresh one with the reference weights written."""
    spec = request.model.spec
    manifest = Manifest.salvage(out)
    if manifest is not None:
        try:
            manifest.verify_model(spec, weights, request.model_name)
            if manifest.data.get("reference_sha256") == _sha_or_none(out / REFERENCE):
                return manifest
        except UlsamError:
            pass   # another model's directory: start afresh
    manifest = Manifest.create(out, spec, request.model_name, weights, request.checkpoint,
                               request.preprocessing, request.dataset)
    save_checkpoint(request.model, out / REFERENCE)
    manifest.data["reference_sha256"] = sha256_file(out / REFERENCE)
    manifest.save()
    return manifest


def _sha_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def check_output_dir(out: Path) -> None:
    """Refuse, before anything is written, an --out that cannot become a writable directory."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputFileError(f"--out {out} exists and is not a folder", "name a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputFileError(f"--out {out} is not writable", "choose a folder you can write to")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputFileError(f"--out {out} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or str(out.resolve()).startswith("/proc/"):
        raise InputFileError(f"--out {out} cannot be created: {parent} is not writable",
                             "choose a folder you can write to")


def validate(request: ExportRequest) -> DataSet | None:
    """Every check that can fail on the user's input, before anything is written; returns the
    calibration set when a calibrated format is asked for."""
    from .quantize import METHODS

    unknown = [n for n in request.formats if n not in FORMATS]
    if unknown:
        raise UlsamError(f"format {unknown[0]!r} is unknown", f"choose from {', '.join(FORMATS)}")
    if request.calib_method not in METHODS:
        raise UlsamError(f"calibration method {request.calib_method!r} is unknown", f"choose one of {', '.join(METHODS)}")
    check_keep_float(request.keep_float, request.model.spec)
    if any(FORMATS[n].backend == "tensorrt" for n in request.formats):
        from ..runtime.engines import require as require_tensorrt

        require_tensorrt("TensorRT export")
    if any(FORMATS[n].backend in TFLITE_BACKENDS for n in request.formats):
        require("litert", "TFLite export")
    if any(FORMATS[n].backend == "tflm" for n in request.formats):
        require("tflm", "The microcontroller format (TFLite Micro)")
    if any(FORMATS[n].backend == "executorch" for n in request.formats):
        require("executorch", "ExecuTorch export")
    if any(n in NPU_FORMATS for n in request.formats):
        require("ethos-u", "The NPU format (Vela)")
    if not any(FORMATS[name].calibrated for name in request.formats):
        return None
    return calibration_set(request.calib_source, request.model.spec.input_size, request.calib_samples,
                           Preprocessing.from_dict(request.preprocessing))   # the model's own preprocessing


def run_export(request: ExportRequest, out: Path, on_step=None) -> ExportResult:
    """Produce ``request.formats`` in ``out``; see the module docstring for what is rebuilt.

    ``on_step(description)`` is called as each step starts (for a progress display)."""
    start = time.perf_counter()
    out = Path(out)
    calib = validate(request)
    check_output_dir(out)
    created = not out.exists()
    result = ExportResult(str(out), request.model_name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with locked(out, "write"):
            _export_locked(request, out, calib, result, on_step or (lambda what: None))
    except KeyboardInterrupt:
        kept = ", ".join(a.format for a in result.artifacts) or "nothing finished yet"
        raise Interrupted(f"interrupted; kept in {out}: {kept}", "re-run the same command to resume") from None
    except OSError as exc:
        if created and not result.artifacts:
            shutil.rmtree(out, ignore_errors=True)
        raise InputFileError(f"cannot write to {out}: {exc.strerror or exc}",
                             "free space or choose another --out") from None
    result.calibration = Manifest.load(out).data.get("calibration")
    result.seconds = time.perf_counter() - start
    return result


def _export_locked(request: ExportRequest, out: Path, calib: DataSet | None, result: ExportResult, on_step) -> None:
    on_step("reference weights")
    manifest = _start_manifest(out, request, weights_sha256(request.model))
    facts = request.facts()
    facts_sha256 = facts.sha256()
    manifest.data["class_names"] = list(facts.class_names)
    manifest.promise(request.formats)
    if calib is not None:
        manifest.data["calibration"] = calib.describe() | {"method": request.calib_method}
        manifest.save()
    todo = []
    for name in request.formats:
        fmt = FORMATS[name]
        calib_info = manifest.data.get("calibration") if fmt.calibrated else None
        if _is_current(manifest, name, calib_info, request.keep_float, facts_sha256, request.npu):
            entry = manifest.artifacts[name]
            result.artifacts.append(ExportedArtifact(name, entry["file"], fmt.precision, fmt.backend,
                                                     entry["size_bytes"] / 1e6, entry["seconds"], "kept"))
        else:
            todo.append(name)

    def record(name: str, details: dict, seconds: float) -> None:
        fmt = FORMATS[name]
        entry = manifest.record(name, fmt.filename, fmt.precision, fmt.backend, seconds, **details)
        result.artifacts.append(ExportedArtifact(name, fmt.filename, fmt.precision, fmt.backend,
                                                 entry["size_bytes"] / 1e6, entry["seconds"], "built"))

    groups = lanes(todo)
    workers = lane_workers(groups)
    if workers > 1:
        from .parallel import run_lanes

        run_lanes(groups, workers, (request, str(out), calib), record, on_step)
    else:
        for name in todo:
            on_step(name)
            t0 = time.perf_counter()
            record(name, build_artifact(name, request, manifest, calib, facts), time.perf_counter() - t0)
    result.artifacts.sort(key=lambda a: request.formats.index(a.format))


# Formats that share no work run in separate lanes: the ONNX family (and TensorRT, built from its ONNX
# files), LiteRT (its own channels-last ONNX and converter) and each ExecuTorch program. Longest first, so
# that the workers finish together: the headline's CPU formats took 46 s (LiteRT), 44 s (ExecuTorch INT8),
# 17 s (ExecuTorch fp32) and 12 s (ONNX) in a quiet round on 2 cores (docs/formats.md).
LANES = ("litert", "executorch-int8", "executorch-fp32", "tflm", "onnx")


def lanes(names: list[str]) -> list[list[str]]:
    """``names`` (dependencies first) grouped into lanes that can be built side by side, heaviest first."""
    def lane(name: str) -> str:
        fmt = FORMATS[name]
        return name if fmt.backend == "executorch" else fmt.backend if fmt.backend in TFLITE_BACKENDS else "onnx"

    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(lane(name), []).append(name)
    return [grouped[key] for key in sorted(grouped, key=LANES.index)]


def lane_workers(groups: list[list[str]]) -> int:
    """Processes to build ``groups`` in: one per lane up to the cores this process may use
    (``ULSAM_EXPORT_WORKERS`` overrides; 1 builds everything here, one artifact after another)."""
    given = os.environ.get("ULSAM_EXPORT_WORKERS", "").strip()
    cores = int(given) if given.isdigit() and int(given) > 0 else usable_cores()
    return max(1, min(len(groups), cores))


def build_artifact(name: str, request: ExportRequest, manifest: Manifest, calib: DataSet | None, facts) -> dict:
    """Write artifact ``name`` into the manifest's directory and return its manifest details (the entry
    without the file's hash, size and time, which :meth:`Manifest.record` adds)."""
    fmt = FORMATS[name]
    details = _produce(name, request, manifest, calib)
    container = "litert" if fmt.backend == "tflm" else fmt.backend      # a TFLite file either way
    if embed(container, manifest.directory / fmt.filename, facts, name):
        details["embedded_metadata"] = {"kind": "TFLITE_METADATA + labels.txt" if container == "litert"
                                        else "metadata_props", "facts_sha256": facts.sha256()}
    details["recipe"] = RECIPE
    if name in KEEP_FLOAT_FORMATS:
        details["keep_float"] = sorted(request.keep_float)
    details["io"] = describe_io(manifest.directory / fmt.filename, fmt.backend)
    if fmt.backend == "litert":
        from ..runtime.litert import delegate_split

        details["xnnpack"] = delegate_split(manifest.directory / fmt.filename)
    if fmt.calibrated:
        details |= {"calibration_sha256": calib.sha256, "calibration_method": request.calib_method}
    return details


def _is_current(manifest: Manifest, name: str, calib: dict | None, keep_float: tuple[int, ...] = (),
                facts_sha256: str | None = None, npu: str | None = None) -> bool:
    entry = manifest.artifacts.get(name)
    if entry is None:
        return False
    if name in NPU_FORMATS and not _compiled_current(manifest, entry, npu):
        return False
    embedded = entry.get("embedded_metadata")
    if isinstance(embedded, dict) and embedded.get("facts_sha256") != facts_sha256:
        return False      # the model's labels or description changed: stamp a fresh file
    if name in KEEP_FLOAT_FORMATS and entry.get("keep_float", []) != sorted(keep_float):
        return False
    try:
        manifest.verify_artifact(name)
    except StaleArtifactError:
        return False
    if entry.get("recipe") != RECIPE or "io" not in entry:
        return False
    if FORMATS[name].backend == "tensorrt":
        from ..runtime.engines import engine_mismatch, environment

        try:
            if engine_mismatch(entry, environment()):
                return False      # built by another TensorRT or GPU architecture: rebuild here
        except BackendUnavailable:
            pass                  # produce() says what is missing
    if not FORMATS[name].calibrated:
        return True
    calib = calib or {}
    return entry.get("calibration_sha256") == calib.get("sha256") and entry.get("calibration_method") == calib.get("method")


def _compiled_current(manifest: Manifest, entry: dict, npu: str | None) -> bool:
    """An NPU artifact is current only if compiled for ``npu`` and its compiled file is the one recorded."""
    compiled = entry.get("vela")
    if not isinstance(compiled, dict) or compiled.get("npu") != npu or not isinstance(compiled.get("file"), str):
        return False
    path = manifest.directory / Path(compiled["file"]).name
    return path.is_file() and sha256_file(path) == compiled.get("sha256")


def _produce(name: str, request: ExportRequest, manifest: Manifest, calib: DataSet | None) -> dict:
    fmt, directory = FORMATS[name], manifest.directory
    target = directory / fmt.filename
    spec = request.model.spec
    if name == "onnx":
        from ..nets.ulsam import export_form
        from .onnx import export_onnx

        with export_form(request.model, "spread"):      # 4-D, one node chain per ULSAM: see nets.ulsam
            return export_onnx(request.model, spec.input_size, target)
    if name in ONNX_ENCODINGS:
        from .quantize import quantize_int8

        return quantize_int8(directory / FORMATS["onnx"].filename, target, calib.images, request.calib_method,
                             encoding=ONNX_ENCODINGS[name],
                             keep_float=request.keep_float, reference=request.model)
    try:
        producer = importlib.import_module(PRODUCERS[fmt.backend])
    except ModuleNotFoundError as exc:
        raise BackendUnavailable(f"format {name} needs {exc.name}, which is not installed",
                                 install_hint(fmt.backend)) from None
    extra = {"keep_float": request.keep_float} if fmt.backend in ("litert", "executorch") else {}
    if name in NPU_FORMATS:
        extra["npu"] = request.npu
    if fmt.backend == "executorch" and fmt.calibrated:
        extra["calib_method"] = request.calib_method
    return producer.produce(name, manifest, target, calib, **extra)
