"""A parity pack: what a device needs to check an export's CPU artifacts without torch or this package.

The pack holds the artifacts, N evaluation images preprocessed as ``check`` feeds them, their labels, the eager
reference logits, the thresholds ``check`` applies to each artifact, a one-node INT8 probe, and ``verify.py``
(:mod:`.device_verify`, numpy and the runtimes only). ``pack.json`` lists every file's sha256; the pack id is the
sha256 of its content. The same export packed twice gives the same bytes: the reference is computed on one
thread in fixed batches, a zip has fixed timestamps and sorted entries.

The export directory keeps ``packs/<pack id>/`` (pack.json, reference, labels): what ``check --device-result``
recomputes a device's verdicts against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.stream import StreamStats, batches
from ..errors import InputFileError, UlsamError
from ..formats import FORMATS
from ..runtime import runner_options
from ..store.fileio import _umask, atomic_path, write_json_atomic
from ..store.manifest import Manifest, locked
from . import device_verify
from .parity import thresholds_for
from .run import checked_reference, data_source

PACK_BACKENDS = ("onnxruntime", "litert", "executorch")   # what verify.py runs; TensorRT engines need a GPU
PACKS = "packs"
INPUTS, REFERENCE, LABELS, PACK_JSON, VERIFIER = "inputs.npy", "reference.npy", "labels.npy", "pack.json", "verify.py"
KEPT = (PACK_JSON, REFERENCE, LABELS)        # what the export directory keeps of each pack
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
BATCH = 32                                   # check's batch: the reference is computed on the same batches


@dataclass
class PackedArtifact:
    format: str
    file: str
    backend: str
    precision: str
    size_bytes: int


@dataclass
class PackResult:
    path: str
    pack_id: str
    model: str
    data: str
    images: int
    labelled: bool
    size_bytes: int                          # the pack on disk (the zip, or the folder's files)
    zipped: bool
    artifacts: list[PackedArtifact] = field(default_factory=list)
    kept: str = ""                           # the export directory's copy of its reference


def make_pack(directory: Path, out: Path, formats: list[str] | None = None, data: str | None = None,
              images: int = 1000) -> PackResult:
    """Pack ``formats`` (default: every CPU artifact) of the export ``directory`` with the first ``images``
    images of ``data`` (default: the model's own test set) into ``out`` (a folder, or a ``.zip``)."""
    out, directory = Path(out), Path(directory)
    _check_out(out)
    if not os.access(directory, os.W_OK) and directory.is_dir():
        raise InputFileError(f"{directory} is not writable, and a pack's reference is kept there "
                             "(check --device-result reads it)", "copy the export directory somewhere writable")
    with locked(directory, "write"):
        manifest = Manifest.load(directory)
        names = _choose(manifest, formats)
        paths = {name: manifest.verify_artifact(name) for name in names}
        model, _ = checked_reference(manifest)
        source = data_source(manifest, data)
        inputs, labels, reference = _reference_pass(source, model, images)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_existing_parent(out)))
        try:
            pack = _stage(staging, manifest, names, paths, source.name, inputs, labels, reference)
            kept = _keep(directory, staging, pack)
            size = _publish(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    artifacts = [PackedArtifact(name, pack["artifacts"][name]["file"], pack["artifacts"][name]["backend"],
                                pack["artifacts"][name]["precision"], pack["artifacts"][name]["size_bytes"])
                 for name in names]
    return PackResult(str(out), pack["pack_id"], manifest.data["model"], source.name, len(inputs),
                      labels is not None, size, out.suffix.lower() == ".zip", artifacts, str(kept))


def _check_out(out: Path) -> None:
    """Refuse, before anything is written, an --out that exists or cannot be written."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir()) and out.suffix.lower() != ".zip"):
        raise InputFileError(f"--out {out} already exists", "name a new pack path, or delete the old pack first")
    parent = _existing_parent(out)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputFileError(f"--out {out} cannot be written ({parent} is not a writable folder)",
                             "choose a path you can write to")


def _existing_parent(out: Path) -> Path:
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _choose(manifest: Manifest, formats: list[str] | None) -> list[str]:
    artifacts = manifest.artifacts
    if formats is None:
        names = [name for name, entry in artifacts.items() if entry["backend"] in PACK_BACKENDS]
        if not names:
            raise InputFileError(f"{manifest.directory} holds no artifact a CPU runtime runs",
                                 "export onnx, onnx-int8, tflite-* or executorch-* formats first")
        return names
    for name in formats:
        if FORMATS[name].backend == "tflm":
            raise UlsamError(f"{name} runs on TFLite Micro, which a pack's verify.py does not run",
                             "check it here with `ulsam-deploy check`, whose tflm runner runs it as a microcontroller does")
        if FORMATS[name].backend not in PACK_BACKENDS:
            raise UlsamError(f"{name} runs on an NVIDIA GPU with TensorRT; a pack holds what CPU runtimes run",
                             "check it with `ulsam-deploy check` on the GPU machine")
        if name not in artifacts:
            raise InputFileError(f"{manifest.directory} has no artifact {name!r}",
                                 f"it has: {', '.join(artifacts) or 'none'}; export it first")
    return list(dict.fromkeys(formats))


def _reference_pass(source, model, images: int):
    """The first ``images`` preprocessed images of ``source`` (fewer when it has fewer), their labels, and
    the eager model's logits on them: one thread, check's batches, so a second pack gives the same bits."""
    import torch

    threads = torch.get_num_threads()
    parts, logits, count = [], [], 0
    torch.set_num_threads(1)
    try:
        with contextlib.closing(batches(source, BATCH, 2, StreamStats())) as stream, torch.inference_mode():
            for batch in stream:
                parts.append(batch)
                logits.append(model(torch.from_numpy(np.ascontiguousarray(batch.images, np.float32))).numpy())
                count += len(batch.images)
                if count >= images:
                    break
    finally:
        torch.set_num_threads(threads)
    if not parts:
        raise InputFileError(f"no usable images in {source.name}")
    inputs = np.ascontiguousarray(np.concatenate([p.images for p in parts])[:images], np.float32)
    labels = np.concatenate([p.labels for p in parts])[:images].astype(np.int64) if source.labelled else None
    return inputs, labels, np.ascontiguousarray(np.concatenate(logits)[:images], np.float32)


def _stage(staging: Path, manifest: Manifest, names, paths, data_name, inputs, labels, reference) -> dict:
    """Write every file of the pack into ``staging`` and return its pack.json (with the pack id)."""
    np.save(staging / INPUTS, inputs)
    np.save(staging / REFERENCE, reference)
    if labels is not None:
        np.save(staging / LABELS, labels)
    shutil.copyfile(Path(device_verify.__file__), staging / VERIFIER)
    (staging / device_verify.PROBE_FILE).write_bytes(_probe_model())
    artifacts = {}
    for name in names:
        entry = manifest.artifacts[name]
        shutil.copyfile(paths[name], staging / entry["file"])
        artifacts[name] = {"file": entry["file"], "sha256": entry["sha256"], "size_bytes": entry["size_bytes"],
                           "backend": entry["backend"], "precision": entry["precision"],
                           "graph": runner_options(entry).get("graph", "fused"), "isa": entry.get("isa"),
                           "thresholds": dataclasses.asdict(thresholds_for(entry["backend"], entry["precision"]))}
    pack = {"format": device_verify.PACK_FORMAT, "model": manifest.data["model"], "spec": manifest.data["spec"],
            "export": {"weights_sha256": manifest.data["weights_sha256"]},
            "data": {"name": data_name, "images": len(inputs), "labelled": labels is not None,
                     "sha256": hashlib.sha256(inputs.tobytes()).hexdigest(),
                     "preprocessing": manifest.data["preprocessing"]},
            "inputs": {"file": INPUTS, "shape": list(inputs.shape)},
            "reference": {"file": REFERENCE, "shape": list(reference.shape)},
            "labels": {"file": LABELS} if labels is not None else None,
            "artifacts": artifacts, "verifier": VERIFIER, "probe": device_verify.PROBE_FILE,
            "files": {p.name: device_verify.sha256_file(p) for p in sorted(staging.iterdir())}}
    pack["pack_id"] = device_verify.pack_id_of(pack)
    write_json_atomic(staging / PACK_JSON, pack)
    return pack


def _probe_model() -> bytes:
    """The verifier's INT8 probe: one MatMulInteger node, a (M, K) uint8 by b (K, N) int8."""
    from onnx import TensorProto, helper

    k = device_verify.PROBE_K
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8-probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [k, None])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)], ir_version=8,
                              producer_name="ulsam-deploy")
    return model.SerializeToString(deterministic=True)


def _keep(directory: Path, staging: Path, pack: dict) -> Path:
    """The export directory's copy of what a device's result is checked against: ``packs/<pack id>/``."""
    final = directory / PACKS / pack["pack_id"]
    if (final / PACK_JSON).is_file():
        return final        # the same content (its id says so)
    final.parent.mkdir(exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=".part-", dir=final.parent))
    try:
        for name in KEPT:
            if (staging / name).is_file():
                shutil.copyfile(staging / name, part / name)
        shutil.rmtree(final, ignore_errors=True)     # an incomplete one: no pack.json
        os.chmod(part, 0o777 & ~_umask())            # mkdtemp made it private
        os.replace(part, final)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return final


def _publish(staging: Path, out: Path) -> int:
    """Rename the staged pack to ``out`` (a folder), or zip it there (sorted entries, fixed timestamps);
    returns its size in bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(staging.iterdir())
    if out.suffix.lower() == ".zip":
        with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w") as archive:
            for path in files:
                info = zipfile.ZipInfo(path.name, ZIP_TIME)
                info.external_attr, info.compress_type, info.create_system = 0o644 << 16, zipfile.ZIP_DEFLATED, 3
                with open(path, "rb") as source, archive.open(info, "w") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
        return out.stat().st_size
    if out.is_dir():
        out.rmdir()                            # empty: _check_out said so
    os.chmod(staging, 0o777 & ~_umask())       # mkdtemp made it private
    os.replace(staging, out)
    return sum(p.stat().st_size for p in out.iterdir())
