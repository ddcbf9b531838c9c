"""ULSAM vectorised over groups, and the weight mapping to and from the official layout.

One depthwise 1x1 conv over all m channels and one grouped 1x1 conv m -> g replace the official
loop over g ``SubSpace`` modules; the attention map A (N, g, H, W) is broadcast over an
(N, g, G, H, W) view of x. Broadcasting keeps the exported graph free of the 5-D Tile that
``repeat_interleave`` produces (onnx2tf cannot convert it), and the node count independent of g.

Exports can trace one of two other forms of the same function (see :func:`export_form`), both free of 5-D
tensors: ``spread`` writes ``x*A + x`` as ``x * (1 + A)``, with ``1 + A`` spread over each group's G channels
by a 1x1 convolution g -> m (weights 0/1, bias 1; constants outside the state dict) - the ONNX and ExecuTorch
form: XNNPACK takes it whole, ONNX Runtime keeps x in its blocked (fp32) or channels-last (INT8) layout through
the conv and the Mul, and INT8 quantises 1 + A instead of A; ``spatial`` also writes the softmax over H*W
as max / subtract / exp / sum / divide over the two spatial axes, so no op reshapes at all - the form for
channels-last converters (onnx2tf), which need no transpose for it. ``npu`` is ``spatial`` with the division
written as a log-sum-exp, ``A = exp(d - log(sum(exp(d))))`` with ``d = a - max(a)``: Arm's Ethos-U55 and U65
have no DIV but run EXP and LOG as lookup tables, so the full-integer model runs there without a CPU operator.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from torch import nn

# BatchNorm momentum of the official code (PyTorch semantics: running stats follow the last batch).
OFFICIAL_BN_MOMENTUM = 0.9


class ULSAM(nn.Module):
    """Ultra-Lightweight Subspace Attention over ``channels`` split into ``groups`` subspaces."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"groups {groups} must divide channels {channels}")
        self.channels, self.groups = channels, groups
        self.dw = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
        self.dw_bn = nn.BatchNorm2d(channels, momentum=OFFICIAL_BN_MOMENTUM)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.pw = nn.Conv2d(channels, groups, 1, groups=groups, bias=True)
        self.pw_bn = nn.BatchNorm2d(groups, momentum=OFFICIAL_BN_MOMENTUM)
        self.form = "broadcast"     # what an export traces; eager always runs the broadcast form
        # the export forms' channel spread, a 1x1 conv g -> m: output channel c reads group c // G with
        # weight 1 (bias 1 on top); a constant, not part of the state dict
        spread = torch.zeros(channels, groups, 1, 1)
        spread[torch.arange(channels), torch.arange(channels) // (channels // groups)] = 1.0
        self.register_buffer("spread", spread, persistent=False)
        self.register_buffer("spread_bias", torch.ones(channels), persistent=False)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """The maps before the softmax, shape (N, g, H, W)."""
        a = torch.relu(self.dw_bn(self.dw(x)))
        a = self.pool(a) if _exporting() else max_pool3x3(a)
        return torch.relu(self.pw_bn(self.pw(a)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention maps A, shape (N, g, H, W); each map sums to 1 over H*W."""
        a = self._scores(x)
        return torch.softmax(a.flatten(2), dim=-1).view_as(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form != "broadcast" and _exporting():
            return self._export_forward(x)
        a = self.attention(x).unsqueeze(2)                      # (N, g, 1, H, W)
        xg = x.unflatten(1, (self.groups, self.channels // self.groups))  # (N, g, G, H, W)
        return (xg * a + xg).flatten(1, 2)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ``spread``, ``spatial`` or ``npu`` form (module docstring); the same values as :meth:`forward`."""
        if self.form == "spatial":
            a = self._scores(x)
            e = torch.exp(a - a.amax(dim=(2, 3), keepdim=True))
            attention = e / e.sum(dim=(2, 3), keepdim=True)                         # (N, g, H, W)
        elif self.form == "npu":
            a = self._scores(x)
            d = a - a.amax(dim=(2, 3), keepdim=True)
            attention = torch.exp(d - torch.log(torch.exp(d).sum(dim=(2, 3), keepdim=True)))
        else:
            attention = self.attention(x)
        scale = F.conv2d(attention, self.spread, self.spread_bias)   # (N, m, H, W): 1 + A
        return x * scale

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


FORMS = ("broadcast", "spread", "spatial", "npu")


@contextlib.contextmanager
def export_form(model: nn.Module, form: str):
    """Within the block, exports of ``model`` trace every ULSAM in ``form`` (see the module docstring)."""
    if form not in FORMS:
        raise ValueError(f"unknown ULSAM export form {form!r}; expected one of {', '.join(FORMS)}")
    modules = [m for m in model.modules() if isinstance(m, ULSAM)]
    before = [m.form for m in modules]
    for m in modules:
        m.form = form
    try:
        yield model
    finally:
        for m, old in zip(modules, before):
            m.form = old


def max_pool3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max pool, stride 1, padding 1, as two separable shifted maxima.

    Identical values to ``nn.MaxPool2d(3, 1, 1)`` (padding counts as -inf) and about 10x faster in
    eager mode on CPU for NCHW tensors; exported graphs keep the single MaxPool node instead.
    """
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


# --- official layout <-> ours ------------------------------------------------------------------
# Official per-subspace tensors: subspaces.{i}.{conv_dws,bn_dws,conv_point,bn_point}.<param>
_OFFICIAL = re.compile(r"^(?P<prefix>.*?)subspaces\.(?P<i>\d+)\.(?P<mod>conv_dws|bn_dws|conv_point|bn_point)\.(?P<param>\w+)$")
_OURS_OF = {"conv_dws": "dw", "bn_dws": "dw_bn", "conv_point": "pw", "bn_point": "pw_bn"}
_OFFICIAL_OF = {v: k for k, v in _OURS_OF.items()}


def is_official_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(_OFFICIAL.match(key) for key in state)


def from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map every official ``subspaces.{i}.*`` tensor group onto our vectorised tensors.

    Per-subspace tensors are concatenated in subspace order along dim 0: conv_point weights
    (1, G, 1, 1) stack into our grouped conv (g, G, 1, 1); BN statistics concatenate channel-wise.
    """
    out: dict[str, torch.Tensor] = {}
    grouped: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        match = _OFFICIAL.match(key)
        if match is None:
            out[key] = value
            continue
        slot = (match["prefix"], _OURS_OF[match["mod"]], match["param"])
        grouped.setdefault(slot, {})[int(match["i"])] = value
    for (prefix, mod, param), parts in grouped.items():
        ordered = [parts[i] for i in sorted(parts)]
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"{prefix}subspaces: subspace indices {sorted(parts)} are not 0..{len(parts) - 1}")
        if param == "num_batches_tracked":
            out[f"{prefix}{mod}.{param}"] = ordered[0].clone()
        else:
            out[f"{prefix}{mod}.{param}"] = torch.cat(ordered, 0)
    return out


def to_official(state: dict[str, torch.Tensor], ulsam_prefixes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_official` for the ULSAM modules at ``{prefix: groups}``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in ulsam_prefixes if key.startswith(p) and key[len(p):].split(".")[0] in _OFFICIAL_OF), None)
        if prefix is None:
            out[key] = value
            continue
        mod, param = key[len(prefix):].split(".", 1)
        groups = ulsam_prefixes[prefix]
        pieces = [value] * groups if param == "num_batches_tracked" else torch.chunk(value, groups, 0)
        for i, piece in enumerate(pieces):
            out[f"{prefix}subspaces.{i}.{_OFFICIAL_OF[mod]}.{param}"] = piece.clone()
    return out
