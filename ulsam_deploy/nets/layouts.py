"""Other people's checkpoints: unwrap the container, detect the layout by its keys, map the names to ours.

Layouts: ours, the official ULSAM ``subspaces.{i}.*`` layout, torchvision ``mobilenet_v2``, timm
``mobilenetv2_*`` (every width) and timm ``mobilenetv1_*``. Each is tensor for tensor the same network as
ours, so mapping renames keys and never changes a tensor's values (the official layout concatenates its
per-subspace tensors into our vectorised ones). ``from_ours`` is the exact inverse, for round trips and
for handing weights back to those libraries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..model.arch import layer_table
from ..errors import InputFileError, SpecError
from ..model.spec import ModelSpec
from .ulsam import from_official, is_official_layout, to_official

State = dict[str, torch.Tensor]
# Where training scripts keep the weights inside a checkpoint dict, most specific first.
CONTAINER_KEYS = ("state_dict", "model", "model_ema", "net", "model_state_dict")
_PARAM = r"[a-z_]+"


@dataclass(frozen=True)
class Layout:
    """A family of checkpoint names; ``arch``/``activation`` are None where the layout allows either."""

    name: str
    title: str
    arch: str | None
    activation: str | None
    preprocess: str                                   # the library's own preprocessing preset
    key: re.Pattern                                   # every tensor name of the layout matches this
    marker: Callable[[set[str]], bool]                # and the names as a whole show this
    to_ours: Callable[[State], State]
    from_ours: Callable[[State, ModelSpec], State]

    def fits(self, keys: set[str]) -> bool:
        return bool(keys) and all(self.key.match(k) for k in keys) and self.marker(keys)


# --- containers ------------------------------------------------------------------------------------
def unwrap(obj: object, source: str) -> State:
    """The state dict of tensors inside ``obj``: bare, or under one of ``CONTAINER_KEYS``; ``module.`` dropped."""
    for _ in range(3):   # e.g. {"model": {"state_dict": ...}}; deeper nests are not checkpoints we know
        if not isinstance(obj, dict) or _all_tensors(obj):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not _all_tensors(obj):
        found = f"keys {_first(map(str, obj))}" if isinstance(obj, dict) and obj else f"a {type(obj).__name__}"
        raise InputFileError(f"{source} does not hold a state dict of tensors (found {found})",
                             f"save the model's state_dict(), bare or under one of {', '.join(CONTAINER_KEYS)}")
    if all(k.startswith("module.") for k in obj):   # saved from DistributedDataParallel / DataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def _all_tensors(obj: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _first(keys, n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# --- torchvision mobilenet_v2 ----------------------------------------------------------------------
# features.{i} is our layer i+1. Inside a block, conv.{j} (j < n) are conv+BN+act Sequentials like ours;
# the projection is a bare conv.{n} and BN conv.{n+1}, which we keep together as conv.{n}.0 / conv.{n}.1.
_TV_KEY = re.compile(rf"^(features\.\d+\.(\d+|conv\.\d+(\.\d+)?)\.{_PARAM}|classifier\.1\.(weight|bias))$")
_TV_SINGLE = re.compile(rf"^features\.(\d+)\.conv\.(\d+)\.({_PARAM})$")
_OURS_LAYER = re.compile(r"^features\.layer(\d+)\.(.+)$")


def _tv_to_ours(state: State) -> State:
    projection: dict[str, int] = {}
    for key in state:
        if m := _TV_SINGLE.match(key):
            projection[m[1]] = min(projection.get(m[1], 1 << 30), int(m[2]))
    out = {}
    for key, value in state.items():
        if key.startswith("classifier.1."):
            out["classifier." + key.removeprefix("classifier.1.")] = value
        elif m := _TV_SINGLE.match(key):
            n = projection[m[1]]
            out[f"features.layer{int(m[1]) + 1}.conv.{n}.{int(m[2]) - n}.{m[3]}"] = value
        else:
            index, rest = key.removeprefix("features.").split(".", 1)
            out[f"features.layer{int(index) + 1}.{rest}"] = value
    return out


def _tv_from_ours(state: State, spec: ModelSpec) -> State:
    _only_backbone(state, spec, "torchvision")
    last = _last_sub_layer(state)
    out = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            out["classifier.1." + key.removeprefix("classifier.")] = value
            continue
        number, rest = _OURS_LAYER.match(key).groups()
        m = re.match(rf"^conv\.(\d+)\.([01])\.({_PARAM})$", rest)
        if m and int(m[1]) == last.get(number):
            rest = f"conv.{int(m[1]) + int(m[2])}.{m[3]}"
        out[f"features.{int(number) - 1}.{rest}"] = value
    return out


def _last_sub_layer(state: State) -> dict[str, int]:
    last: dict[str, int] = {}
    for key in state:
        if m := re.match(r"^features\.layer(\d+)\.conv\.(\d+)\.", key):
            last[m[1]] = max(last.get(m[1], -1), int(m[2]))
    return last


# --- timm mobilenetv2_* / mobilenetv1_* ------------------------------------------------------------
# conv_stem/bn1 are layer 1, blocks.{s}.{i} the numbered blocks in order, conv_head/bn2 MV2's last layer.
# Inside a block timm's conv/BN names run in the same order as our sub-layers.
_TIMM_BLOCK = re.compile(rf"^blocks\.(\d+)\.(\d+)\.(\w+?)\.({_PARAM})$")
_TIMM_TOP = rf"conv_stem\.weight|bn1\.{_PARAM}|classifier\.(weight|bias)"
_TIMM_MV2_KEY = re.compile(rf"^({_TIMM_TOP}|conv_head\.weight|bn2\.{_PARAM}|"
                           rf"blocks\.\d+\.\d+\.(conv_pw|bn1|conv_dw|bn2|conv_pwl|bn3)\.{_PARAM})$")
_TIMM_MV1_KEY = re.compile(rf"^({_TIMM_TOP}|blocks\.\d+\.\d+\.(conv_dw|bn1|conv_pw|bn2)\.{_PARAM})$")
_TIMM_IR = ("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3")    # expand, depthwise, project
_TIMM_DS = ("conv_dw", "bn1", "conv_pw", "bn2")                        # depthwise, project (t = 1, and MV1)
_OURS_MV1_BLOCK = ("dw.0", "dw.1", "pw.0", "pw.1")


def _ours_sub_layers(arch: str, timm_names: tuple[str, ...]) -> tuple[str, ...]:
    if arch == "mv1":
        return _OURS_MV1_BLOCK
    return tuple(f"conv.{p // 2}.{p % 2}" for p in range(len(timm_names)))


def _timm_to_ours(arch: str) -> Callable[[State], State]:
    def convert(state: State) -> State:
        blocks = sorted({(int(m[1]), int(m[2])) for k in state if (m := _TIMM_BLOCK.match(k))})
        number = {block: index + 2 for index, block in enumerate(blocks)}
        with_pwl = {(int(m[1]), int(m[2])) for k in state if (m := _TIMM_BLOCK.match(k)) and m[3] == "conv_pwl"}
        head = len(blocks) + 2
        top = {"conv_stem": "features.layer1.0", "bn1": "features.layer1.1",
               "conv_head": f"features.layer{head}.0", "bn2": f"features.layer{head}.1", "classifier": "classifier"}
        out = {}
        for key, value in state.items():
            if m := _TIMM_BLOCK.match(key):
                block = (int(m[1]), int(m[2]))
                names = _TIMM_IR if block in with_pwl else _TIMM_DS
                ours = dict(zip(names, _ours_sub_layers(arch, names)))
                out[f"features.layer{number[block]}.{ours[m[3]]}.{m[4]}"] = value
            else:
                module, param = key.split(".", 1)
                out[f"{top[module]}.{param}"] = value
        return out
    return convert


def _timm_stages(arch: str) -> dict[int, tuple[int, int]]:
    """Layer number -> timm's (stage, index): a stage starts wherever the channel count changes."""
    out, stage, index = {}, -1, 0
    for layer in layer_table(arch, 1.0)[1:]:
        if layer.kind not in ("dws", "inverted_residual"):
            continue
        stage, index = (stage + 1, 0) if layer.cin != layer.cout else (stage, index + 1)
        out[layer.number] = (stage, index)
    return out


def _timm_from_ours(arch: str) -> Callable[[State, ModelSpec], State]:
    def convert(state: State, spec: ModelSpec) -> State:
        _only_backbone(state, spec, "timm")
        stages, last = _timm_stages(arch), _last_sub_layer(state)
        out = {}
        for key, value in state.items():
            if key.startswith("classifier."):
                out[key] = value
                continue
            number, rest = _OURS_LAYER.match(key).groups()
            sub, param = rest.rsplit(".", 1)
            if int(number) == 1:
                out[f"{('conv_stem', 'bn1')[int(sub)]}.{param}"] = value
            elif int(number) not in stages:   # MV2's last layer, the 1x1 conv to 1280
                out[f"{('conv_head', 'bn2')[int(sub)]}.{param}"] = value
            else:
                names = _TIMM_IR if arch == "mv2" and last.get(number) == 2 else _TIMM_DS
                timm = dict(zip(_ours_sub_layers(arch, names), names))
                s, i = stages[int(number)]
                out[f"blocks.{s}.{i}.{timm[sub]}.{param}"] = value
        return out
    return convert


def _only_backbone(state: State, spec: ModelSpec, library: str) -> None:
    if spec.placements:
        raise SpecError(f"{spec.name} has ULSAM modules, which {library}'s MobileNet has no names for",
                        "hand back the plain backbone")


# --- ours and the official ULSAM layout --------------------------------------------------------------
_OURS_KEY = re.compile(r"^(features\.(layer|ulsam)\d+\.[\w.]+|classifier\.(weight|bias))$")


def _official_from_ours(state: State, spec: ModelSpec) -> State:
    from .backbones import MobileNet   # the ULSAM prefixes and groups come from the built network

    prefixes = {prefix: module.groups for prefix, module in MobileNet(spec).ulsam_modules().items()}
    return to_official(state, prefixes)


def _official_to_ours(state: State) -> State:
    try:
        return from_official(state)
    except (ValueError, RuntimeError) as exc:   # RuntimeError: subspace tensors torch.cat cannot join
        raise InputFileError(f"official ULSAM layout: {str(exc).splitlines()[0][:160]}") from None


LAYOUTS: tuple[Layout, ...] = (
    Layout("ours", "ulsam-deploy", None, None, "ours", _OURS_KEY,
           lambda keys: not is_official_layout(dict.fromkeys(keys)), dict, lambda state, spec: dict(state)),
    Layout("official", "official ULSAM (subspaces)", None, None, "ours", _OURS_KEY,
           lambda keys: is_official_layout(dict.fromkeys(keys)), _official_to_ours, _official_from_ours),
    Layout("torchvision-mv2", "torchvision mobilenet_v2", "mv2", "relu6", "torchvision", _TV_KEY,
           lambda keys: "features.0.0.weight" in keys, _tv_to_ours, _tv_from_ours),
    Layout("timm-mv2", "timm mobilenetv2", "mv2", "relu6", "timm", _TIMM_MV2_KEY,
           lambda keys: "conv_head.weight" in keys, _timm_to_ours("mv2"), _timm_from_ours("mv2")),
    Layout("timm-mv1", "timm mobilenetv1", "mv1", "relu6", "timm", _TIMM_MV1_KEY,
           lambda keys: "conv_stem.weight" in keys and "conv_head.weight" not in keys,
           _timm_to_ours("mv1"), _timm_from_ours("mv1")),
)
BY_NAME = {layout.name: layout for layout in LAYOUTS}


def detect(state: State, source: str) -> Layout:
    """The layout whose names fit every tensor; else one line naming the layouts tried and the misfits."""
    keys = set(state)
    for layout in LAYOUTS:
        if layout.fits(keys):
            return layout
    ordered = list(state)
    closest = max(LAYOUTS, key=lambda layout: sum(bool(layout.key.match(k)) for k in ordered))
    misfits = [k for k in ordered if not closest.key.match(k)] or ordered
    raise InputFileError(f"{source}: its {len(ordered)} tensor names fit no known layout "
                         f"(tried {', '.join(layout.title for layout in LAYOUTS)}); closest is {closest.title}, "
                         f"which has no place for {_first(misfits)}",
                         "save a MobileNet-V1/V2 state dict in one of these layouts")


def to_ours(state: State, source: str) -> tuple[State, Layout]:
    """(``state`` renamed to our layout, the layout it came in), every tensor of the rank its name needs."""
    layout = detect(state, source)
    ours = layout.to_ours(state)
    check_tensors(ours, source)
    return ours, layout


# Our names end in what a tensor is: a conv's weight is 4-D, a linear's 2-D, BatchNorm's and biases 1-D.
_CONV_WEIGHT = re.compile(r"\.(0|dw|pw)\.weight$")


def expected_rank(key: str) -> int:
    """The number of dimensions the tensor named ``key`` (our layout) has in any network of ours."""
    if key.endswith(".num_batches_tracked"):
        return 0
    if key == "classifier.weight":
        return 2
    if key.endswith(".weight") and _CONV_WEIGHT.search(key):
        return 4
    return 1


def check_tensors(state: State, source: str) -> None:
    """Refuse, before any code reads a shape, a tensor of another rank than its name says, or one that is
    not a plain dense real tensor (sparse, quantised, complex)."""
    for key, value in state.items():
        if value.layout != torch.strided or value.is_quantized or value.is_complex() or value.dtype == torch.bool:
            raise InputFileError(f"{source}: tensor {key} is a {value.layout} {value.dtype} tensor, not dense real "
                                 "numbers", "save the model's plain state_dict()")
        if value.dim() != expected_rank(key):
            raise InputFileError(f"{source}: tensor {key} has {value.dim()} dimensions {tuple(value.shape)}, "
                                 f"a MobileNet's has {expected_rank(key)}", "save the model's plain state_dict()")


def check_compatible(layout: Layout, spec: ModelSpec, source: str) -> None:
    """Refuse a spec whose arch or activation is not the network the layout's library built."""
    if layout.arch is not None and layout.arch != spec.arch:
        raise SpecError(f"{source} is a {layout.title} checkpoint ({layout.arch}), not {spec.arch}",
                        f"pass --arch {layout.arch}")
    if layout.activation is not None and layout.activation != spec.activation:
        names = {"relu": "ReLU", "relu6": "ReLU6"}
        raise SpecError(f"{source} is a {layout.title} checkpoint, which uses {names[layout.activation]}; "
                        f"the spec says {names[spec.activation]}", f"pass --activation {layout.activation}")
