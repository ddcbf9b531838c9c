"""Shared CLI options (defined once) and the one place they become a ModelSpec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
ModelPath = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="A model folder (models/<name>) or checkpoint (.safetensors, .pth).", rich_help_panel=_SPEC)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def spec_from_options(arch: str | None, positions: str | None, groups: int | None, width: float | None,
                      num_classes: int | None, input_size: int | None, *,
                      stored: ModelSpec | None = None) -> ModelSpec:
    """Options given on the command line override the stored spec field by field; defaults fill the rest."""
    given = {"arch": arch, "positions": positions, "groups": groups, "width": width,
             "num_classes": num_classes, "input_size": input_size}
    base = stored.to_dict() if stored is not None else ModelSpec().to_dict()
    if stored is None:
        base["positions"] = ""
    merged = base | {k: v for k, v in given.items() if v is not None}
    return ModelSpec.parse(**merged)


def spec_for_model(model: Path | None, arch, positions, groups, width, num_classes, input_size) -> ModelSpec:
    """The spec of ``--model`` if given (spec options must then agree with it), else from the options."""
    if model is None:
        return spec_from_options(arch, positions, groups, width, num_classes, input_size)
    from .nets.build import stored_spec

    stored = stored_spec(model)
    if stored is None:
        return spec_from_options(arch, positions, groups, width, num_classes, input_size)
    requested = spec_from_options(arch, positions, groups, width, num_classes, input_size, stored=stored)
    if requested != stored:
        raise SpecError(f"--model {model} is {stored.name}; the options ask for {requested.name}",
                        "drop the spec options when passing --model")
    return stored
