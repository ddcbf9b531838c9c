"""Deployment commands: export, parity, check."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..export import parse_formats
from ..export.options import ExportOptions
from . import options as o
from .options import Calib, CalibMethod, CalibSamples, Data, ExportDir, Formats, Out, Threads
from .pack import DeviceResult, Emulate, device_check

CheckImages = Annotated[Optional[int], typer.Option(
    "--images", min=1, max=1_000_000, help="Check the first N images of the data (default: all of them); with "
                                           "--emulate: the images to run (default 64).")]
FLOAT_BUDGET = 25.0   # percent of the model's MACs that --keep-float auto may keep in float


def _manifest(export_dir, model, options: o.ModelOptions, formats, calib, calib_samples, calib_method):
    """The manifest of ``--export DIR`` as it is (model and calibration options would then be ignored, so
    they are refused), else of the model exported with these formats and calibration."""
    from ..store.manifest import Manifest

    o.refuse_with_export(export_dir, options, **{"--calib": calib, "--calib-samples": calib_samples,
                                                 "--calib-method": calib_method})
    if export_dir is not None:
        return Manifest.load(export_dir)
    return _export(model, options, o.export_options(formats, calib, calib_samples, calib_method))[1]


def _export(model, options: o.ModelOptions, export: ExportOptions):
    """The export of ``--model`` or of the model options (``--arch ...``), with a progress line naming each
    step (hidden off a terminal): the same ``export_for`` the Python API runs."""
    from ..api import _steps
    from ..workflow import export_for

    with _steps(True, "export") as on_step:
        return export_for(model, options, export, on_step=on_step)


@o.model_options
def export(options: o.ModelOptions, model: o.ModelPath = None,
           checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Same as --model.")] = None,
           formats: Formats = None, calib: Calib = None, calib_samples: CalibSamples = None,
           calib_method: CalibMethod = None, out: Out = None,
           keep_float: Annotated[Optional[str], typer.Option(
               "--keep-float", help="Paper layers the INT8 formats keep in float, e.g. 1,2,13; 'auto' adds the most "
                                    "sensitive ones until check passes.")] = None,
           float_budget: Annotated[Optional[float], typer.Option(
               "--float-budget", min=0.0, max=100.0, help="With --keep-float auto: the most the float layers may "
                                                          f"cost, percent of the model's MACs (default {FLOAT_BUDGET:g}).")] = None,
           npu: Annotated[Optional[str], typer.Option(
               "--npu", help="The Arm Ethos-U configuration tflite-int8-npu is compiled for by Vela: ethos-u55-128 "
                             "(default), ethos-u65-256 or ethos-u85-256.")] = None,
           allow_large: o.AllowLarge = False,
           json_out: o.Json = False) -> None:
    """Export a model to ONNX (simplified), INT8 Q/DQ ONNX, TFLite and TensorRT, with a manifest."""
    from ..render import report
    from ..export import parse_keep_float

    auto = keep_float is not None and keep_float.strip().lower() == "auto"
    if not auto:
        o.refuse_unused("it applies to --keep-float auto", "drop it, or pass --keep-float auto",
                        **{"--float-budget": float_budget})
    layers = parse_keep_float(keep_float) if keep_float and not auto else ()
    request = o.export_options(formats, calib, calib_samples, calib_method, out, layers,
                               keep_float_asked=keep_float is not None, allow_large=allow_large, npu=npu)
    if auto:
        budget = FLOAT_BUDGET if float_budget is None else float_budget
        return keep_float_auto(model or checkpoint, options, request, budget, json_out)
    result, _ = _export(model or checkpoint, options, request)
    report.print_json(result) if json_out else report.console.print(report.export_table(result))


@o.model_options
def parity(export_dir: ExportDir = None, options: o.ModelOptions = None,
           model: o.ModelPath = None, formats: Formats = None, data: Data = None, threads: Threads = 0,
           calib: Calib = None, calib_samples: CalibSamples = None, calib_method: CalibMethod = None,
           force: o.Unsafe = False, json_out: o.Json = False) -> None:
    """Run every artifact against the eager fp32 reference on the same batches."""
    _parity_command(export_dir, options, model, formats, data, threads, calib, calib_samples, calib_method,
                    json_out, {}, gate=False, force=force)


@o.model_options
def check(export_dir: ExportDir = None, options: o.ModelOptions = None,
          model: o.ModelPath = None, formats: Formats = None, data: Data = None, threads: Threads = 0,
          calib: Calib = None, calib_samples: CalibSamples = None, calib_method: CalibMethod = None,
          max_abs: Annotated[Optional[float], typer.Option("--max-abs", help="Override: max |logit diff|.")] = None,
          max_abs_rel: Annotated[Optional[float], typer.Option(
              "--max-abs-rel", help="Override: max |logit diff| / the reference's logit range.")] = None,
          min_top1: Annotated[Optional[float], typer.Option("--min-top1", help="Override: min top-1 agreement %.")] = None,
          min_cosine: Annotated[Optional[float], typer.Option("--min-cosine", help="Override: min logit cosine.")] = None,
          min_acc_delta: Annotated[Optional[float], typer.Option("--min-acc-delta", help="Override: min accuracy delta, points.")] = None,
          device_result: DeviceResult = None, emulate: Emulate = None, images: CheckImages = None,
          force: o.Unsafe = False, json_out: o.Json = False) -> None:
    """The CI gate: parity against the thresholds table; exit 1 naming each breached metric. With
    --device-result or --emulate: the verdicts of a pack's run on a device or an emulated CPU."""
    overrides = {"max_abs": max_abs, "max_abs_rel": max_abs_rel, "min_top1_agreement": min_top1, "min_cosine": min_cosine,
                 "min_accuracy_delta": min_acc_delta}
    if device_result is not None or emulate is not None:
        o.refuse_with_export(export_dir, options, **{"--calib": calib, "--calib-samples": calib_samples,
                                                     "--calib-method": calib_method})
        o.refuse_unused("a pack's run is checked against the export it was made from", "drop it", **{"--model": model})
        return device_check(export_dir, device_result, emulate, images, formats, data, threads, force, overrides,
                            json_out)
    _parity_command(export_dir, options, model, formats, data, threads, calib, calib_samples, calib_method,
                    json_out, overrides, gate=True, force=force, images=images)


def _parity_command(export_dir, options: o.ModelOptions, model, formats, data, threads, calib, calib_samples, calib_method,
                    json_out, overrides, gate: bool, force: bool = False, images: int | None = None) -> None:
    from .. import api
    from ..render import report

    chosen = parse_formats(formats) if formats else None
    manifest = _manifest(export_dir, model, options, formats, calib, calib_samples, calib_method)
    given = model if export_dir is not None else None
    run = api.check(manifest.directory, formats, data=data, thresholds={k: v for k, v in overrides.items() if v is not None},
                    threads=threads, model=given, force=force, progress=True, images=images)
    for warning in run.warnings:
        report.log(f"warning: {warning}")
    if json_out:
        report.print_json(run.results + [_missing(name) for name in run.missing])
    else:
        report.console.print(report.parity_table(run))
    if gate:
        for r in run.results:
            if not r.passed:
                report.log(f"FAIL {r.artifact}: " + "; ".join(r.breaches))
        for name in run.missing:
            report.log(f"FAIL {name}: missing - {'asked for with --formats' if chosen else 'the manifest promises it'}"
                       f" but {manifest.directory} holds no such artifact (re-run `ulsam-deploy export`)")
        if not run.results and not run.missing:
            report.log(f"FAIL: {manifest.directory} lists no artifact, so nothing was checked "
                       "(re-run `ulsam-deploy export`)")
        if not run.passed:
            raise typer.Exit(1)


def _missing(name: str) -> dict:
    return {"artifact": name, "missing": True, "passed": False, "breaches": ["missing: not built"]}


def keep_float_auto(model_path, options: o.ModelOptions, request: ExportOptions, budget: float, json_out: bool) -> None:
    """``export --keep-float auto``: print each step as it finishes, then the choice."""
    from ..render import report
    from ..render import inspect as report_inspect
    from ..export import KEEP_FLOAT_FORMATS
    from ..keepfloat import failure_line, search
    from ..workflow import export_for

    def export(layers: tuple[int, ...]):
        return export_for(model_path, options, replace(request, keep_float=layers))[1]

    def show(step) -> None:
        added = "start (no float layers)" if step.layer is None else f"+ layer {step.layer}"
        worst = ", ".join(f"{layer} ({drop:+.1f} dB)" for layer, drop in step.sensitivity)
        lines = "; ".join(f"{r.artifact}: top-1 agr {r.top1_agreement:.2f} %, max abs {r.max_abs:.3g}, "
                          f"p50 {step.latency_ms.get(r.artifact, float('nan')):.2f} ms, "
                          f"{'pass' if r.passed else 'FAIL ' + ', '.join(r.breaches)}" for r in step.results)
        report.log(f"keep-float {added} -> [{','.join(map(str, step.keep_float))}] "
                   f"({step.mac_share:.1f} % of MACs): {lines}" + (f"; most sensitive now: {worst}" if worst else ""))

    # measured on the first of these (ONNX Runtime's when there): TensorRT engines are not probed
    int8 = [name for name in KEEP_FLOAT_FORMATS if name in request.formats and not name.startswith("trt-")]
    result = search(export, int8, None, 0, budget, on_step=show)
    if json_out:
        report.print_json(result)
    else:
        report.console.print(report_inspect.float_step_table(result))
    if not result.passed:
        report.log(f"FAIL {failure_line(result)}")
        raise typer.Exit(1)
