"""The official ULSAM layout as a loop over per-group ``SubSpace`` modules.

Kept as the behavioural reference our vectorised module is checked against (tests) and timed
against (``python -m ulsam_deploy.nets.speed``). Same submodule names and arithmetic as the
official ``ulsam.py``; its import-time switch of the default tensor type to CUDA is left out.
"""

from __future__ import annotations

import torch
from torch import nn

from .ulsam import OFFICIAL_BN_MOMENTUM


class SubSpace(nn.Module):
    def __init__(self, nin: int):
        super().__init__()
        self.conv_dws = nn.Conv2d(nin, nin, kernel_size=1, stride=1, padding=0, groups=nin)
        self.bn_dws = nn.BatchNorm2d(nin, momentum=OFFICIAL_BN_MOMENTUM)
        self.relu_dws = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.conv_point = nn.Conv2d(nin, 1, kernel_size=1, stride=1, padding=0, groups=1)
        self.bn_point = nn.BatchNorm2d(1, momentum=OFFICIAL_BN_MOMENTUM)
        self.relu_point = nn.ReLU(inplace=False)
        self.softmax = nn.Softmax(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_dws(self.bn_dws(self.conv_dws(x)))
        out = self.maxpool(out)
        out = self.relu_point(self.bn_point(self.conv_point(out)))
        n, c, h, w = out.shape
        out = self.softmax(out.view(n, c, -1)).view(n, c, h, w)
        out = out.expand(x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        return torch.mul(out, x) + x


class LoopULSAM(nn.Module):
    """``ULSAM(nin, nout, h, w, num_splits)`` of the official code: chunk, loop, concatenate."""

    def __init__(self, nin: int, nout: int, h: int, w: int, num_splits: int):
        super().__init__()
        self.nin, self.nout, self.h, self.w, self.num_splits = nin, nout, h, w, num_splits
        self.subspaces = nn.ModuleList(SubSpace(nin // num_splits) for _ in range(num_splits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.chunk(x, self.num_splits, dim=1)
        return torch.cat([space(chunk) for space, chunk in zip(self.subspaces, chunks)], dim=1)
