"""``ulsam-deploy inspect`` (where in the network INT8 goes wrong) and ``export --keep-float auto``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from ..errors import UlsamError
from .deploy import Calib, CalibMethod, CalibSamples, Data, ExportDir, Formats, Threads, _manifest

Images = Annotated[int, typer.Option("--images", min=1, max=1_000_000,
                                     help="Compare on the first N images of the data.")]
Plot = Annotated[Optional[Path], typer.Option(
    "--plot", help="Write one PNG: per-layer SQNR curves and the ULSAM attention maps, eager beside each artifact.")]


@o.model_options
def inspect(export_dir: ExportDir = None, options: o.ModelOptions = None, model: o.ModelPath = None,
            formats: Formats = None, data: Data = None, images: Images = 256, threads: Threads = 0,
            calib: Calib = None, calib_samples: CalibSamples = 128, calib_method: CalibMethod = "minmax",
            plot: Plot = None, json_out: o.Json = False) -> None:
    """Compare each artifact with the eager model at every paper layer and ULSAM attention map."""
    from .. import report, report_inspect
    from ..export import DEFAULT_FORMATS, parse_formats
    from ..inspect import inspect_export

    if plot is not None and (plot.suffix.lower() != ".png" or plot.is_dir()):
        raise UlsamError(f"--plot {plot} must be a .png file path")
    chosen = parse_formats(formats) if formats else None
    manifest = _manifest(export_dir, model, options, chosen or DEFAULT_FORMATS, calib, calib_samples, calib_method)
    # the formats named, not the ONNX they are built from (parse_formats adds it for export)
    named = _named(formats, chosen) if chosen else None
    with report.progress() as bar:
        task = bar.add_task("inspect", total=images)
        result, samples = inspect_export(manifest.directory, named, data, images, threads,
                                         on_batch=lambda n: bar.update(task, advance=n))
    if plot is not None:
        report_inspect.plot_inspection(result, samples, plot)
    if json_out:
        report.print_json(result)
        return
    for artifact in result.artifacts:
        report.console.print(report_inspect.layer_table(result, artifact))
    report.console.print(report_inspect.summary_table(result))


def _named(text: str, chosen: tuple[str, ...]) -> list[str]:
    """The formats the user named (groups such as 'cpu' name all theirs), without added dependencies."""
    from ..export import FORMATS

    tokens = {t.strip().lower() for t in text.split(",")}
    if tokens - set(FORMATS):
        return list(chosen)
    return [name for name in chosen if name in tokens]


def keep_float_auto(model_path, options: o.ModelOptions, formats: tuple[str, ...], out, calib, calib_samples: int,
                    calib_method: str, budget: float, json_out: bool) -> None:
    """``export --keep-float auto``: print each step as it finishes, then the choice."""
    from .. import report, report_inspect
    from ..export import KEEP_FLOAT_FORMATS
    from ..keepfloat import search
    from ..workflow import export_for

    def export(layers: tuple[int, ...]):
        return export_for(model_path, options, formats, out, calib, calib_samples, calib_method, keep_float=layers)[1]

    def show(step) -> None:
        added = "start (no float layers)" if step.layer is None else f"+ layer {step.layer}"
        worst = ", ".join(f"{layer} ({drop:+.1f} dB)" for layer, drop in step.sensitivity)
        lines = "; ".join(f"{r.artifact}: top-1 agr {r.top1_agreement:.2f} %, max abs {r.max_abs:.3g}, "
                          f"p50 {step.latency_ms.get(r.artifact, float('nan')):.2f} ms, "
                          f"{'pass' if r.passed else 'FAIL ' + ', '.join(r.breaches)}" for r in step.results)
        report.log(f"keep-float {added} -> [{','.join(map(str, step.keep_float))}] "
                   f"({step.mac_share:.1f} % of MACs): {lines}" + (f"; most sensitive now: {worst}" if worst else ""))

    # measured on the first of these (ONNX Runtime's when there): TensorRT engines are not probed
    int8 = [name for name in KEEP_FLOAT_FORMATS if name in formats and not name.startswith("trt-")]
    result = search(export, int8, None, 0, budget, on_step=show)
    if json_out:
        report.print_json(result)
    else:
        report.console.print(report_inspect.float_step_table(result))
