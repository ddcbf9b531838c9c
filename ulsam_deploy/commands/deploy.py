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


def _manifest(export_dir, model, spec_options, formats, calib, calib_samples, calib_method):
    from ..manifest import Manifest
    from ..workflow import export_for

    if export_dir is not None:
        return Manifest.load(export_dir)
    return export_for(model, spec_options, formats, None, calib, calib_samples, calib_method)[1]


def export(arch: o.Arch = None, positions: o.Positions = None, groups: o.Groups = None, width: o.Width = None,
           num_classes: o.NumClasses = None, input_size: o.InputSize = None, model: o.ModelPath = None,
           checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Same as --model.")] = None,
           formats: Formats = None, calib: Calib = None, calib_samples: CalibSamples = 128,
           calib_method: CalibMethod = "minmax", out: Out = None, json_out: o.Json = False) -> None:
    """Export a model to ONNX (simplified), INT8 Q/DQ ONNX, TFLite and TensorRT, with a manifest."""
    from .. import report
    from ..workflow import export_for

    chosen = parse_formats(formats) if formats else DEFAULT_FORMATS
    result, _ = export_for(model or checkpoint, (arch, positions, groups, width, num_classes, input_size), chosen,
                           out, calib, calib_samples, calib_method)
    report.print_json(result) if json_out else report.console.print(report.export_table(result))


def parity(export_dir: ExportDir = None, arch: o.Arch = None, positions: o.Positions = None, groups: o.Groups = None,
           width: o.Width = None, num_classes: o.NumClasses = None, input_size: o.InputSize = None,
           model: o.ModelPath = None, formats: Formats = None, data: Data = None, threads: Threads = 0,
           calib: Calib = None, calib_samples: CalibSamples = 128, calib_method: CalibMethod = "minmax",
           json_out: o.Json = False) -> None:
    """Run every artifact against the eager fp32 reference on the same batches."""
    _parity_command(export_dir, (arch, positions, groups, width, num_classes, input_size), model, formats, data,
                    threads, calib, calib_samples, calib_method, json_out, {}, gate=False)


def check(export_dir: ExportDir = None, arch: o.Arch = None, positions: o.Positions = None, groups: o.Groups = None,
          width: o.Width = None, num_classes: o.NumClasses = None, input_size: o.InputSize = None,
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
    _parity_command(export_dir, (arch, positions, groups, width, num_classes, input_size), model, formats, data,
                    threads, calib, calib_samples, calib_method, json_out, overrides, gate=True)


def _parity_command(export_dir, spec_options, model, formats, data, threads, calib, calib_samples, calib_method,
                    json_out, overrides, gate: bool) -> None:
    from .. import report
    from ..workflow import parity_for

    chosen = parse_formats(formats) if formats else None
    manifest = _manifest(export_dir, model, spec_options, chosen or DEFAULT_FORMATS, calib, calib_samples,
                            calib_method)
    given = model if export_dir is not None else None
    results = parity_for(manifest, list(chosen) if chosen else None, data, threads, overrides, given_model=given)
    if json_out:
        report.print_json(results)
    else:
        report.console.print(report.parity_table(results, str(manifest.directory)))
    if gate:
        failed = [r for r in results if not r.passed]
        for r in failed:
            report.log(f"FAIL {r.artifact}: " + "; ".join(r.breaches))
        if failed:
            raise typer.Exit(1)
