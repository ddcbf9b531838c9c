"""MobileNet-V1 and MobileNet-V2 built by walking the layer table, ULSAM placed while walking.

Module names follow the paper's numbering: ``features.layer13`` is layer 13 (or the ULSAM that
substitutes it), ``features.ulsam17`` the ULSAM inserted after layer 17.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..model.arch import LayerDef
from ..model.spec import ModelSpec
from .ulsam import ULSAM

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class DepthwiseSeparable(nn.Module):
    """MobileNet-V1 block: depthwise 3x3 + BN + act, pointwise 1x1 + BN + act."""

    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.dw = conv_bn_act(cin, cin, 3, stride, groups=cin, act=act)
        self.pw = conv_bn_act(cin, cout, 1, act=act)

    def forward(self, x):
        return self.pw(self.dw(x))


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: expand 1x1 (if t > 1), depthwise 3x3, linear projection; residual if shape kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, act: type[nn.Module] = nn.ReLU6):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(cin, hidden, 1, act=act))
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=act),
                   conv_bn_act(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def _backbone_layer(layer: LayerDef, act: type[nn.Module]) -> nn.Module:
    if layer.kind == "conv3x3":
        return conv_bn_act(layer.cin, layer.cout, 3, layer.stride, act=act)
    if layer.kind == "dws":
        return DepthwiseSeparable(layer.cin, layer.cout, layer.stride, act)
    if layer.kind == "inverted_residual":
        return InvertedResidual(layer.cin, layer.cout, layer.stride, layer.expansion, act)
    return conv_bn_act(layer.cin, layer.cout, 1, act=act)


class MobileNet(nn.Module):
    """MV1 or MV2 (by ``spec.arch``, activation ``spec.activation``) with ULSAM at ``spec.placements``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        modes = {p.layer: p.mode for p in spec.placements}
        act = ACTIVATION_MODULES[spec.activation]
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for layer in spec.layers:
            mode = modes.get(layer.number)
            if mode == "substitute":
                blocks[f"layer{layer.number}"] = ULSAM(layer.cout, spec.groups)
            else:
                blocks[f"layer{layer.number}"] = _backbone_layer(layer, act)
            if mode == "insert":
                blocks[f"ulsam{layer.number}"] = ULSAM(layer.cout, spec.groups)
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2) if spec.arch == "mv2" else nn.Identity()
        self.classifier = nn.Linear(spec.layers[-1].cout, spec.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))

    def ulsam_modules(self) -> dict[str, ULSAM]:
        """``{state-dict prefix: module}`` for every ULSAM in the network."""
        return {f"{name}.": m for name, m in self.named_modules() if isinstance(m, ULSAM)}
