"""Deployment commands: export, parity, check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from ..export import DEFAULT_FORMATS, parse_formats

Formats = Annotated[Optional[str], typer.Option(
    "--formats", "-f", help="Comma list: onnx, onnx-int8, tflite-fp32, tflite-fp16, tflite-int8, trt-fp16, trt-int8; "
                            "'cpu' or 'all'. Default: onnx,onnx-int8.")]
Calib = Annotated[Optional[str], typer.Option(
    "--calib", help="Calibration images: 'photos' (shipped), 'digits', or a folder. Default: the model's own "
                    "training set if it has one, else photos.")]
CalibSamples = Annotated[int, typer.Option("--calib-samples", help="Number of calibration samples.")]
CalibMethod = Annotated[str, typer.Option("--calib-method", help="minmax, entropy or percentile.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Export directory (default runs/<model name>).")]
ExportDir = Annotated[Optional[Path], typer.Option(
    "--export", "-e", help="An existing export directory; its manifest says what to run.")]
Data = Annotated[Optional[str], typer.Option(
    "--data", help="'digits', 'photos' or a folder (ImageFolder for labels). Default: the model's own test set.")]
Threads = Annotated[int, typer.Option("--threads", min=0, max=256, help="Runtime threads (0 = backend default).")]


def _manifest(export_dir, model, options: o.ModelOptions, formats, calib, calib_samples, calib_method):
    from ..manifest import Manifest
    from ..workflow import export_for

    if export_dir is not None:
        return Manifest.load(export_dir)
    return _export(model, options, formats, None, calib, calib_samples, calib_method)[1]


def _export(*args, **kwargs):
    """export_for with a progress line naming each step (hidden off a terminal)."""
    from .. import report
    from ..workflow import export_for

    with report.progress() as bar:
        task = bar.add_task("export", total=None)
        return export_for(*args, **kwargs, on_step=lambda what: bar.update(task, description=f"export: {what}"))


@o.model_options
def export(options: o.ModelOptions, model: o.ModelPath = None,
           checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Same as --model.")] = None,
           formats: Formats = None, calib: Calib = None, calib_samples: CalibSamples = 128,
           calib_method: CalibMethod = "minmax", out: Out = None,
           keep_float: Annotated[Optional[str], typer.Option(
               "--keep-float", help="Paper layers the INT8 formats keep in float, e.g. 1,2,13; 'auto' adds the most "
                                    "sensitive ones until check passes.")] = None,
           float_budget: Annotated[float, typer.Option(
               "--float-budget", min=0.0, max=100.0, help="With --keep-float auto: the most the float layers may "
                                                          "cost, percent of the model's MACs.")] = 25.0,
           json_out: o.Json = False) -> None:
    """Export a model to ONNX (simplified), INT8 Q/DQ ONNX, TFLite and TensorRT, with a manifest."""
    from .. import report
    from ..export import parse_keep_float

    chosen = parse_formats(formats) if formats else DEFAULT_FORMATS
    if keep_float is not None and keep_float.strip().lower() == "auto":
        from .inspect import keep_float_auto

        return keep_float_auto(model or checkpoint, options, chosen, out, calib, calib_samples, calib_method,
                               float_budget, json_out)
    layers = parse_keep_float(keep_float) if keep_float else ()
    result, _ = _export(model or checkpoint, options, chosen, out, calib, calib_samples, calib_method,
                        keep_float=layers)
    report.print_json(result) if json_out else report.console.print(report.export_table(result))


@o.model_options
def parity(export_dir: ExportDir = None, options: o.ModelOptions = None,
           model: o.ModelPath = None, formats: Formats = None, data: Data = None, threads: Threads = 0,
           calib: Calib = None, calib_samples: CalibSamples = 128, calib_method: CalibMethod = "minmax",
           json_out: o.Json = False) -> None:
    """Run every artifact against the eager fp32 reference on the same batches."""
    _parity_command(export_dir, options, model, formats, data, threads, calib, calib_samples, calib_method,
                    json_out, {}, gate=False)


@o.model_options
def check(export_dir: ExportDir = None, options: o.ModelOptions = None,
          model: o.ModelPath = None, formats: Formats = None, data: Data = None, threads: Threads = 0,
          calib: Calib = None, calib_samples: CalibSamples = 128, calib_method: CalibMethod = "minmax",
          max_abs: Annotated[Optional[float], typer.Option("--max-abs", help="Override: max |logit diff|.")] = None,
          min_top1: Annotated[Optional[float], typer.Option("--min-top1", help="Override: min top-1 agreement %.")] = None,
          min_cosine: Annotated[Optional[float], typer.Option("--min-cosine", help="Override: min logit cosine.")] = None,
          min_acc_delta: Annotated[Optional[float], typer.Option("--min-acc-delta", help="Override: min accuracy delta, points.")] = None,
          json_out: o.Json = False) -> None:
    """The CI gate: parity against the thresholds table; exit 1 naming each breached metric."""
    overrides = {"max_abs": max_abs, "min_top1_agreement": min_top1, "min_cosine": min_cosine,
                 "min_accuracy_delta": min_acc_delta}
    _parity_command(export_dir, options, model, formats, data, threads, calib, calib_samples, calib_method,
                    json_out, overrides, gate=True)


def _parity_command(export_dir, options: o.ModelOptions, model, formats, data, threads, calib, calib_samples, calib_method,
                    json_out, overrides, gate: bool) -> None:
    from .. import report
    from ..verify import run_parity

    chosen = parse_formats(formats) if formats else None
    manifest = _manifest(export_dir, model, options, chosen or DEFAULT_FORMATS, calib, calib_samples,
                         calib_method)
    given = model if export_dir is not None else None
    with report.progress() as bar:
        task = bar.add_task("parity", total=None)
        run = run_parity(manifest.directory, list(chosen) if chosen else None, data, threads, overrides,
                         given_model=given, on_start=lambda n: bar.update(task, total=n, description="parity"),
                         on_batch=lambda n: bar.update(task, advance=n))
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
