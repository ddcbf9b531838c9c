"""``ulsam-deploy inspect``: where in the network INT8 goes wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UlsamError
from . import options as o
from .deploy import _manifest
from .options import Calib, CalibMethod, CalibSamples, Data, ExportDir, Formats, Threads

Images = Annotated[int, typer.Option("--images", min=1, max=1_000_000,
                                     help="Compare on the first N images of the data.")]
Plot = Annotated[Optional[Path], typer.Option(
    "--plot", help="Write one PNG: per-layer SQNR curves and the ULSAM attention maps, eager beside each artifact.")]


@o.model_options
def inspect(export_dir: ExportDir = None, options: o.ModelOptions = None, model: o.ModelPath = None,
            formats: Formats = None, data: Data = None, images: Images = 256, threads: Threads = 0,
            calib: Calib = None, calib_samples: CalibSamples = None, calib_method: CalibMethod = None,
            plot: Plot = None, json_out: o.Json = False) -> None:
    """Compare each artifact with the eager model at every paper layer and ULSAM attention map."""
    from ..render import report
    from ..render import inspect as report_inspect
    from ..export import parse_formats
    from .. import api

    if plot is not None and (plot.suffix.lower() != ".png" or plot.is_dir()):
        raise UlsamError(f"--plot {plot} must be a .png file path")
    chosen = parse_formats(formats) if formats else None
    manifest = _manifest(export_dir, model, options, formats, calib, calib_samples, calib_method)
    # the formats named, not the ONNX they are built from (parse_formats adds it for export)
    named = _named(formats, chosen) if chosen else None
    result, samples = api.inspect(manifest.directory, named, data=data, images=images, threads=threads, progress=True)
    if plot is not None:
        report_inspect.plot_inspection(result, samples, plot)
    if json_out:
        report.print_json(result)
        return
    for artifact in result.artifacts:
        report.console.print(report_inspect.layer_table(result, artifact))
    report.console.print(report_inspect.summary_table(result))
    for note in result.notes:
        report.log(note)


def _named(text: str, chosen: tuple[str, ...]) -> list[str]:
    """The formats the user named (groups such as 'cpu' name all theirs), without added dependencies."""
    from ..export import FORMATS

    tokens = {t.strip().lower() for t in text.split(",")}
    if tokens - set(FORMATS):
        return list(chosen)
    return [name for name in chosen if name in tokens]
