"""Glue shared by commands: resolve a model and the data it is trained, calibrated and checked on."""

from __future__ import annotations

import json
from pathlib import Path

from .data import DataSet, digits
from .data.sets import evaluation_set, labelled_folder
from .data.preprocess import Preprocessing
from .errors import InputFileError, SpecError
from .nets import MobileNet, build_model, load_model
from .nets.build import checkpoint_file
from .options import spec_from_options
from .spec import ModelSpec


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a model folder or checkpoint ({} for .pth files)."""
    from .nets.build import read_safetensors

    path = checkpoint_file(path)
    return read_safetensors(path, tensors=False)[1] if path.suffix == ".safetensors" else {}


def reference_model(path: Path, spec: ModelSpec | None = None) -> tuple[MobileNet, dict[str, str]]:
    """The eager fp32 model of a checkpoint, with its metadata."""
    return load_model(path, spec), checkpoint_metadata(path)


def evaluation_data(source: str | None, spec: ModelSpec) -> DataSet:
    if not source:
        raise InputFileError("the model records no data set", "pass --data digits or --data DIR")
    data = evaluation_set(source, spec.input_size)
    if data.labels is not None and spec.num_classes != int(data.labels.max()) + 1:
        # labels of another task say nothing about this model; the images still serve for parity
        return DataSet(f"{data.source} (unlabelled for {spec.num_classes} classes)", data.images, None,
                       data.preprocessing, data.skipped)
    return data


def training_data(data: str, start_from: Path | None, arch, positions, groups, width, num_classes, input_size
                  ) -> tuple[MobileNet, DataSet, DataSet, str]:
    """(model to train, train set, test set, data name) for ``ulsam-deploy train``."""
    if data == "digits":
        num_classes = num_classes or digits.NUM_CLASSES
        input_size = input_size or 112
    spec = spec_from_options(arch, positions, groups, width, num_classes, input_size)
    model = load_model(start_from, spec) if start_from else build_model(spec, seed=0)
    if data == "digits":
        if spec.num_classes != digits.NUM_CLASSES:
            raise SpecError(f"digits has 10 classes, --num-classes is {spec.num_classes}")
        train_x, train_y = digits.load("train", spec.input_size)
        prep = digits.preprocessing(spec.input_size)
        train_set = DataSet("digits:train", train_x, train_y, prep)
        return model, train_set, evaluation_set("digits", spec.input_size), "digits"
    folder = Path(data)
    labelled = labelled_folder(folder, Preprocessing(size=spec.input_size))
    classes = int(labelled.labels.max()) + 1
    if classes != spec.num_classes:
        raise SpecError(f"{folder} has {classes} classes, the model has {spec.num_classes}", f"pass --num-classes {classes}")
    return model, labelled, labelled, str(folder)


# --- export, parity ------------------------------------------------------------------------------
RUNS = Path("runs")


def resolve_reference(model_path: Path | None, arch, positions, groups, width, num_classes, input_size):
    """(eager model, name, checkpoint record, dataset, preprocessing dict) for --model or spec options."""
    from .nets.build import sha256_file
    from .options import spec_for_model

    if model_path is None:
        spec = spec_from_options(arch, positions, groups, width, num_classes, input_size)
        return (build_model(spec, seed=0), spec.name, {"random_init_seed": 0}, None,
                Preprocessing(size=spec.input_size).to_dict())
    spec = spec_for_model(model_path, arch, positions, groups, width, num_classes, input_size)
    net, meta = reference_model(model_path, spec)
    ckpt = checkpoint_file(model_path)
    name = Path(model_path).name if Path(model_path).is_dir() else ckpt.stem
    dataset = meta.get("dataset")
    if dataset == "digits":
        prep = digits.preprocessing(spec.input_size).to_dict()
    else:
        prep = json.loads(meta["preprocessing"]) if "preprocessing" in meta else Preprocessing(size=spec.input_size).to_dict()
    return net, name, {"path": str(model_path), "sha256": sha256_file(ckpt)}, dataset, prep


def export_for(model_path, spec_options: tuple, formats: tuple[str, ...], out: Path | None, calib: str | None,
               calib_samples: int, calib_method: str):
    """Export (what is missing of) ``formats`` for a model; returns (ExportResult, Manifest)."""
    from .export.pipeline import ExportRequest, run_export
    from .manifest import Manifest

    net, name, checkpoint, dataset, prep = resolve_reference(model_path, *spec_options)
    request = ExportRequest(net, name, checkpoint, dataset, prep, formats,
                            calib_source=calib or dataset or "photos", calib_samples=calib_samples,
                            calib_method=calib_method)
    out = out or RUNS / name
    if out.exists() and not out.is_dir():
        raise InputFileError(f"--out {out} exists and is not a folder")
    result = run_export(request, out)
    return result, Manifest.load(out)


def parity_for(manifest, artifacts: list[str] | None, data: str | None, threads: int, overrides: dict,
               batch: int = 32, given_model: Path | None = None):
    """ParityResult for each artifact of ``manifest`` (all by default), against its reference weights."""
    from .manifest import REFERENCE, weights_sha256
    from .parity import run_parity, thresholds_for
    from .runtime import open_artifact, run_batched, torch_runner

    reference = load_model(manifest.directory / REFERENCE)
    if weights_sha256(reference) != manifest.data["weights_sha256"]:
        raise InputFileError(f"{manifest.directory / REFERENCE} does not match its manifest",
                             "re-run `ulsam-deploy export`")
    if given_model is not None:
        other = load_model(given_model)
        manifest.verify_model(other.spec, weights_sha256(other), str(given_model))
    spec = manifest.spec
    dataset = evaluation_data(data or manifest.data.get("dataset") or "photos", spec)
    reference_logits = run_batched(torch_runner(reference, threads), dataset.images, batch)
    names = artifacts or list(manifest.artifacts)
    results = []
    for name in names:
        path = manifest.verify_artifact(name)
        entry = manifest.artifacts[name]
        runner = open_artifact(path, entry["backend"], entry["precision"], threads)
        try:
            limits = thresholds_for(entry["backend"], entry["precision"], overrides)
            results.append(run_parity(name, entry["backend"], entry["precision"], runner, reference_logits,
                                      dataset, limits, batch))
        finally:
            runner.close()
    return results
