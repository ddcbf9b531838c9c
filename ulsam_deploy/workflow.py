"""Glue shared by commands: resolve a model and the data it is trained, calibrated and checked on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.sets import REFERENCE_SETS, reference_set
from .data.preprocess import Preprocessing
from .errors import InputFileError, SpecError, printable
from .export.options import ExportOptions
from .nets import MobileNet, build_model
from .model.options import ModelOptions
from .model.spec import ModelSpec


def checkpoint_metadata(path: Path) -> dict:
    """The validated metadata of a model folder or checkpoint as a dict ({} for .pth files and other
    libraries' safetensors); see :class:`~ulsam_deploy.nets.metadata.CheckpointMetadata`."""
    from .nets.build import read_metadata

    metadata = read_metadata(path)
    return metadata.as_dict() if metadata else {}


def spec_for_model(model: Path | None, options: ModelOptions) -> ModelSpec:
    """The spec of ``--model`` if given (spec options must then agree with a stored spec), else the options.

    A checkpoint without a stored spec (.pth, torchvision, timm) starts from what its tensors show.
    """
    if model is None:
        return options.spec()
    from .nets.build import read_checkpoint, stored_spec

    stored = stored_spec(model)
    if stored is None:
        from .nets.surgery import source_fields

        return options.spec(source_fields(read_checkpoint(model)))
    requested = options.spec(stored)
    if requested != stored:
        raise SpecError(f"--model {model} is {stored.name}; the options ask for {requested.name}",
                        "drop the spec options when passing --model")
    return stored


def reference_model(path: Path, spec: ModelSpec | None = None):
    """(the eager fp32 model of a checkpoint, its validated metadata or None)."""
    from .nets.build import model_from, read_checkpoint

    checkpoint = read_checkpoint(path)
    return model_from(checkpoint, spec), checkpoint.metadata


def training_setup(data: str, val: Path | None, start_from: Path | None, options: ModelOptions,
                   shift: int | None, hflip: bool | None, seed: int, allow_large: bool = False):
    """(model to train, TrainData) for ``ulsam-deploy train``: the data preprocessed the model's way
    (``--preprocess``, else what the start checkpoint records), augmented as befits its kind."""
    from .training.data import folder_data, reference_data

    reference = REFERENCE_SETS.get(data)
    if start_from is not None:
        model, prep = _start_model(start_from, options)
    else:
        if reference is not None:
            options = options.with_defaults(num_classes=reference.NUM_CLASSES, input_size=reference.DEFAULT_SIZE)
        from .nets.build import check_model_size

        check_model_size(options.spec(), allow_large=allow_large)   # the network at batch 1, before any weight exists
        model = build_model(options.spec(), seed=0)
        prep = options.preprocessing(model.spec)
    spec = model.spec
    if reference is not None:
        if val is not None:
            raise SpecError(f"--val is for image folders; {data} has its own test split", "drop --val")
        if spec.num_classes != reference.NUM_CLASSES:
            raise SpecError(f"{data} has {reference.NUM_CLASSES} classes, the model {spec.num_classes}",
                            f"`build --from` the checkpoint with --num-classes {reference.NUM_CLASSES} first"
                            if start_from else None)
        shift = round(spec.input_size / 14) if shift is None else shift
        hflip = reference.HFLIP if hflip is None else hflip
        return model, reference_data(reference, data, spec.input_size, prep, shift, hflip, seed)
    folder = Path(data)
    if not folder.is_dir():
        raise InputFileError(f"--data {data} is neither a reference set ({', '.join(REFERENCE_SETS)}) nor a folder")
    if shift:
        raise SpecError("--shift is the reference sets' augmentation; image folders get random resized crops",
                        "drop --shift")
    train_data = folder_data(folder, val, prep, True if hflip is None else hflip, seed)
    if train_data.num_classes != spec.num_classes:
        raise SpecError(f"{folder} has {train_data.num_classes} classes, the model has {spec.num_classes}",
                        f"pass --num-classes {train_data.num_classes}")
    return model, train_data


def teacher_model(path: Path, student: ModelSpec) -> MobileNet:
    """The distillation teacher: any checkpoint `build --from` reads, run at the student's input size."""
    teacher, _ = _start_model(path, ModelOptions(input_size=student.input_size))
    if teacher.spec.num_classes != student.num_classes:
        raise SpecError(f"--teacher {path} has {teacher.spec.num_classes} classes, the student {student.num_classes}",
                        "distil from a teacher of the same classes")
    return teacher


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


def resolve_reference(model_path: Path | None, options: ModelOptions, allow_large: bool = False):
    """(eager model, name, checkpoint record, dataset, preprocessing dict, validated metadata or None) for
    --model or the model options.

    A checkpoint's recorded preprocessing is the one used; ``--preprocess`` serves files that record none.
    The dataset is a reference set's name or None: what else a checkpoint records is never read as a path.
    A network over the size limit is refused before it is built (``allow_large`` lifts the limit).
    """
    from .nets.build import check_model_size, model_from, read_checkpoint, sha256_file

    if model_path is None:
        spec = options.spec()
        check_model_size(spec, allow_large=allow_large)
        return (build_model(spec, seed=0), spec.name, {"random_init_seed": 0}, None,
                options.preprocessing(spec).to_dict(), None)
    spec = spec_for_model(model_path, options)
    check_model_size(spec, allow_large=allow_large)
    checkpoint = read_checkpoint(model_path)
    net, meta = model_from(checkpoint, spec), checkpoint.metadata
    dataset = reference_set(meta.dataset) if meta else None
    if (meta and meta.preprocessing) or dataset:
        prep = model_preprocessing(meta, spec)
        if options.preprocess is not None and options.preprocessing(spec) != Preprocessing.from_dict(prep):
            raise SpecError(f"--model {model_path} records its preprocessing; --preprocess {options.preprocess} "
                            "differs", "drop --preprocess (`build --from` or `train --preprocess` choose it)")
    else:
        prep = options.preprocessing(spec, None, checkpoint.layout.preprocess).to_dict()
    name = Path(model_path).name if Path(model_path).is_dir() else checkpoint.path.stem
    record = {"path": printable(str(model_path)), "sha256": sha256_file(checkpoint.path)}
    return net, name, record, dataset, prep, meta


def class_names(meta, spec: ModelSpec) -> tuple[str, ...]:
    """The output labels: those the checkpoint records, else its reference set's, else class_0 ... class_N-1."""
    if meta is not None and meta.class_names and len(meta.class_names) == spec.num_classes:
        return tuple(meta.class_names)
    dataset = reference_set(meta.dataset) if meta is not None else None
    if dataset and REFERENCE_SETS[dataset].NUM_CLASSES == spec.num_classes:
        return tuple(REFERENCE_SETS[dataset].CLASS_NAMES)
    return tuple(f"class_{i}" for i in range(spec.num_classes))


def accuracy_text(meta) -> str | None:
    if meta is None or meta.test_top1 is None:
        return None
    count = f" on {meta.test_count:,} images" if meta.test_count else ""
    return f"test top-1 {meta.test_top1:.2f} %{count}"


def model_preprocessing(meta, spec: ModelSpec) -> dict:
    """The preprocessing a checkpoint's validated metadata (or None) records, else its reference set's,
    else the default at its input size."""
    if meta is not None and meta.preprocessing is not None:
        return meta.preprocessing_dict()
    dataset = reference_set(meta.dataset) if meta is not None else None
    if dataset:
        return REFERENCE_SETS[dataset].preprocessing(spec.input_size).to_dict()
    return Preprocessing(size=spec.input_size).to_dict()


def export_for(model_path, options: ModelOptions, export: ExportOptions, on_step=None):
    """Export (what is missing of) ``export.formats`` for a model; returns (ExportResult, Manifest)."""
    from .export.pipeline import ExportRequest, run_export
    from .store.manifest import Manifest

    net, name, checkpoint, dataset, prep, meta = resolve_reference(model_path, options, export.allow_large)
    request = ExportRequest(net, name, checkpoint, dataset, prep, export.formats,
                            calib_source=export.calib or dataset or "photos", calib_samples=export.calib_samples,
                            calib_method=export.calib_method, keep_float=export.keep_float,
                            class_names=class_names(meta, net.spec), accuracy=accuracy_text(meta), npu=export.npu)
    out = export.out or RUNS / name
    result = run_export(request, out, on_step=on_step)
    return result, Manifest.load(out)


def parity_for(manifest, artifacts: list[str] | None, data: str | None, threads: int, overrides: dict,
               batch: int = 32, given_model: Path | None = None, force: bool = False):
    """ParityResult for each artifact of ``manifest`` (all listed or promised by default)."""
    from .verify.run import run_parity

    return run_parity(manifest.directory, artifacts, data, threads, overrides, batch, given_model,
                      force=force).results


def evaluate_stream(net: MobileNet, source, threads: int = 0, batch: int = 64, on_batch=None):
    """(top-1 %, top-5 %, images, StreamStats) of the eager model over a labelled stream."""
    from .data.stream import StreamStats, batches
    from .runtime import reference_runner

    stats, runner = StreamStats(), reference_runner(net, threads)
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
