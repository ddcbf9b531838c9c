"""Small, deterministic training for reference models and fine-tuning after substituting blocks.

The paper's optimiser: SGD with momentum 0.9 and weight decay 4e-5; cosine (default) or step decay.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import DataSet
from .nets import ULSAM, MobileNet, save_checkpoint
from .nets.build import sha256_file


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5
    schedule: str = "cosine"      # "cosine" or "step" (x0.1 at 1/2 and 3/4 of the epochs)
    seed: int = 0
    max_shift: int = 8            # random translation augmentation, pixels
    hflip: bool = False           # random horizontal flips (for data where a mirror image is the same class)
    freeze_backbone_epochs: int = 0   # first epochs that train only the ULSAMs and the classifier


@dataclass
class EpochLog:
    epoch: int
    loss: float
    train_top1: float
    test_top1: float | None = None


@dataclass
class TrainResult:
    config: TrainConfig
    seconds: float
    history: list[EpochLog] = field(default_factory=list)


@dataclass(frozen=True)
class Accuracy:
    top1: float       # percent
    top5: float       # percent
    count: int


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 120) -> np.ndarray:
    """Logits of ``model`` (eval mode) on NCHW float32 ``images``."""
    model.eval()
    out = [model(torch.from_numpy(np.array(images[i:i + batch_size], np.float32))).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> Accuracy:
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    top1 = float((top[:, 0] == labels).mean() * 100)
    top5 = float((top == labels[:, None]).any(axis=1).mean() * 100)
    return Accuracy(top1, top5, int(len(labels)))


def _shift(batch: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift <= 0:
        return batch
    fill = batch.amin(dim=(0, 2, 3), keepdim=True)   # the background colour after normalisation
    n, c, h, w = batch.shape
    padded = fill.expand(n, c, h + 2 * max_shift, w + 2 * max_shift).clone()
    padded[:, :, max_shift:max_shift + h, max_shift:max_shift + w] = batch
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(offsets.tolist())])


def train(model: MobileNet, train_set: DataSet, config: TrainConfig, test_set: DataSet | None = None,
          on_step: Callable[[int, int, int, float, float], None] | None = None,
          on_epoch: Callable[[EpochLog], None] | None = None) -> TrainResult:
    """Train ``model`` in place. ``on_step(epoch, step, steps, loss, running_top1)`` and
    ``on_epoch(log)`` report progress."""
    if train_set.labels is None:
        raise ValueError("training needs a labelled set")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    x_all = torch.from_numpy(np.array(train_set.images))
    y_all = torch.from_numpy(train_set.labels)
    steps = (len(x_all) + config.batch_size - 1) // config.batch_size
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=False)
    total = steps * config.epochs
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, [total // 2, total * 3 // 4], gamma=0.1)
    loss_fn = nn.CrossEntropyLoss()
    result = TrainResult(config, 0.0)
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        _freeze_backbone(model, epoch <= config.freeze_backbone_epochs)
        order = torch.randperm(len(x_all), generator=gen)
        seen = correct = 0
        loss_sum = 0.0
        for step in range(steps):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            if len(idx) < 2:   # BatchNorm needs more than one sample
                continue
            x, y = _shift(x_all[idx], config.max_shift, gen), y_all[idx]
            if config.hflip:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            if on_step:
                on_step(epoch, step + 1, steps, loss_sum / seen, 100.0 * correct / seen)
        log = EpochLog(epoch, loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1))
        if test_set is not None and test_set.labels is not None:
            log.test_top1 = accuracy(predict(model, test_set.images), test_set.labels).top1
        result.history.append(log)
        if on_epoch:
            on_epoch(log)
    result.seconds = time.perf_counter() - start
    return result


def _freeze_backbone(model: MobileNet, frozen: bool) -> None:
    """Hold every layer but the ULSAMs (and the classifier): new modules first learn to fit a pretrained
    backbone before it moves; its BatchNorm statistics stay those it was trained with meanwhile."""
    for module in model.features:
        if isinstance(module, ULSAM):
            continue
        module.requires_grad_(not frozen)
        if frozen:
            module.eval()


def write_model_folder(model: MobileNet, folder: Path, dataset: str, preprocessing: dict, result: TrainResult,
                       test: Accuracy, command: str, data_description: str, origin: str | None = None) -> Path:
    """``folder/model.safetensors`` (spec, data and accuracy in the metadata) and ``folder/README.md``."""
    from .fileio import write_text_atomic

    spec = model.spec
    meta = {"dataset": dataset, "preprocessing": json.dumps(preprocessing),
            "test_top1": f"{test.top1:.2f}", "test_top5": f"{test.top5:.2f}", "test_count": str(test.count),
            "train_config": json.dumps(asdict(result.config)), **({"origin": origin} if origin else {})}
    checkpoint = save_checkpoint(model, Path(folder) / "model.safetensors", extra=meta)
    params = sum(p.numel() for p in model.parameters())
    history = "\n".join(f"| {e.epoch} | {e.loss:.4f} | {e.train_top1:.2f} | "
                        f"{'' if e.test_top1 is None else f'{e.test_top1:.2f}'} |" for e in result.history)
    card = f"""# {Path(folder).name}

{spec.arch.upper()} (width {spec.width:g}) with ULSAM at `{spec.positions or '-'}` (g = {spec.groups}),
{spec.num_classes} classes, {spec.input_size}x{spec.input_size} input, {params:,} parameters.

| | |
|---|---|
| spec | `{spec.to_json()}` |
| data | {dataset} |
| test accuracy | top-1 **{test.top1:.2f} %**, top-5 {test.top5:.2f} % on {test.count} test images |
| training time | {result.seconds:.0f} s on this repository's CI machine ({torch.get_num_threads()} CPU thread(s)) |
| checkpoint sha256 | `{sha256_file(checkpoint)}` |

Data: {data_description}, normalised with `{json.dumps(preprocessing)}`.

Initial weights: {origin or 'random (seed ' + str(result.config.seed) + ')'}.

Training: SGD momentum {result.config.momentum}, weight decay {result.config.weight_decay}, lr {result.config.lr}
with {result.config.schedule} decay, batch {result.config.batch_size}, {result.config.epochs} epochs,
random shifts of up to {result.config.max_shift} px{', random horizontal flips' if result.config.hflip else ''}, seed {result.config.seed}{_frozen(result.config)}.

Produced by:

```bash
{command}
```

| epoch | train loss | train top-1 % | test top-1 % |
|---|---|---|---|
{history}
"""
    write_text_atomic(Path(folder) / "README.md", card)
    return checkpoint


def _frozen(config: TrainConfig) -> str:
    n = config.freeze_backbone_epochs
    return f"; backbone frozen for the first {n} epoch{'s' if n != 1 else ''}" if n else ""
