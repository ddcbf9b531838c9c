"""A planted, function-preserving activation outlier, and small trained models to plant it in.

``plant_outlier(model, layer)`` multiplies one channel of the tensor that paper layer ``layer`` reads by
``factor`` and divides it back out inside ``layer``: the float model computes the same function, but a
per-tensor INT8 scale on that tensor now spends its 256 steps on one channel and rounds the others to
a few levels. Where ``layer`` passes its input on (residual MV2 blocks, ULSAM), the scaled channel
travels with it to the next layer that does not.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from ulsam_deploy.nets import build_model, load_model, save_checkpoint
from ulsam_deploy.nets.backbones import DepthwiseSeparable, InvertedResidual
from ulsam_deploy.nets.ulsam import ULSAM


def _first_conv(block: nn.Module) -> nn.Conv2d:
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d))


def _scale_output(block: nn.Module, channel: int, factor: float) -> None:
    """Multiply output channel ``channel`` of a block by ``factor`` through its last BatchNorm (the output
    is linear, or a ReLU, which commutes with a positive factor)."""
    if isinstance(block, InvertedResidual):
        bn = block.conv[-1][1]
    elif isinstance(block, DepthwiseSeparable):
        bn = block.pw[1]
        assert isinstance(block.pw[2], nn.ReLU), "a ReLU6 output cannot carry a scaled channel"
    else:
        bn = block[1]
        assert isinstance(block[2], nn.ReLU), "a ReLU6 output cannot carry a scaled channel"
    bn.weight[channel] *= factor
    bn.bias[channel] *= factor


def _divide_input(block: nn.Module, channel: int, factor: float) -> None:
    """Divide what ``block``'s first conv reads from input channel ``channel`` by ``factor``."""
    conv = block.dw if isinstance(block, ULSAM) else _first_conv(block)
    if conv.groups == conv.in_channels:      # depthwise: one filter per channel
        conv.weight[channel] /= factor
    else:
        conv.weight[:, channel] /= factor


def _carries(block: nn.Module) -> bool:
    """Blocks whose output keeps a scaled input channel scaled: ULSAM (x*A + x) and residual MV2 blocks."""
    return isinstance(block, ULSAM) or (isinstance(block, InvertedResidual) and block.residual)


@torch.no_grad()
def plant_outlier(model, layer: int, factor: float = 1000.0, channel: int = 0):
    """Plant the outlier in the activation paper layer ``layer`` reads (in place; returns the model).

    The block before ``layer`` writes the channel ``factor`` times larger, ``layer``'s first conv divides
    it back out. Where ``layer`` passes its input on (a residual MV2 block, a ULSAM), the channel stays
    scaled through it and is divided out by the first following layer that does not."""
    blocks = [m for _, m in model.features.named_children()]
    index = [n for n, _ in model.features.named_children()].index(f"layer{layer}")
    assert index > 0, "layer 1 reads the image: there is no activation before it"
    assert not _carries(blocks[index - 1]), f"the block before layer {layer} only passes its own input on"
    _scale_output(blocks[index - 1], channel, factor)
    for block in blocks[index:]:
        _divide_input(block, channel, factor)
        if not _carries(block):
            break
        if isinstance(block, InvertedResidual):
            _scale_output(block, channel, factor)   # the residual sum carries the scaled channel on
    return model


EPOCHS = {"mv2": 3, "mv1": 6}   # digits at 64 px: 96-98 % top-1, INT8 top-1 agreement 100 %


@functools.lru_cache(maxsize=None)
def trained_file(spec, folder: str) -> Path:
    """A briefly trained model of ``spec`` on the digits train split (written once into ``folder``; a worker
    process that finds another one training it waits for that one)."""
    from filelock import FileLock

    path = Path(folder) / f"{spec.name}-{EPOCHS[spec.arch]}ep-{_code_digest()}-torch{torch.__version__}.safetensors"
    with FileLock(str(path.with_suffix(".lock"))):
        if not path.is_file():
            _train_into(spec, path)
    return path


@functools.lru_cache(maxsize=None)
def _code_digest() -> str:
    """The source that decides a trained model's weights (networks, data, training): a model kept in pytest's
    cache by an earlier version of it is trained again, not reused."""
    import hashlib

    import ulsam_deploy

    root = Path(ulsam_deploy.__file__).parent
    digest = hashlib.sha256()
    for source in sorted(p for folder in ("nets", "data", "training") for p in (root / folder).rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def _train_into(spec, path: Path) -> None:
    from ulsam_deploy.data import digits
    from ulsam_deploy.training.data import reference_data
    from ulsam_deploy.training.distributed import World
    from ulsam_deploy.training.train import TrainConfig, train

    size = spec.input_size
    data = reference_data(digits, "digits", size, digits.preprocessing(size), 4, False, seed=0)
    model = build_model(spec, seed=0)
    train(model, data, TrainConfig(epochs=EPOCHS[spec.arch], workers=0), path.parent / f"{path.stem}-state",
          World(), torch.device("cpu"))
    save_checkpoint(model.eval(), path, extra={"dataset": "digits"})


@pytest.fixture(scope="session")
def trained(request, tmp_path_factory):
    """``trained(spec)`` -> checkpoint path; kept in pytest's cache folder between runs."""
    import os

    cache = getattr(request.config, "cache", None)
    shared = os.environ.get("ULSAM_TEST_SHARED")          # the run's folder all its worker processes see
    folder = (cache.mkdir("ulsam-trained-models") if cache is not None
              else Path(shared) if shared else tmp_path_factory.mktemp("trained"))
    return lambda spec: trained_file(spec, str(folder))


def planted_file(source: Path, folder: Path, layer: int | None, factor: float = 1000.0) -> Path:
    """A copy of the checkpoint at ``source`` with an outlier planted before ``layer`` (None: unchanged)."""
    model = load_model(source)
    if layer is not None:
        plant_outlier(model, layer, factor)
    return save_checkpoint(model, Path(folder) / f"planted-{layer}.safetensors", extra={"dataset": "digits"})
