"""The two backbones as data: one row per paper layer number (PAPER.md, Tables 3 and 5).

Everything that needs channel counts, strides or spatial sizes (the position grammar, the
network builder, the profile) reads them from here, never from a built module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Arch = Literal["mv1", "mv2"]
ARCHS: tuple[str, ...] = ("mv1", "mv2")
ACTIVATIONS: tuple[str, ...] = ("relu", "relu6")
# Width multipliers published for MobileNets (torchvision, timm, the papers): tried first when a
# checkpoint's width is read from its channel counts, since several multipliers can round alike.
WIDTHS: tuple[float, ...] = (1.0, 0.5, 0.75, 0.35, 1.4, 0.25, 1.25, 1.3, 1.5, 2.0)
# The papers' choices; timm's MobileNet-V1 uses ReLU6 instead, hence an activation in the spec.
DEFAULT_ACTIVATION = {"mv1": "relu", "mv2": "relu6"}

# MobileNet-V1: layer 1 is a 3x3 conv, layers 2..14 depthwise-separable blocks. (in, out, stride)
_MV1 = [(3, 32, 2)] + [
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
    (512, 1024, 2), (1024, 1024, 1),
]
# MobileNet-V2: layer 1 conv, 2..18 inverted residuals (in, out, stride, expansion), 19 conv 1x1.
_MV2 = [(3, 32, 2, 0)] + [
    (32, 16, 1, 1), (16, 24, 2, 6), (24, 24, 1, 6), (24, 32, 2, 6), (32, 32, 1, 6), (32, 32, 1, 6),
    (32, 64, 2, 6), (64, 64, 1, 6), (64, 64, 1, 6), (64, 64, 1, 6), (64, 96, 1, 6), (96, 96, 1, 6),
    (96, 96, 1, 6), (96, 160, 2, 6), (160, 160, 1, 6), (160, 160, 1, 6), (160, 320, 1, 6),
] + [(320, 1280, 1, 0)]


@dataclass(frozen=True)
class LayerDef:
    """One numbered layer of a backbone, channels already scaled by the width multiplier."""

    number: int
    kind: Literal["conv3x3", "dws", "inverted_residual", "conv1x1"]
    cin: int
    cout: int
    stride: int
    expansion: int = 1

    @property
    def substitutable(self) -> bool:
        """A ULSAM can replace this layer only if it keeps shape: in == out and stride 1."""
        return self.cin == self.cout and self.stride == 1 and self.kind != "conv3x3"


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never dropping below 90 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def layer_table(arch: str, width: float) -> tuple[LayerDef, ...]:
    """The numbered layers of ``arch`` at width multiplier ``width``."""
    if arch == "mv1":
        rows = []
        for number, (cin, cout, stride) in enumerate(_MV1, start=1):
            kind = "conv3x3" if number == 1 else "dws"
            scaled_in = 3 if number == 1 else make_divisible(cin * width)
            rows.append(LayerDef(number, kind, scaled_in, make_divisible(cout * width), stride))
        return tuple(rows)
    if arch == "mv2":
        rows = []
        last = len(_MV2)
        for number, (cin, cout, stride, t) in enumerate(_MV2, start=1):
            if number == 1:
                rows.append(LayerDef(1, "conv3x3", 3, make_divisible(cout * width), stride))
            elif number == last:  # the 1280-channel conv is never narrowed below 1280
                rows.append(LayerDef(number, "conv1x1", make_divisible(cin * width),
                                     make_divisible(cout * max(1.0, width)), 1))
            else:
                rows.append(LayerDef(number, "inverted_residual", make_divisible(cin * width),
                                     make_divisible(cout * width), stride, t))
        return tuple(rows)
    raise ValueError(f"unknown arch {arch!r}")


def feature_sizes(table: tuple[LayerDef, ...], input_size: int) -> dict[int, int]:
    """Spatial side of each layer's output for a square input (3x3 convs, padding 1)."""
    sizes, side = {}, input_size
    for layer in table:
        side = (side - 1) // layer.stride + 1
        sizes[layer.number] = side
    return sizes
