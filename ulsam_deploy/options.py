"""The model options: Typer aliases defined once, parsed into one ModelOptions at the CLI boundary.

A command that takes model options declares one ``options: ModelOptions`` parameter and is wrapped in
:func:`model_options`; the wrapper shows Typer the shared options below and hands the command the parsed
object. Everything under the commands receives that object, never loose values.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from .errors import SpecError
from .spec import ModelSpec

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

_ALIASES = {"arch": Arch, "positions": Positions, "groups": Groups, "width": Width, "num_classes": NumClasses,
            "input_size": InputSize, "activation": Activation, "preprocess": Preprocess}


@dataclass(frozen=True)
class ModelOptions:
    """What the command line said about the model; None = not given."""

    arch: str | None = None
    positions: str | None = None
    groups: int | None = None
    width: float | None = None
    num_classes: int | None = None
    input_size: int | None = None
    activation: str | None = None
    preprocess: str | None = None          # a preset name (data.preprocess.PRESETS)

    def given(self) -> dict:
        """The spec fields given on the command line."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "preprocess"}

    def with_defaults(self, **defaults) -> "ModelOptions":
        """These options, with ``defaults`` for the fields not given."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def spec(self, base: ModelSpec | dict | None = None) -> ModelSpec:
        """The options over ``base`` (a stored spec, or fields read from a checkpoint), field by field.

        Fields neither gives take ModelSpec's defaults; another arch than the base's drops the base's
        activation, so that it takes its own default.
        """
        data = base.to_dict() if isinstance(base, ModelSpec) else dict(base or {})
        if self.arch is not None and self.arch != data.get("arch"):
            data.pop("activation", None)
        data |= self.given()
        return ModelSpec.parse(**{k: v for k, v in data.items() if k in _SPEC_FIELDS})

    def preprocessing(self, spec: ModelSpec, fallback: dict | None = None, layout_preset: str = "ours"):
        """The Preprocessing for ``spec``: ``--preprocess`` if given, else ``fallback`` (a recorded
        ``to_dict``, resized to the spec's input), else the checkpoint library's preset."""
        from .data.preprocess import Preprocessing, preset

        if self.preprocess is not None:
            return preset(self.preprocess, spec.input_size, spec.arch)
        if fallback:
            return replace(Preprocessing.from_dict(fallback), size=spec.input_size)
        return preset(layout_preset, spec.input_size, spec.arch)


_SPEC_FIELDS = ("arch", "positions", "groups", "width", "num_classes", "input_size", "activation")


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
