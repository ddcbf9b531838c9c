"""The model options: Typer aliases defined once, parsed into one ModelOptions at the CLI boundary.

A command that takes model options declares one ``options: ModelOptions`` parameter and is wrapped in
:func:`model_options`; the wrapper shows Typer the shared options below and hands the command the parsed
object. Everything under the commands receives that object, never loose values.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from ..model.options import ModelOptions

_SPEC = "Model"
Arch = Annotated[Optional[str], typer.Option("--arch", help="Backbone: mv1 or mv2.", rich_help_panel=_SPEC)]
Positions = Annotated[Optional[str], typer.Option(
    "--positions", "-p", help="ULSAM positions: 'k:1' inserts after layer k, 'k' substitutes it, e.g. '8:1,9:1,11'.",
    rich_help_panel=_SPEC)]
Groups = Annotated[Optional[int], typer.Option("--groups", "-g", help="ULSAM groups g (must divide the channels).",
                                               rich_help_panel=_SPEC)]
Width = Annotated[Optional[float], typer.Option("--width", help="Width multiplier alpha.", rich_help_panel=_SPEC)]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", help="Classifier outputs.", rich_help_panel=_SPEC)]
InputSize = Annotated[Optional[int], typer.Option("--input-size", help="Square input side in pixels.",
                                                  rich_help_panel=_SPEC)]
Activation = Annotated[Optional[str], typer.Option(
    "--activation", help="relu or relu6 (default: relu for mv1, relu6 for mv2; timm's mv1 is relu6).",
    rich_help_panel=_SPEC)]
Preprocess = Annotated[Optional[str], typer.Option(
    "--preprocess", help="Preprocessing preset: ours, torchvision, torchvision-v2 or timm (default: what the "
                         "checkpoint records, else the preset of its library, else ours).", rich_help_panel=_SPEC)]
ModelPath = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="A model folder (models/<name>) or checkpoint (.safetensors, .pth).", rich_help_panel=_SPEC)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Unsafe = Annotated[bool, typer.Option(
    "--force", help="Run an INT8 artifact even on a CPU whose integer kernels its encoding is not exact on "
                    "(the manifest's isa); a warning says so.")]

_ALIASES = {"arch": Arch, "positions": Positions, "groups": Groups, "width": Width, "num_classes": NumClasses,
            "input_size": InputSize, "activation": Activation, "preprocess": Preprocess}


def model_options(command: Callable) -> Callable:
    """Give ``command`` the shared model options in place of its ``options: ModelOptions`` parameter."""
    signature = inspect.signature(command, eval_str=True)
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=alias)
              for name, alias in _ALIASES.items()]
    params = []
    for param in signature.parameters.values():
        params += shared if param.name == "options" else [param.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = ModelOptions(**{name: kwargs.pop(name) for name in _ALIASES})
        return command(options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


# The export and parity options shared by export, parity, check and inspect.
Formats = Annotated[Optional[str], typer.Option(
    "--formats", "-f", help="Comma list: onnx, onnx-int8, tflite-fp32, tflite-fp16, tflite-int8, trt-fp16, trt-int8; "
                            "'cpu' or 'all'. Default: onnx,onnx-int8.")]
Calib = Annotated[Optional[str], typer.Option(
    "--calib", help="Calibration images: 'photos' (shipped), 'digits', or a folder. Default: the model's own "
                    "training set if it has one, else photos.")]
CalibSamples = Annotated[Optional[int], typer.Option("--calib-samples", help="Number of calibration samples (default 128).")]
CalibMethod = Annotated[Optional[str], typer.Option("--calib-method", help="minmax (default), entropy or percentile.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Export directory (default runs/<model name>).")]
ExportDir = Annotated[Optional[Path], typer.Option(
    "--export", "-e", help="An existing export directory; its manifest says what to run.")]
Data = Annotated[Optional[str], typer.Option(
    "--data", help="'digits', 'photos' or a folder (ImageFolder for labels). Default: the model's own test set.")]
Threads = Annotated[int, typer.Option("--threads", min=0, max=256, help="Runtime threads (0 = backend default).")]
AllowLarge = Annotated[bool, typer.Option(
    "--allow-large", help="Build a network even when its estimated memory (fp32 weights + the largest layer's "
                          "activations) is over 4 GiB; also ULSAM_ALLOW_LARGE=1.")]


def export_options(formats: str | None, calib: str | None, calib_samples: int | None, calib_method: str | None,
                   out: Path | None = None, keep_float: tuple[int, ...] = (), keep_float_asked: bool = False,
                   allow_large: bool = False, npu: str | None = None):
    """The one ExportOptions of a command (formats parsed, dependencies first; default onnx,onnx-int8).

    An option that would change nothing for these formats is refused, not ignored: calibration options
    without a calibrated (INT8) format, ``--keep-float`` without a format that honours it."""
    from ..errors import UlsamError
    from ..export import DEFAULT_FORMATS, FORMATS, KEEP_FLOAT_FORMATS, parse_formats
    from ..export.vela import check_npu
    from ..formats import NPU_FORMATS
    from ..export.options import ExportOptions

    chosen = parse_formats(formats) if formats else DEFAULT_FORMATS
    if not any(FORMATS[name].calibrated for name in chosen):
        refuse_unused(f"none of the formats {','.join(chosen)} is calibrated (INT8)",
                      "drop it, or add an INT8 format such as onnx-int8",
                      **{"--calib": calib, "--calib-samples": calib_samples, "--calib-method": calib_method})
    if (keep_float or keep_float_asked) and not any(name in KEEP_FLOAT_FORMATS for name in chosen):
        raise UlsamError(f"--keep-float has no effect: none of the formats {','.join(chosen)} keeps layers in float",
                         f"add one of {', '.join(KEEP_FLOAT_FORMATS)}, or drop --keep-float")
    if npu is not None and not any(name in NPU_FORMATS for name in chosen):
        raise UlsamError(f"--npu has no effect: none of the formats {','.join(chosen)} is compiled for an NPU",
                         f"add {', '.join(NPU_FORMATS)}, or drop --npu")
    defaults = ExportOptions()
    return ExportOptions(chosen, out, calib, defaults.calib_samples if calib_samples is None else calib_samples,
                         calib_method or defaults.calib_method, tuple(keep_float), allow_large,
                         defaults.npu if npu is None else check_npu(npu))


def refuse_unused(why: str, hint: str, **given) -> None:
    """Refuse the first option of ``given`` (flag -> value, None when not given) that was given: ``why``
    says why it would have no effect. Silently ignoring it would let the user believe it took effect."""
    from ..errors import UlsamError

    flag = next((flag for flag, value in given.items() if value is not None), None)
    if flag is not None:
        raise UlsamError(f"{flag} has no effect: {why}", hint)


def refuse_with_export(export_dir: Path | None, options: ModelOptions, **calibration) -> None:
    """With ``--export DIR`` the manifest says what the model is and how it was calibrated: model options
    and calibration options (``--calib``, ``--calib-samples``, ``--calib-method``) would be ignored."""
    if export_dir is None:
        return
    refuse_unused(f"--export {export_dir} is checked as it was exported (calibration is fixed at export)",
                  "drop it, or re-export with `ulsam-deploy export --calib ...` first",
                  **calibration)
    spec_flags = {f"--{name.replace('_', '-')}": value for name, value in vars(options).items()}
    refuse_unused(f"the manifest of --export {export_dir} records the model",
                  "drop the model options (pass --model M to check the directory was exported from M)", **spec_flags)
