"""manifest.json of an export directory: what each artifact is, what it was made from, and its hash.

Written atomically after every artifact, so it never names a file that is missing or incomplete.
Parity, check and bench read it and refuse an artifact whose bytes no longer match.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputFileError, StaleArtifactError
from .fileio import write_json_atomic
from .nets.build import sha256_file
from .spec import ModelSpec

MANIFEST = "manifest.json"
REFERENCE = "reference.safetensors"
FORMAT_TAG = "ulsam-deploy-manifest/1"


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
                 "ai-edge-litert", "tensorrt", "polygraphy", "numpy"):
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
                "calibration": None, "versions": tool_versions(), "artifacts": {}}
        return cls(Path(directory), data)

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise InputFileError(f"export directory {directory} does not exist", "run `ulsam-deploy export` first")
        if not path.is_file():
            raise InputFileError(f"{directory} has no {MANIFEST}", "pass an export directory made by `ulsam-deploy export`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputFileError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_TAG or not isinstance(data.get("artifacts"), dict):
            raise InputFileError(f"{path} is not an ulsam-deploy manifest")
        return cls(directory, data)

    def save(self) -> None:
        write_json_atomic(self.directory / MANIFEST, self.data)

    # --- views ------------------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.data["spec"])

    @property
    def artifacts(self) -> dict[str, dict]:
        return self.data["artifacts"]

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
        path = self.directory / entry["file"]
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
