"""Glue shared by commands: resolve a model and the data it is trained, calibrated and checked on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import DataSet, digits
from .data.sets import REFERENCE_SETS, evaluation_set, labelled_folder
from .data.preprocess import Preprocessing
from .errors import InputFileError, SpecError
from .nets import MobileNet, build_model, load_model
from .nets.build import checkpoint_file
from .options import ModelOptions, spec_for_model
from .spec import ModelSpec


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a model folder or checkpoint ({} for .pth files)."""
    from .nets.build import read_safetensors

    path = checkpoint_file(path)
    return read_safetensors(path, tensors=False)[1] if path.suffix == ".safetensors" else {}


def reference_model(path: Path, spec: ModelSpec | None = None) -> tuple[MobileNet, dict[str, str]]:
    """The eager fp32 model of a checkpoint, with its metadata."""
    return load_model(path, spec), checkpoint_metadata(path)


def training_data(data: str, start_from: Path | None, options: ModelOptions) -> tuple[MobileNet, DataSet, DataSet, str]:
    """(model to train, train set, test set, data name) for ``ulsam-deploy train``, the data preprocessed
    the model's way (``--preprocess``, else what the start checkpoint records)."""
    reference = REFERENCE_SETS.get(data)
    if start_from is not None:
        model, prep = _start_model(start_from, options)
    else:
        if reference is not None:
            options = options.with_defaults(num_classes=reference.NUM_CLASSES, input_size=reference.DEFAULT_SIZE)
        model = build_model(options.spec(), seed=0)
        prep = options.preprocessing(model.spec)
    spec = model.spec
    if reference is not None:
        if spec.num_classes != reference.NUM_CLASSES:
            raise SpecError(f"{data} has {reference.NUM_CLASSES} classes, the model {spec.num_classes}",
                            f"`build --from` the checkpoint with --num-classes {reference.NUM_CLASSES} first"
                            if start_from else None)
        own = reference.preprocessing(spec.input_size)   # the set's rendering, the model's mean and std
        train_x, train_y = reference.load("train", spec.input_size)
        data_prep = own.with_normalisation_of(prep)
        train_set = DataSet(f"{data}:train", data_prep.renormalise(train_x, own), train_y, data_prep)
        return model, train_set, evaluation_set(data, spec.input_size, prep), data
    folder = Path(data)
    labelled = labelled_folder(folder, prep)
    classes = int(labelled.labels.max()) + 1
    if classes != spec.num_classes:
        raise SpecError(f"{folder} has {classes} classes, the model has {spec.num_classes}", f"pass --num-classes {classes}")
    return model, labelled, labelled, str(folder)


def _start_model(path: Path, options: ModelOptions):
    """(the checkpoint to fine-tune, its preprocessing); ``--input-size`` may differ from the checkpoint's."""
    from dataclasses import replace

    from .nets.build import load_state, model_from, read_checkpoint

    checkpoint = read_checkpoint(path)
    model = model_from(checkpoint, spec_for_model(path, replace(options, input_size=None)))
    if options.input_size is not None and options.input_size != model.spec.input_size:   # same weights
        model = load_state(build_model(model.spec.replace(input_size=options.input_size), seed=None),
                           model.state_dict(), str(path))
    recorded = model_preprocessing(checkpoint.metadata, model.spec) if checkpoint.metadata else None
    return model, options.preprocessing(model.spec, recorded, checkpoint.layout.preprocess)


# --- export, parity ------------------------------------------------------------------------------
RUNS = Path("runs")


def resolve_reference(model_path: Path | None, options: ModelOptions):
    """(eager model, name, checkpoint record, dataset, preprocessing dict) for --model or the model options.

    A checkpoint's recorded preprocessing is the one used; ``--preprocess`` serves files that record none.
    """
    from .nets.build import model_from, read_checkpoint, sha256_file

    if model_path is None:
        spec = options.spec()
        return (build_model(spec, seed=0), spec.name, {"random_init_seed": 0}, None,
                options.preprocessing(spec).to_dict())
    spec = spec_for_model(model_path, options)
    checkpoint = read_checkpoint(model_path)
    net, meta = model_from(checkpoint, spec), checkpoint.metadata
    if "preprocessing" in meta or meta.get("dataset") in REFERENCE_SETS:
        prep = model_preprocessing(meta, spec)
        if options.preprocess is not None and options.preprocessing(spec) != Preprocessing.from_dict(prep):
            raise SpecError(f"--model {model_path} records its preprocessing; --preprocess {options.preprocess} "
                            "differs", "drop --preprocess (`build --from` or `train --preprocess` choose it)")
    else:
        prep = options.preprocessing(spec, None, checkpoint.layout.preprocess).to_dict()
    name = Path(model_path).name if Path(model_path).is_dir() else checkpoint.path.stem
    return (net, name, {"path": str(model_path), "sha256": sha256_file(checkpoint.path)}, meta.get("dataset"), prep)


def model_preprocessing(meta: dict[str, str], spec: ModelSpec) -> dict:
    """The preprocessing a checkpoint records (else its reference set's, else the default at its input size)."""
    if "preprocessing" in meta:
        return json.loads(meta["preprocessing"])
    dataset = meta.get("dataset")
    if dataset in REFERENCE_SETS:
        return REFERENCE_SETS[dataset].preprocessing(spec.input_size).to_dict()
    return Preprocessing(size=spec.input_size).to_dict()


def export_for(model_path, options: ModelOptions, formats: tuple[str, ...], out: Path | None, calib: str | None,
               calib_samples: int, calib_method: str, on_step=None, keep_float: tuple[int, ...] = ()):
    """Export (what is missing of) ``formats`` for a model; returns (ExportResult, Manifest).
    ``keep_float``: paper layers the INT8 formats keep in float."""
    from .export.pipeline import ExportRequest, run_export
    from .manifest import Manifest

    net, name, checkpoint, dataset, prep = resolve_reference(model_path, options)
    request = ExportRequest(net, name, checkpoint, dataset, prep, formats,
                            calib_source=calib or dataset or "photos", calib_samples=calib_samples,
                            calib_method=calib_method, keep_float=tuple(keep_float))
    out = out or RUNS / name
    result = run_export(request, out, on_step=on_step)
    return result, Manifest.load(out)


def parity_for(manifest, artifacts: list[str] | None, data: str | None, threads: int, overrides: dict,
               batch: int = 32, given_model: Path | None = None):
    """ParityResult for each artifact of ``manifest`` (all listed or promised by default)."""
    from .verify import run_parity

    return run_parity(manifest.directory, artifacts, data, threads, overrides, batch, given_model).results


def evaluate_stream(net: MobileNet, source, threads: int = 0, batch: int = 64, on_batch=None):
    """(top-1 %, top-5 %, images, StreamStats) of the eager model over a labelled stream."""
    from .data.stream import StreamStats, batches
    from .runtime import torch_runner

    stats, runner = StreamStats(), torch_runner(net, threads)
    top1 = top5 = 0
    try:
        for chunk in batches(source, batch, stats=stats):
            logits = runner(chunk.images)
            top = np.argsort(-logits, axis=1)[:, :5]
            top1 += int((top[:, 0] == chunk.labels).sum())
            top5 += int((top == chunk.labels[:, None]).any(axis=1).sum())
            if on_batch:
                on_batch(len(chunk.images))
    finally:
        runner.close()
    if stats.count == 0:
        raise InputFileError(f"no usable images in {source.name} ({stats.skipped} skipped)")
    return 100.0 * top1 / stats.count, 100.0 * top5 / stats.count, stats.count, stats
