"""manifest.json of an export directory: what each artifact is, what it was made from, and its hash.

Written atomically after every artifact, so it never names a file that is missing or incomplete.
Read through one schema (:class:`ManifestModel`): a manifest that does not fit is refused in one line,
and no file path in it may leave the export directory. Parity, check and bench refuse an artifact whose
bytes no longer match. Writers and readers coordinate through :func:`locked` (one writer at a time).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..data.preprocess import PreprocessingModel
from ..errors import InputFileError, StaleArtifactError, UlsamError, validation_line
from ..formats import FORMATS, ISA_FEATURES
from ..model.spec import ModelSpec
from ..nets.build import sha256_file
from .fileio import write_json_atomic
from .verified import MAX_ENTRIES, Verification

MANIFEST = "manifest.json"
REFERENCE = "reference.safetensors"
FORMAT_TAG = "ulsam-deploy-manifest/1"
LOCK = ".manifest.lock"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _file_name(value: str) -> str:
    """A file named by the manifest is a plain name inside the export directory, never a path."""
    if not _FILE.fullmatch(value) or value in (MANIFEST, LOCK):
        raise ValueError(f"{value!r} is not a file name inside the export directory")
    return value


def _sha(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError("not a sha256 hex digest")
    return value


class GateMark(BaseModel):
    """What ``export --keep-float auto`` measured on the artifact it left: passed or not, and why."""

    model_config = ConfigDict(extra="forbid", strict=True)
    passed: bool
    breaches: list[Annotated[str, Field(max_length=500)]] = Field(default_factory=list, max_length=16)
    by: Literal["export --keep-float auto"]
    data: str = Field(max_length=500)
    count: int = Field(ge=0)


class ArtifactEntry(BaseModel):
    """One artifact; producers add their own details (recipe, calibration, node counts, I/O...)."""

    model_config = ConfigDict(extra="allow", strict=True)
    file: str
    sha256: str
    size_bytes: int = Field(ge=0, le=1 << 50)
    precision: Literal["fp32", "fp16", "int8"]
    backend: Literal["onnxruntime", "litert", "tflm", "tensorrt", "executorch"]
    seconds: float = Field(ge=0, le=1e9, allow_inf_nan=False)
    recipe: Optional[str] = None
    keep_float: list[int] = Field(default_factory=list, max_length=64)   # paper layers left in float
    # INT8 ONNX: architecture -> "any", or the x86 features of which one the encoding's kernels need to be exact
    isa: Optional[dict[Literal["x86_64", "arm64"], Union[Literal["any"], list[Literal[ISA_FEATURES]]]]] = None
    ort_graph: Optional[Literal["qdq"]] = None     # ONNX Runtime runs it as its Q/DQ graph, no fused kernels
    gate: Optional[GateMark] = None          # the verdict of the search that built it (export --keep-float auto)

    @field_validator("keep_float")
    @classmethod
    def _layers(cls, value: list[int]) -> list[int]:
        if any(not 1 <= k <= 64 for k in value) or value != sorted(set(value)):
            raise ValueError("must be increasing paper layer numbers")
        return value

    @field_validator("file")
    @classmethod
    def _name(cls, value: str) -> str:
        return _file_name(value)

    @field_validator("sha256")
    @classmethod
    def _hash(cls, value: str) -> str:
        return _sha(value)


class ManifestModel(BaseModel):
    """The whole manifest.json; unknown top-level keys are kept (newer writers may add some)."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: Literal["ulsam-deploy-manifest/1"]
    model: str = Field(min_length=1, max_length=500)
    spec: dict[str, Any]
    weights_sha256: str
    reference: Literal["reference.safetensors"] = REFERENCE
    reference_sha256: Optional[str] = None
    checkpoint: dict[str, Any] = {}
    preprocessing: PreprocessingModel
    dataset: Optional[str] = None
    class_names: Optional[list[Annotated[str, Field(max_length=256)]]] = Field(None, max_length=100_000)
    calibration: Optional[dict[str, Any]] = None
    promised: list[str] = []
    artifacts: dict[str, ArtifactEntry]
    verified_on: list[Verification] = Field(default_factory=list, max_length=MAX_ENTRIES)   # store/verified.py

    @field_validator("weights_sha256", "reference_sha256")
    @classmethod
    def _hashes(cls, value: str | None) -> str | None:
        return value if value is None else _sha(value)

    @field_validator("spec")
    @classmethod
    def _spec(cls, value: dict) -> dict:
        try:
            ModelSpec.from_dict(value)
        except UlsamError as exc:
            raise ValueError(exc.message) from None
        return value

    @model_validator(mode="after")
    def _preprocessing_fits_the_model(self) -> "ManifestModel":
        size = ModelSpec.from_dict(self.spec).input_size
        if self.preprocessing.size != size:
            raise ValueError(f"preprocessing size {self.preprocessing.size} is not the model's input size {size}")
        return self

    @field_validator("artifacts")
    @classmethod
    def _known_formats(cls, value: dict) -> dict:
        for key, entry in value.items():
            fmt = FORMATS.get(key)
            if fmt is None:
                raise ValueError(f"unknown artifact format {key!r}")
            if entry.file != fmt.filename:
                raise ValueError(f"artifact {key!r} must be {fmt.filename}, not {entry.file!r}")
        return value


def weights_sha256(model) -> str:
    """Hash of a model's tensors in state-dict order: identifies the weights whatever file held them."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ulsam-deploy", "torch", "onnx", "onnxruntime", "onnxscript", "onnxsim", "onnx2tf", "tensorflow",
                 "ai-edge-litert", "tensorrt", "polygraphy", "executorch", "torchao", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


@dataclass
class Manifest:
    directory: Path
    data: dict = field(default_factory=dict)

    # --- creation and I/O -------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, spec: ModelSpec, model_name: str, weights: str, checkpoint: dict,
               preprocessing: dict, dataset: str | None) -> "Manifest":
        data = {"format": FORMAT_TAG, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "model": model_name, "spec": spec.to_dict(), "weights_sha256": weights, "checkpoint": checkpoint,
                "reference": REFERENCE, "preprocessing": preprocessing, "dataset": dataset,
                "calibration": None, "versions": tool_versions(), "promised": [], "artifacts": {}}
        return cls(Path(directory), data)

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        """Read and validate ``directory/manifest.json``; anything that does not fit the schema is refused."""
        directory = Path(directory)
        data = _read_json(directory)
        try:
            ManifestModel.model_validate(data)
        except ValidationError as exc:
            raise InputFileError(f"{directory / MANIFEST} is not a valid manifest: {validation_line(exc)}",
                                 "re-run `ulsam-deploy export` to rebuild the directory") from None
        except UlsamError as exc:
            raise InputFileError(f"{directory / MANIFEST}: {exc.message}", "re-run `ulsam-deploy export`") from None
        return cls(directory, data)

    @classmethod
    def salvage(cls, directory: Path) -> "Manifest | None":
        """For a writer: the manifest with every artifact entry that no longer fits the schema dropped
        (so it is rebuilt), or None when the manifest itself is unusable (start afresh)."""
        try:
            data = _read_json(Path(directory))
        except InputFileError:
            return None
        artifacts = data.get("artifacts") if isinstance(data.get("artifacts"), dict) else {}
        kept = {}
        for key, entry in artifacts.items():
            try:
                ManifestModel.model_validate(data | {"artifacts": {key: entry}})
                kept[key] = entry
            except (ValidationError, UlsamError):
                continue
        listed = data.get("verified_on") if isinstance(data.get("verified_on"), list) else []
        verified = [e for e in listed if _fits(Verification, e)]
        salvaged = data | {"artifacts": kept} | ({"verified_on": verified} if "verified_on" in data else {})
        try:
            ManifestModel.model_validate(salvaged)
        except (ValidationError, UlsamError):
            return None
        return cls(Path(directory), salvaged)

    def save(self) -> None:
        ManifestModel.model_validate(json.loads(json.dumps(self.data)))   # never write what a reader would refuse
        write_json_atomic(self.directory / MANIFEST, self.data)

    # --- views ------------------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.data["spec"])

    @property
    def artifacts(self) -> dict[str, dict]:
        return self.data["artifacts"]

    @property
    def promised(self) -> list[str]:
        """Formats an export into this directory was asked for (built or not)."""
        return list(self.data.get("promised") or [])

    def promise(self, formats) -> None:
        self.data["promised"] = list(dict.fromkeys(self.promised + list(formats)))
        self.save()

    def record(self, key: str, filename: str, precision: str, backend: str, seconds: float, **details) -> dict:
        path = self.directory / filename
        entry = {"file": filename, "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
                 "precision": precision, "backend": backend, "seconds": round(seconds, 2), **details}
        self.artifacts[key] = entry
        self.save()
        return entry

    # --- verification -----------------------------------------------------------------------------
    def verify_artifact(self, key: str) -> Path:
        """The artifact's path, after checking that its bytes are the ones recorded."""
        entry = self.artifacts.get(key)
        if entry is None:
            raise InputFileError(f"{self.directory} has no artifact {key!r}",
                                 f"it has: {', '.join(self.artifacts) or 'none'}")
        path = self.directory / _file_name(entry["file"])
        if not path.is_file():
            raise StaleArtifactError(f"{path} named in the manifest is missing", "re-run `ulsam-deploy export`")
        if sha256_file(path) != entry["sha256"]:
            raise StaleArtifactError(f"{path} does not match its manifest sha256 (modified after export)",
                                     "re-run `ulsam-deploy export` to rebuild it")
        return path

    def verify_model(self, spec: ModelSpec, weights: str, source: str) -> None:
        """Refuse when the model given is not the one this directory was exported from."""
        if spec != self.spec:
            raise StaleArtifactError(f"{self.directory} was exported from {self.spec.name}, not {spec.name} ({source})",
                                     "re-run `ulsam-deploy export` for this model")
        if weights != self.data["weights_sha256"]:
            raise StaleArtifactError(f"{self.directory} was exported from other weights than {source} "
                                     "(the model changed after export)", "re-run `ulsam-deploy export`")


def _fits(model, value) -> bool:
    try:
        model.model_validate(value)
    except ValidationError:
        return False
    return True


def _read_json(directory: Path) -> dict:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise InputFileError(f"export directory {directory} does not exist", "run `ulsam-deploy export` first")
    if not path.is_file():
        raise InputFileError(f"{directory} has no {MANIFEST}", "pass an export directory made by `ulsam-deploy export`")
    try:
        if path.stat().st_size > 16 << 20:
            raise InputFileError(f"{path} is over 16 MB, not a manifest")
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputFileError(f"{path} is not valid JSON: {str(exc)[:120]}") from None
    except OSError as exc:
        raise InputFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_TAG:
        raise InputFileError(f"{path} is not an ulsam-deploy manifest")
    return data


@contextmanager
def locked(directory: Path, mode: Literal["read", "write"]) -> Iterator[None]:
    """Hold the export directory's inter-process lock: one writer, or any number of readers.

    A reader of a directory it cannot write to (read-only media, someone else's files) reads without
    the lock: nobody can be exporting into it either.
    """
    from filelock import ReadWriteLock

    path = Path(directory) / LOCK
    try:
        lock = ReadWriteLock(str(path), is_singleton=False)
        context = lock.write_lock() if mode == "write" else lock.read_lock()
        context.__enter__()
    except Exception as exc:   # sqlite3/OS errors: the lock file cannot be created or opened
        if mode == "read" and not _writable(Path(directory)):
            yield
            return
        raise InputFileError(f"cannot lock {directory}: {str(exc).splitlines()[0][:160]}") from None
    try:
        yield
    finally:
        context.__exit__(None, None, None)
        lock.close()


def _writable(directory: Path) -> bool:
    import os

    return os.access(directory, os.W_OK)
