"""Per-layer parameters and multiply-accumulates (MACs), counted two ways.

* Direct: the PyTorch model, built on the meta device (shapes only: counting allocates no weights, so
  a 100,000-class width-4 network at 2048 px is counted in a blink). Params = every parameter (BN
  included); MACs = conv + linear.
* Paper convention (PAPER.md): the backbone paper's published totals, minus the conv weights and
  conv MACs of each substituted layer, plus 2m params and 2m*h*w MACs per ULSAM. Where no
  published total exists (other widths, class counts or input sizes) the base is the direct
  count of conv/linear weights, and ``paper_base`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nets.build import meta_model
from ..nets.ulsam import ULSAM
from .spec import ModelSpec

# Published backbone totals (params, MACs) at 224x224 with 1000 classes, by (arch, width).
PUBLISHED = {("mv1", 1.0): (4.2e6, 569e6), ("mv1", 0.75): (2.6e6, 325e6),
             ("mv1", 0.5): (1.3e6, 149e6), ("mv2", 1.0): (3.4e6, 300e6)}


@dataclass(frozen=True)
class LayerProfile:
    layer: str            # paper label: "13", "17:1" (inserted ULSAM), "fc"
    type: str
    output_shape: tuple[int, ...]
    params: int           # all parameters of the module
    weights: int          # conv/linear weights only (what the paper counts)
    macs: int


@dataclass(frozen=True)
class Profile:
    arch: str
    width: float
    positions: str
    groups: int
    num_classes: int
    input_size: int
    params: int
    macs: int
    paper_params: float
    paper_macs: float
    paper_base: str       # "published" or "direct"
    layers: list[LayerProfile] = field(default_factory=list)


def _label(name: str) -> str:
    if name.startswith("layer"):
        return name.removeprefix("layer")
    if name.startswith("ulsam"):
        return name.removeprefix("ulsam") + ":1"
    return name


def _module_type(module: nn.Module) -> str:
    if isinstance(module, ULSAM):
        return f"ULSAM(g={module.groups})"
    return type(module).__name__ if not isinstance(module, nn.Sequential) else "ConvBNAct"


@torch.no_grad()
def count_layers(spec: ModelSpec) -> list[LayerProfile]:
    """One row per numbered layer (and inserted ULSAM) plus the classifier, at batch 1 (on the meta device)."""
    model = meta_model(spec)
    macs: dict[str, int] = {}
    weights: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    tops = list(model.features.named_children()) + [("fc", model.classifier)]
    for top, block in tops:
        macs[top] = weights[top] = 0
        handles.append(block.register_forward_hook(lambda m, i, o, top=top: shapes.__setitem__(top, tuple(o.shape[1:]))))
        for leaf in block.modules():
            if isinstance(leaf, (nn.Conv2d, nn.Linear)):
                handles.append(leaf.register_forward_hook(lambda m, i, o, top=top: _add_macs(m, o, top, macs)))
                weights[top] += leaf.weight.numel()
    model(torch.empty(1, 3, spec.input_size, spec.input_size, device="meta"))
    for handle in handles:
        handle.remove()
    return [LayerProfile(_label(top), _module_type(block), shapes[top],
                         sum(p.numel() for p in block.parameters()), weights[top], macs[top])
            for top, block in tops]


def _add_macs(module: nn.Module, output: torch.Tensor, top: str, macs: dict[str, int]) -> None:
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        macs[top] += output[0].numel() * per_output
    else:
        macs[top] += module.in_features * module.out_features


def profile(spec: ModelSpec) -> Profile:
    """Direct and paper-convention totals of ``spec``, with the per-layer rows."""
    rows = count_layers(spec)
    vanilla = {row.layer: row for row in count_layers(spec.vanilla())} if spec.placements else \
        {row.layer: row for row in rows}
    published = PUBLISHED.get((spec.arch, spec.width))
    if published and spec.num_classes == 1000 and spec.input_size == 224:
        base_params, base_macs, base = published[0], published[1], "published"
    else:
        base_params = sum(r.weights for r in vanilla.values())
        base_macs = sum(r.macs for r in vanilla.values())
        base = "direct"
    delta_params = delta_macs = 0
    for placement in spec.placements:
        label = placement.token()
        ulsam = next(r for r in rows if r.layer == label)
        delta_params += ulsam.weights          # 2m: depthwise + pointwise weights
        delta_macs += ulsam.macs               # 2m*h*w
        if placement.mode == "substitute":
            removed = vanilla[str(placement.layer)]
            delta_params -= removed.weights
            delta_macs -= removed.macs
    return Profile(spec.arch, spec.width, spec.positions, spec.groups, spec.num_classes, spec.input_size,
                   params=sum(r.params for r in rows), macs=sum(r.macs for r in rows),
                   paper_params=base_params + delta_params, paper_macs=base_macs + delta_macs,
                   paper_base=base, layers=rows)


# --- the paper's tables (PAPER.md), 21 models x (params, MACs) = 42 numbers ---------------------
PAPER_ROWS: tuple[tuple[str, str, float, str, float, float], ...] = (
    # table, arch, width, positions, #params, #MACs
    ("6", "mv1", 1.0, "", 4.2e6, 569e6),
    ("6", "mv1", 1.0, "11:1", 4.2e6, 569.2e6),
    ("6", "mv1", 1.0, "12:1", 4.2e6, 569.2e6),
    ("6", "mv1", 1.0, "13:1", 4.2e6, 569.1e6),
    ("6", "mv2", 1.0, "", 3.4e6, 300e6),
    ("6", "mv2", 1.0, "17:1", 3.4e6, 300.01e6),
    ("7", "mv1", 1.0, "8:1,9:1,11", 3.9e6, 517e6),
    ("9", "mv1", 1.0, "8:1,9:1,11", 3.9e6, 517e6),
    ("7", "mv1", 0.75, "", 2.6e6, 325e6),
    ("7", "mv1", 0.75, "8:1,9:1,11", 2.4e6, 296e6),
    ("7", "mv1", 0.5, "", 1.3e6, 149e6),
    ("7", "mv1", 0.5, "8:1,9:1,11", 1.2e6, 136e6),
    ("8", "mv2", 1.0, "14,17", 2.96e6, 261.88e6),
    ("8", "mv2", 1.0, "16,17", 2.77e6, 269.07e6),
    ("8", "mv2", 1.0, "13,14,16,17", 2.54e6, 223.77e6),
    ("10-12", "mv2", 1.0, "13", 3.28e6, 277.34e6),
    ("10-12", "mv2", 1.0, "16", 3.08e6, 284.54e6),
    ("10-12", "mv2", 1.0, "9,13", 3.23e6, 267.06e6),
    ("10-12", "mv2", 1.0, "16,17", 2.77e6, 269.08e6),
    ("10-12", "mv2", 1.0, "14,17", 2.97e6, 261.88e6),
    ("10-12", "mv2", 1.0, "13,14,16,17", 2.54e6, 224.16e6),
)
PAPER_TOLERANCE = 0.01


@dataclass(frozen=True)
class PaperCheck:
    table: str
    model: str
    positions: str
    metric: str           # "params" or "macs"
    paper: float
    ours: float
    rel_error: float      # (ours - paper) / paper

    @property
    def within(self) -> bool:
        return abs(self.rel_error) <= PAPER_TOLERANCE


def paper_comparison(groups: int = 4) -> list[PaperCheck]:
    """Every number of the paper's tables against our paper-convention count."""
    cache: dict[tuple[str, float, str], Profile] = {}
    checks = []
    for table, arch, width, positions, params, macs in PAPER_ROWS:
        key = (arch, width, positions)
        if key not in cache:
            cache[key] = profile(ModelSpec.parse(arch, positions, groups=groups, width=width))
        prof = cache[key]
        model = f"{width:.2f} {arch.upper()}"
        for metric, paper, ours in (("params", params, prof.paper_params), ("macs", macs, prof.paper_macs)):
            checks.append(PaperCheck(table, model, positions or "-", metric, paper, ours, (ours - paper) / paper))
    return checks
