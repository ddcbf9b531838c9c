"""The Python API: what the CLI does, as functions that return its typed results.

Quiet by default: nothing is printed; ``progress=True`` shows Rich progress on stderr, or pass a callable
``progress(what: str)`` to hear each step. Errors are :class:`~ulsam_deploy.errors.UlsamError` (and its
subclasses), with the one-line message the CLI prints; a failed gate is a result (``report.passed`` False),
never an exception or a ``SystemExit``. The CLI's commands call these functions and render what they return.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from .errors import UlsamError
from .model.options import ModelOptions

if TYPE_CHECKING:
    from .bench.npu import NpuReport
    from .bench.suite import BenchReport
    from .export.pipeline import ExportResult
    from .model.profile import Profile
    from .nets import MobileNet
    from .store.manifest import Manifest
    from .verify.inspect import AttentionSamples, Inspection
    from .verify.run import ParityRun

PathLike = Union[str, Path]
Formats = Union[str, Sequence[str], None]
Progress = Union[bool, Callable[[str], None]]
THRESHOLD_KEYS = ("max_abs", "max_abs_rel", "min_top1_agreement", "min_cosine", "min_accuracy_delta")


# --- models ---------------------------------------------------------------------------------------
def build(arch: str = "mv2", positions: str = "", *, groups: int = 4, width: float = 1.0, num_classes: int = 1000,
          input_size: int = 224, activation: Optional[str] = None, seed: Optional[int] = 0,
          allow_large: bool = False) -> "MobileNet":
    """A new MV1/MV2 with ULSAM at ``positions`` (``"k:1"`` inserts after layer k, ``"k"`` substitutes it).
    ``seed`` fixes the initial weights (None: PyTorch's current generator). The spec is ``model.spec``."""
    from .nets.build import build_model, check_model_size

    spec = ModelOptions(arch, positions, groups, width, num_classes, input_size, activation).spec()
    check_model_size(spec, allow_large=allow_large)
    return build_model(spec, seed=seed)


def load(model: PathLike, *, arch: Optional[str] = None, positions: Optional[str] = None,
         groups: Optional[int] = None, width: Optional[float] = None, num_classes: Optional[int] = None,
         input_size: Optional[int] = None, activation: Optional[str] = None, allow_large: bool = False) -> "MobileNet":
    """A model folder, our checkpoint, or any layout ``build --from`` reads (torchvision, timm, the paper's
    code), as our eager model in eval mode. Files that record no spec need ``arch`` (and ``positions``)."""
    from .workflow import resolve_reference

    options = ModelOptions(arch, positions, groups, width, num_classes, input_size, activation)
    return resolve_reference(_existing(model, "model"), options, allow_large)[0].eval()


def profile(model: Union["MobileNet", PathLike, None] = None, *, arch: Optional[str] = None,
            positions: Optional[str] = None, groups: Optional[int] = None, width: Optional[float] = None,
            num_classes: Optional[int] = None, input_size: Optional[int] = None) -> "Profile":
    """Per-layer parameters and MACs of a model (object, folder or checkpoint) or of a spec given by options."""
    from .model.profile import profile as run_profile
    from .workflow import spec_for_model

    if _is_ours(model):
        return run_profile(model.spec)
    options = ModelOptions(arch, positions, groups, width, num_classes, input_size)
    return run_profile(spec_for_model(None if model is None else _existing(model, "model"), options))


# --- export, check, inspect, bench ------------------------------------------------------------------
def export(model: Union["MobileNet", PathLike], formats: Formats = "onnx", *, out: Optional[PathLike] = None,
           calib: Optional[str] = None, calib_samples: Optional[int] = None, calib_method: Optional[str] = None,
           keep_float: Sequence[int] = (), preprocessing: Optional[Mapping[str, Any]] = None,
           class_names: Optional[Sequence[str]] = None, allow_large: bool = False, npu: Optional[str] = None,
           progress: Progress = False) -> "Manifest":
    """Export ``model`` (one built or changed in code, or a folder/checkpoint) to ``formats`` (``"cpu"``, a
    list or a comma list) in ``out`` (default ``runs/<model name>``); returns the export's manifest.
    What is already there and up to date is kept. ``preprocessing`` and ``class_names`` apply to models in
    memory (a folder or checkpoint records its own). ``npu`` is the Arm Ethos-U configuration
    ``tflite-int8-npu`` is compiled for (``"ethos-u55-128"``, ``"ethos-u65-256"`` or ``"ethos-u85-256"``)."""
    return export_run(model, formats, out=out, calib=calib, calib_samples=calib_samples, calib_method=calib_method,
                      keep_float=keep_float, preprocessing=preprocessing, class_names=class_names,
                      allow_large=allow_large, npu=npu, progress=progress)[1]


def export_run(model, formats: Formats = "onnx", *, out=None, calib=None, calib_samples=None, calib_method=None,
               keep_float: Sequence[int] = (), preprocessing=None, class_names=None, allow_large: bool = False,
               npu: Optional[str] = None, progress: Progress = False, keep_float_asked: bool = False) -> tuple["ExportResult", "Manifest"]:
    """:func:`export`, also returning the export's own record (per-format times and sizes) for the CLI."""
    from .commands.options import export_options
    from .workflow import export_for

    if isinstance(keep_float, (str, bytes)) or not all(isinstance(k, int) and not isinstance(k, bool)
                                                       for k in keep_float):
        raise UlsamError(f"keep_float {keep_float!r} must be paper layer numbers, e.g. (1, 2, 13)",
                         "the search for them is the CLI's `export --keep-float auto`")
    request = export_options(_format_text(formats), calib, calib_samples, calib_method,
                             None if out is None else Path(out), tuple(keep_float),
                             keep_float_asked=keep_float_asked or bool(keep_float), allow_large=allow_large,
                             npu=npu)
    with _steps(progress, "export") as on_step:
        if _is_ours(model):
            return _export_module(model, request, preprocessing, class_names, on_step)
        if preprocessing is not None or class_names is not None:
            raise UlsamError("preprocessing and class_names apply to a model in memory; a model folder or "
                             "checkpoint records its own", "drop them")
        return export_for(_existing(model, "model"), ModelOptions(), request, on_step=on_step)


def check(export_dir: Union["Manifest", PathLike], formats: Formats = None, *, data: Optional[str] = None,
          thresholds: Optional[Mapping[str, float]] = None, threads: int = 0, model: Optional[PathLike] = None,
          force: bool = False, progress: Progress = False, images: Optional[int] = None) -> "ParityRun":
    """The gate: every artifact of an export (or ``formats``) against the eager model on ``data`` (default:
    the model's evaluation set; ``images``: its first N only); ``report.passed``, ``report.results`` (one row per artifact, with
    ``.passed`` and ``.breaches``), ``report.missing``. ``thresholds`` overrides the table by name
    (``max_abs``, ``max_abs_rel``, ``min_top1_agreement``, ``min_cosine``, ``min_accuracy_delta``);
    ``model`` makes sure the export was made from it."""
    from .export import parse_formats
    from .verify.run import run_parity

    overrides = dict(thresholds or {})
    unknown = [k for k in overrides if k not in THRESHOLD_KEYS]
    if unknown:
        raise UlsamError(f"thresholds: {unknown[0]!r} is not a threshold", f"use {', '.join(THRESHOLD_KEYS)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UlsamError(f"threads {threads!r} must be a whole number >= 0 (0: the runtime's default)")
    if images is not None and (isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= 1_000_000):
        raise UlsamError(f"images {images!r} must be a whole number in 1..1000000")
    chosen = parse_formats(_format_text(formats)) if formats else None
    directory = _export_dir(export_dir)
    with _bar(progress, "parity") as (on_start, on_batch):
        return run_parity(directory, list(chosen) if chosen else None, data, threads, overrides,
                          given_model=None if model is None else _existing(model, "model"), force=force,
                          on_start=on_start, on_batch=on_batch, images=images)


def inspect(export_dir: Union["Manifest", PathLike], formats: Optional[Sequence[str]] = None, *,
            data: Optional[str] = None, images: int = 256, threads: int = 0,
            progress: Progress = False) -> tuple["Inspection", "AttentionSamples"]:
    """Where INT8 goes wrong: each artifact against the eager model at every paper layer and ULSAM map, on the
    first ``images`` of ``data``; returns (the inspection, the samples it drew its maps from)."""
    from .verify.inspect import inspect_export

    if isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= 1_000_000:
        raise UlsamError(f"images {images!r} must be a whole number in 1..1000000")
    named = None if formats is None else [f.strip().lower() for f in ([formats] if isinstance(formats, str) else formats)]
    with _bar(progress, "inspect", images) as (_, on_batch):
        return inspect_export(_export_dir(export_dir), named, data, images, threads, on_batch=on_batch)


def bench(model: Union[PathLike, None] = None, *, export_dir: Optional[PathLike] = None, vs: Optional[str] = None,
          backends: Union[str, Sequence[str]] = "all", precisions: Union[str, Sequence[str]] = "all",
          threads: Optional[int] = None, batch: Sequence[int] = (1,), warmup: int = 10, runs: int = 100,
          parity: bool = True, ops: bool = False, force: bool = False, npu: Optional[str] = None,
          progress: Progress = False) -> Union["BenchReport", "NpuReport"]:
    """Latency, throughput, size, MACs and agreement of every artifact (exported if missing); with ``vs``, a
    second model timed interleaved and the ratios. Returns the bench report (``.rows``, ``.ratios``).
    ``backends="ethos-u"`` returns Vela's estimate of the NPU file instead (``.estimates``, ``.cycles_ratio``),
    compiled for ``npu``."""
    from .bench.session import run_bench

    with _steps(progress, "bench") as on_step:
        return run_bench(None if model is None else Path(model), ModelOptions(), export_dir, vs,
                         _names(backends), _names(precisions), threads, list(batch), warmup, runs, parity, ops,
                         force, on_step=on_step, on_warning=_warn(progress), npu=npu)


def train(data: str, out: PathLike, *, model: Optional[PathLike] = None, arch: Optional[str] = None,
          positions: Optional[str] = None, groups: Optional[int] = None, width: Optional[float] = None,
          num_classes: Optional[int] = None, input_size: Optional[int] = None, val: Optional[PathLike] = None,
          epochs: int = 30, batch_size: int = 64, lr: float = 0.05, schedule: str = "cosine",
          label_smoothing: float = 0.0, max_steps: Optional[int] = None, workers: int = 2, device: str = "auto",
          amp: str = "off", teacher: Optional[PathLike] = None, qat: bool = False, resume: bool = False,
          force: bool = False, seed: int = 0, progress: Progress = False) -> dict:
    """Train (one process; the CLI's ``--nproc`` runs several) on ``digits``, ``fashion`` or an ImageFolder,
    from ``model`` or from scratch; writes the model folder ``out`` and returns the run's summary. ``qat``:
    quantisation-aware fine-tuning of ``model`` (the CLI's ``--qat``)."""
    from .training.run import RunRequest, run_training, validate_training
    from .training.train import TrainConfig

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed,
                         label_smoothing=label_smoothing, max_steps=max_steps, workers=workers, amp=amp, qat=qat)
    out_path = Path(out)
    validate_training(config, out_path, None if teacher is None else Path(teacher),
                      None if val is None else Path(val), device, sync_bn=False, force=force, resume=resume,
                      start_from=None if model is None else Path(model))
    options = ModelOptions(arch, positions, groups, width, num_classes, input_size)
    request = RunRequest(out_path, options, None if model is None else Path(model), data,
                         None if val is None else Path(val), None, None, config, device,
                         None if teacher is None else Path(teacher), resume, command="ulsam_deploy.train(...)",
                         resume_command="call train(...) again with resume=True")
    return run_training(request, quiet=progress is False)


# --- helpers ---------------------------------------------------------------------------------------
def _is_ours(model) -> bool:
    from .nets import MobileNet

    import torch

    if isinstance(model, MobileNet):
        return True
    if isinstance(model, torch.nn.Module):
        raise UlsamError(f"a {type(model).__name__} is not a model of ours",
                         "build it with ulsam_deploy.build or load it with ulsam_deploy.load (its layers are ours "
                         "then, and may be changed in code)")
    return False


def _existing(path, what: str) -> Path:
    if not isinstance(path, (str, Path)):
        raise UlsamError(f"{what} must be a path (str or Path), not {type(path).__name__}")
    return Path(path)


def _format_text(formats: Formats) -> Optional[str]:
    if formats is None or isinstance(formats, str):
        return formats
    if not all(isinstance(f, str) for f in formats):
        raise UlsamError(f"formats {formats!r} must be names such as 'onnx' or 'cpu'")
    return ",".join(formats)


def _names(value: Union[str, Sequence[str]]) -> str:
    return value if isinstance(value, str) else ",".join(value)


def _export_dir(export_dir) -> Path:
    from .store.manifest import Manifest

    return export_dir.directory if isinstance(export_dir, Manifest) else _existing(export_dir, "export_dir")


def _export_module(model, request, preprocessing, class_names, on_step):
    from .data.preprocess import Preprocessing
    from .export.pipeline import ExportRequest, run_export
    from .store.manifest import Manifest
    from .workflow import RUNS

    spec = model.spec
    try:
        prep = (Preprocessing.from_dict(dict(preprocessing)) if preprocessing is not None
                else Preprocessing(size=spec.input_size)).to_dict()
    except (TypeError, ValueError, KeyError) as exc:
        raise UlsamError(f"preprocessing {preprocessing!r} is not a preprocessing ({exc})") from None
    names = tuple(class_names or ())
    if names and (len(names) != spec.num_classes or not all(isinstance(n, str) and n for n in names)):
        raise UlsamError(f"class_names: {len(names)} names for {spec.num_classes} classes (non-empty text each)")
    net = model.eval()
    out = request.out or RUNS / spec.name
    export_request = ExportRequest(net, spec.name, {"in_memory": type(model).__name__}, None, prep, request.formats,
                                   calib_source=request.calib or "photos", calib_samples=request.calib_samples,
                                   calib_method=request.calib_method, keep_float=request.keep_float,
                                   class_names=names, npu=request.npu)
    result = run_export(export_request, out, on_step=on_step)
    return result, Manifest.load(out)


def _warn(progress: Progress):
    if progress is False:
        return None
    from .render import report

    return lambda line: report.log(f"warning: {line}") if progress is True else progress(f"warning: {line}")


@contextlib.contextmanager
def _steps(progress: Progress, name: str) -> Iterator[Optional[Callable[[str], None]]]:
    """An ``on_step(what)`` callback for ``progress``: None (quiet), the caller's, or a Rich line on stderr."""
    if progress is False:
        yield None
    elif progress is True:
        from .render import report

        with report.progress() as bar:
            task = bar.add_task(name, total=None)
            yield lambda what: bar.update(task, description=f"{name}: {what}")
    else:
        yield progress


@contextlib.contextmanager
def _bar(progress: Progress, name: str, total: Optional[int] = None):
    """(on_start(total), on_batch(n)) callbacks for a pass over images."""
    if progress is False:
        yield None, None
    elif progress is True:
        from .render import report

        with report.progress() as bar:
            task = bar.add_task(name, total=total)
            yield (lambda n: bar.update(task, total=n, description=name)), (lambda n: bar.update(task, advance=n))
    else:
        seen = [0]

        def on_batch(n: int) -> None:
            seen[0] += n
            progress(f"{name}: {seen[0]} images")

        yield (lambda n: progress(f"{name}: {n} images to run")), on_batch

