"""What a checkpoint's tensors say about its network, and ULSAM surgery on a pretrained backbone.

A checkpoint without a stored spec (a .pth, torchvision's or timm's) still shows its arch, width, class
count and ULSAM positions in its tensor names and shapes. :func:`transplant` builds a new spec and loads
every tensor of the checkpoint that still has a place in it: substituted layers lose theirs, new ULSAMs (and a
classifier for another class count) are initialised, and the report says so tensor by tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..model.arch import WIDTHS, layer_table
from ..errors import InputFileError, SpecError
from ..model.spec import WIDTH_RANGE, ModelSpec
from .backbones import MobileNet
from .build import Checkpoint, build_model, meta_model
from .layouts import check_compatible

_LAST_CONV = re.compile(r"^features\.layer(\d+)\.(?:0|pw\.0|conv\.(\d+)\.0)\.weight$")
_ULSAM_PW = re.compile(r"^features\.(layer|ulsam)(\d+)\.pw\.weight$")   # ULSAM's grouped conv, not MV1's pw.0
_GROUP = re.compile(r"^features\.(layer|ulsam)(\d+)\.")


# --- facts from tensors -----------------------------------------------------------------------------
def layer_channels(state: dict[str, torch.Tensor]) -> dict[int, int]:
    """Output channels of each backbone layer present (a MV2 block's projection, a MV1 block's pointwise)."""
    best: dict[int, tuple[int, int]] = {}
    for key, value in state.items():
        if m := _LAST_CONV.match(key):
            layer, order = int(m[1]), int(m[2] or 0)
            if order >= best.get(layer, (-1, 0))[0]:
                best[layer] = (order, int(value.shape[0]))
    return {layer: channels for layer, (_, channels) in sorted(best.items())}


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    if any(re.match(r"^features\.layer\d+\.conv\.", k) for k in state):
        return "mv2"
    if any(re.match(r"^features\.layer\d+\.pw\.0\.", k) for k in state):
        return "mv1"
    return None


def infer_width(arch: str, channels: dict[int, int]) -> float | None:
    """The first multiplier (published ones first, then a 0.05 grid) whose layer table has these channels."""
    grid = [round(0.05 * i, 2) for i in range(1, int(WIDTH_RANGE[1] / 0.05) + 1)]
    for width in (*WIDTHS, *grid):
        if _mismatch(arch, width, channels) is None:
            return width
    return None


def _mismatch(arch: str, width: float, channels: dict[int, int]) -> tuple[int, int, int] | None:
    """(layer, checkpoint channels, table channels) of the first layer that differs, or None."""
    table = layer_table(arch, width)
    for layer, count in channels.items():
        expected = table[layer - 1].cout if layer <= len(table) else None
        if expected != count:
            return layer, count, expected or 0
    return None


def infer_positions(state: dict[str, torch.Tensor]) -> tuple[str, int | None]:
    """(positions, groups) of the ULSAMs in ``state``; groups None when there are none or they differ."""
    tokens, groups = [], set()
    for key, value in state.items():
        if m := _ULSAM_PW.match(key):
            tokens.append((int(m[2]), m[1] == "ulsam"))
            groups.add(int(value.shape[0]))
    positions = ",".join(f"{layer}:1" if insert else str(layer) for layer, insert in sorted(tokens))
    return positions, (groups.pop() if len(groups) == 1 else None)


def source_fields(checkpoint: Checkpoint) -> dict:
    """Spec fields of the checkpoint's own network: its stored spec, else what its tensors show.

    The activation is never guessed: timm's ReLU6 MobileNet-V1 must be asked for (``--activation relu6``).
    """
    if checkpoint.spec is not None:
        return checkpoint.spec.to_dict()
    state = checkpoint.state
    fields: dict = {}
    arch = checkpoint.layout.arch or infer_arch(state)
    if arch:
        fields["arch"] = arch
        width = infer_width(arch, layer_channels(state))
        if width is not None:
            fields["width"] = width
    if "classifier.weight" in state:
        fields["num_classes"] = int(state["classifier.weight"].shape[0])
    positions, groups = infer_positions(state)
    fields["positions"] = positions
    if groups is not None:
        fields["groups"] = groups
    return fields


def check_source(checkpoint: Checkpoint, spec: ModelSpec) -> None:
    """Refuse a spec whose backbone is not the checkpoint's: another arch, width or activation."""
    source = str(checkpoint.path)
    check_compatible(checkpoint.layout, spec, source)
    stored = checkpoint.spec
    if stored is not None:
        for name in ("arch", "width", "activation"):
            if getattr(stored, name) != getattr(spec, name):
                raise SpecError(f"{source} is {stored.name} with {name} {getattr(stored, name)}; "
                                f"the options ask for {getattr(spec, name)}", f"drop --{name} or pass the other checkpoint")
        return
    arch = checkpoint.layout.arch or infer_arch(checkpoint.state)
    if arch is not None and arch != spec.arch:
        raise SpecError(f"{source} holds a {arch} backbone, the options ask for {spec.arch}", f"pass --arch {arch}")
    channels = layer_channels(checkpoint.state)
    wrong = _mismatch(spec.arch, spec.width, channels)
    if wrong is not None:
        layer, found, expected = wrong
        width = infer_width(spec.arch, channels)
        has = f"width {width:g}" if width is not None else "another width"
        raise SpecError(f"{source} has {has} ({found} channels at layer {layer}); --width {spec.width:g} "
                        f"has {expected} there", f"pass --width {width:g}" if width is not None else None)


# --- surgery ---------------------------------------------------------------------------------------
@dataclass
class LayerTransplant:
    """One layer (``"13"``, an inserted ULSAM ``"17:1"``, or ``"classifier"``): what happened to its tensors."""

    layer: str
    checkpoint: str                 # what the checkpoint has there, "-" for nothing
    model: str                      # what the new model has there
    loaded: int                     # tensors copied from the checkpoint
    dropped: list[str] = field(default_factory=list)    # checkpoint tensors with no place in the model
    new: list[str] = field(default_factory=list)        # model tensors initialised afresh


@dataclass
class TransplantReport:
    source: str
    layout: str
    spec: str
    loaded: int
    dropped: int
    new: int
    layers: list[LayerTransplant]


def transplant(checkpoint: Checkpoint, spec: ModelSpec, seed: int = 0,
               classes_asked: bool = False) -> tuple[MobileNet, TransplantReport]:
    """``spec``'s network with every tensor of ``checkpoint`` that fits it; the rest initialised with ``seed``.

    Only what surgery replaces may be new: ULSAMs, and a classifier for another class count (or, when the
    checkpoint has none, for the count the caller asked for, ``classes_asked``). A backbone tensor the
    checkpoint lacks, or holds in another shape, means another or a damaged network and is refused, as is
    a module loaded in part (a classifier without its bias). BatchNorm's ``num_batches_tracked`` may be
    absent, as in PyTorch's own strict loading.
    """
    check_source(checkpoint, spec)
    shapes = meta_model(spec)     # shapes first: nothing is allocated for a checkpoint that is refused
    target = shapes.state_dict()
    replaceable = (*shapes.ulsam_modules(), "classifier.")
    loaded = {}
    for key, value in checkpoint.state.items():
        if key not in target:
            continue
        if tuple(value.shape) == tuple(target[key].shape):
            loaded[key] = value
        elif not key.startswith(replaceable):
            raise InputFileError(f"{checkpoint.path}: tensor {key} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(target[key].shape)}", "check --arch/--width")
    _check_complete(checkpoint, target, set(loaded), replaceable, classes_asked)
    model = build_model(spec, seed=seed)
    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in loaded.items()}, strict=False)
    layers = _per_layer(checkpoint.state, state, set(loaded))
    report = TransplantReport(str(checkpoint.path), checkpoint.layout.title, spec.name, len(loaded),
                              sum(len(r.dropped) for r in layers), sum(len(r.new) for r in layers), layers)
    return model.eval(), report


def _check_complete(checkpoint: Checkpoint, target: dict, loaded: set[str], replaceable: tuple[str, ...],
                    classes_asked: bool) -> None:
    source = checkpoint.path
    absent = [k for k in target if k not in checkpoint.state and not k.endswith(".num_batches_tracked")]
    backbone = [k for k in absent if not k.startswith(replaceable)]
    if backbone:
        raise InputFileError(f"{source} lacks {len(backbone)} backbone tensor(s) of {checkpoint.layout.title}, "
                             f"e.g. {backbone[0]}", "a damaged or truncated file: only ULSAMs and a resized "
                             "classifier may be new; re-save the complete state_dict()")
    for prefix in replaceable:
        module = [k for k in target if k.startswith(prefix)]
        partly = [k for k in module if k in absent] if any(k in loaded for k in module) else []
        if partly:
            raise InputFileError(f"{source} holds {prefix.rstrip('.')} only in part: {partly[0]} is missing",
                                 "re-save the complete state_dict()")
    if "classifier.weight" not in checkpoint.state and not classes_asked:
        raise SpecError(f"{source} has no classifier, so its class count is unknown",
                        "pass --num-classes N to initialise a new classifier for N classes")


def _group(key: str) -> str:
    m = _GROUP.match(key)
    if m is None:
        return key.split(".", 1)[0]
    return m[2] if m[1] == "layer" else f"{m[2]}:1"


def _order(group: str) -> tuple[int, int]:
    number, _, insert = group.partition(":")
    return (int(number), 1 if insert else 0) if number.isdigit() else (1 << 30, 0)


def _kind(keys: list[str], state: dict[str, torch.Tensor]) -> str:
    if not keys:
        return "-"
    if keys[0].startswith("classifier."):
        weight = state.get("classifier.weight")
        return f"linear {weight.shape[1]}->{weight.shape[0]}" if weight is not None else "linear"
    rests = {key.split(".", 2)[-1] for key in keys}
    if "pw.weight" in rests:
        groups = next(int(state[k].shape[0]) for k in keys if k.endswith(".pw.weight"))
        return f"ULSAM g={groups}"
    if any(r.startswith("conv.") for r in rests):
        return "inverted residual"
    if any(r.startswith("dw.0.") for r in rests):
        return "depthwise separable"
    weight = next((state[k] for k in keys if k.endswith(".0.weight")), None)
    return f"conv {weight.shape[-1]}x{weight.shape[-1]}" if weight is not None else "?"


def _per_layer(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], loaded: set[str]) -> list[LayerTransplant]:
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for key in source:
        groups.setdefault(_group(key), ([], []))[0].append(key)
    for key in target:
        groups.setdefault(_group(key), ([], []))[1].append(key)
    rows = []
    for name in sorted(groups, key=_order):
        before, after = groups[name]
        rows.append(LayerTransplant(name, _kind(before, source), _kind(after, target),
                                    sum(k in loaded for k in after), [k for k in before if k not in loaded],
                                    [k for k in after if k not in loaded]))
    return rows
