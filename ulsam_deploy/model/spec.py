"""ModelSpec and the position grammar: parsed and validated here, and only here.

Grammar (PAPER.md): a comma list of tokens; ``k:1`` inserts a ULSAM after layer k (on k's output
channels); a plain ``k`` substitutes layer k by a ULSAM, legal only where layer k keeps its shape.
Whitespace around tokens is ignored; the empty string means the plain backbone.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from .arch import ACTIVATIONS, ARCHS, DEFAULT_ACTIVATION, LayerDef, feature_sizes, layer_table
from ..errors import SpecError

Mode = Literal["insert", "substitute"]
_TOKEN = re.compile(r"(?P<layer>[0-9]{1,4})(?P<suffix>:[0-9]{1,4})?", re.ASCII)
MAX_POSITIONS_TEXT = 512
WIDTH_RANGE = (0.05, 4.0)
INPUT_RANGE = (32, 2048)
CLASSES_RANGE = (1, 100_000)


@dataclass(frozen=True, order=True)
class Placement:
    """One ULSAM: after layer ``layer`` (insert) or in place of it (substitute)."""

    layer: int
    mode: Mode

    def token(self) -> str:
        return f"{self.layer}:1" if self.mode == "insert" else str(self.layer)


def parse_positions(text: str) -> tuple[Placement, ...]:
    """Decode ``"8:1, 9:1,11"`` into placements; syntax only (layers are checked by ModelSpec)."""
    if text is None:
        return ()
    if len(text) > MAX_POSITIONS_TEXT:
        raise SpecError(f"positions list is {len(text)} characters long",
                        f"at most {MAX_POSITIONS_TEXT}; a backbone has at most 19 layers")
    stripped = text.strip()
    if stripped in ("", "none", "-"):
        return ()
    placements: list[Placement] = []
    for raw in stripped.split(","):
        token = raw.strip()
        if not token:
            raise SpecError(f"empty position in {text!r}", "separate layer numbers by single commas")
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise SpecError(f"position {token!r} is not a layer number",
                            "write k to substitute layer k, or k:1 to insert after it")
        if match["suffix"] and match["suffix"] != ":1":
            raise SpecError(f"position {token!r}: only ':1' is a placement suffix",
                            "k:1 inserts one ULSAM after layer k")
        mode: Mode = "insert" if match["suffix"] else "substitute"
        placements.append(Placement(int(match["layer"]), mode))
    return tuple(placements)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a network; immutable and validated on construction."""

    arch: str = "mv2"
    width: float = 1.0
    placements: tuple[Placement, ...] = field(default_factory=tuple)
    groups: int = 4
    num_classes: int = 1000
    input_size: int = 224
    activation: str = ""          # "relu" or "relu6"; empty means the arch's default (DEFAULT_ACTIVATION)

    def __post_init__(self) -> None:
        if not self.activation and self.arch in DEFAULT_ACTIVATION:
            object.__setattr__(self, "activation", DEFAULT_ACTIVATION[self.arch])
        _validate(self)
        object.__setattr__(self, "placements", tuple(sorted(self.placements)))

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, arch: str = "mv2", positions: str = "", groups: int = 4, width: float = 1.0,
              num_classes: int = 1000, input_size: int = 224, activation: str | None = None) -> "ModelSpec":
        """Build from user-facing values (the CLI options); no activation means the arch's default."""
        return cls(arch=str(arch).strip().lower(), width=width, placements=parse_positions(positions),
                   groups=groups, num_classes=num_classes, input_size=input_size,
                   activation=str(activation or "").strip().lower())

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        positions = data.get("positions", "") if isinstance(data, dict) else None
        if not isinstance(positions, str):
            raise SpecError(f"stored model spec is malformed: positions must be text, not {type(positions).__name__}")
        try:
            return cls.parse(arch=data["arch"], positions=positions,
                             groups=int(data.get("groups", 4)), width=float(data.get("width", 1.0)),
                             num_classes=int(data.get("num_classes", 1000)),
                             input_size=int(data.get("input_size", 224)),
                             activation=data.get("activation"))   # absent in older checkpoints
        except (KeyError, TypeError, ValueError, OverflowError) as exc:   # OverflowError: int(inf)
            raise SpecError(f"stored model spec is malformed: {str(exc)[:200]}") from None

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"stored model spec is not JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise SpecError("stored model spec is not a JSON object")
        return cls.from_dict(data)

    def replace(self, **changes) -> "ModelSpec":
        data = self.to_dict() | changes
        if "arch" in changes and "activation" not in changes:
            data.pop("activation")   # another arch starts from its own default
        return ModelSpec.from_dict(data)

    # --- views --------------------------------------------------------------------------------
    @property
    def positions(self) -> str:
        """Canonical position string, e.g. ``"8:1,9:1,11"``."""
        return ",".join(p.token() for p in self.placements)

    @property
    def layers(self) -> tuple[LayerDef, ...]:
        return layer_table(self.arch, self.width)

    @property
    def feature_sizes(self) -> dict[int, int]:
        return feature_sizes(self.layers, self.input_size)

    def vanilla(self) -> "ModelSpec":
        """The same backbone without any ULSAM."""
        return ModelSpec(self.arch, self.width, (), self.groups, self.num_classes, self.input_size, self.activation)

    @property
    def name(self) -> str:
        """File-system friendly name, e.g. ``mv2-ulsam-13-14-16-17-g4`` or ``mv1-relu6-w0.5-c10-s112``."""
        parts = [self.arch]
        if self.activation != DEFAULT_ACTIVATION[self.arch]:
            parts.append(self.activation)
        if self.width != 1.0:
            parts.append(f"w{self.width:g}")
        if self.placements:
            parts.append("ulsam-" + "-".join(p.token().replace(":", "x") for p in self.placements))
            parts.append(f"g{self.groups}")
        if self.num_classes != 1000:
            parts.append(f"c{self.num_classes}")
        if self.input_size != 224:
            parts.append(f"s{self.input_size}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("placements")
        data["positions"] = self.positions
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _validate(spec: ModelSpec) -> None:
    if spec.arch not in ARCHS:
        raise SpecError(f"arch {spec.arch!r} is unknown", f"choose one of {', '.join(ARCHS)}")
    if spec.activation not in ACTIVATIONS:
        raise SpecError(f"activation {spec.activation!r} is unknown", f"choose one of {', '.join(ACTIVATIONS)}")
    _check_number("width", spec.width, *WIDTH_RANGE, kind=float)
    _check_number("groups", spec.groups, 1, 4096, kind=int)
    _check_number("num-classes", spec.num_classes, *CLASSES_RANGE, kind=int)
    _check_number("input-size", spec.input_size, *INPUT_RANGE, kind=int)
    table = {layer.number: layer for layer in layer_table(spec.arch, spec.width)}
    sizes = feature_sizes(tuple(table.values()), spec.input_size)
    seen: dict[int, Placement] = {}
    for placement in spec.placements:
        token = placement.token()
        layer = table.get(placement.layer)
        if layer is None:
            raise SpecError(f"position {token!r}: {spec.arch} has no layer {placement.layer}",
                            f"layers are numbered 1..{len(table)}")
        if placement.layer in seen:
            other = seen[placement.layer]
            if other == placement:
                raise SpecError(f"position {token!r} is given twice")
            raise SpecError(f"positions {other.token()!r} and {token!r} contradict each other",
                            f"choose to substitute layer {layer.number} or to insert after it")
        seen[placement.layer] = placement
        if placement.mode == "substitute" and not layer.substitutable:
            why = (f"its stride is {layer.stride}" if layer.stride != 1
                   else f"it maps {layer.cin} to {layer.cout} channels")
            raise SpecError(f"position {token!r}: layer {layer.number} cannot be substituted, {why}",
                            f"use '{layer.number}:1' to insert after it instead")
        channels = layer.cout
        if channels % spec.groups:
            raise SpecError(f"groups {spec.groups} does not divide the {channels} channels at position {token!r}",
                            "choose groups that divide every ULSAM position's channel count")
        if sizes[layer.number] < 1:
            raise SpecError(f"position {token!r}: feature map is empty at input size {spec.input_size}")


def _check_number(name: str, value, low, high, *, kind) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{name} {value!r} is not a number")
    if kind is int and int(value) != value:
        raise SpecError(f"{name} {value!r} is not a whole number")
    if not (value == value) or not (low <= value <= high):  # NaN fails both comparisons
        raise SpecError(f"{name} {value!r} is out of range", f"use a value in [{low}, {high}]")
