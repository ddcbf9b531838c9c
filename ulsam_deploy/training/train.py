"""The training loop: DataLoader workers, DistributedDataParallel, AMP, resume and distillation.

The paper's optimiser: SGD with momentum 0.9 and weight decay 4e-5; cosine (default) or step decay.
``--batch-size`` is per process (as in torchvision's and timm's reference scripts): the global batch is
batch x world size. Every epoch starts from seeds derived from (seed, epoch), the sampler is
``DistributedSampler`` with ``set_epoch`` and one seed on every rank, and each sample's augmentation is
seeded by (seed, epoch, rank, index); so an interrupted run resumed from its last epoch ends with the
weights of an uninterrupted one.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..data.stream import Source, batches
from ..errors import Interrupted, RunFailed, UlsamError
from ..nets import ULSAM, MobileNet
from .data import MAX_BAD_FRACTION, MIN_BAD_TOLERATED, TrainData
from .distributed import World, all_sum, average_batchnorm
from .resume import check_state, load_into
from .state import STATE, load_state, save_state


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64              # per process
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5
    schedule: str = "cosine"          # "cosine" or "step" (x0.1 at 1/2 and 3/4 of the epochs)
    seed: int = 0
    label_smoothing: float = 0.0
    freeze_backbone_epochs: int = 0   # first epochs that train only the ULSAMs and the classifier
    max_steps: int | None = None      # stop after this many optimiser steps (smoke tests, benchmarks)
    workers: int = 2
    amp: str = "off"                  # "bf16", "fp16" (with a gradient scaler) or "off"
    sync_bn: bool = False
    kd_weight: float = 0.5            # with a teacher: loss = (1 - w) CE + w T^2 KL
    kd_temperature: float = 4.0
    qat: bool = False                 # quantisation-aware fine-tuning (training/qat.py)


@dataclass(frozen=True)
class Accuracy:
    top1: float       # percent
    top5: float       # percent
    count: int


@dataclass
class EpochLog:
    epoch: int
    loss: float
    train_top1: float
    test_top1: float | None = None
    images: int = 0                   # trained on, all processes
    seconds: float = 0.0
    data_wait_s: float = 0.0          # rank 0's time waiting for the loader
    images_per_s: float = 0.0
    skipped: int = 0                  # unreadable training images replaced by a readable neighbour, all processes


@dataclass
class TrainResult:
    config: TrainConfig
    seconds: float
    history: list[EpochLog] = field(default_factory=list)
    world_size: int = 1
    device: str = "cpu"
    steps: int = 0
    resumed_from_epoch: int = 0
    final: Accuracy | None = None     # after the last epoch (BatchNorm statistics averaged over processes)
    unreadable: dict[str, str] = field(default_factory=dict)   # training image -> why it could not be read


@dataclass
class Hooks:
    on_step: Callable[[int, int, int, float], None] | None = None     # epoch, step, steps, loss
    on_epoch: Callable[[EpochLog], None] | None = None


def train(model: MobileNet | nn.Module, data: TrainData, config: TrainConfig, out: Path, world: World, device: torch.device,
          teacher: nn.Module | None = None, resume: bool = False, hooks: Hooks | None = None,
          resume_hint: str = "") -> TrainResult:
    """Train ``model`` in place (a MobileNet, or one prepared for quantisation-aware training: ``qat.QatNet``);
    after every epoch rank 0 writes the training state into ``out``."""
    hooks = hooks or Hooks()
    # NHWC: oneDNN's CPU convolutions (depthwise ones most) and cuDNN's run faster on it; 1.4x per training step
    # on a CPU at 112 px. The teacher below sees the same NHWC batches, so it is laid out the same way.
    model.to(device, memory_format=torch.channels_last)
    net: nn.Module = model
    if config.sync_bn and world.distributed:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world.distributed:
        # BN buffers stay rank-local until the epoch-end average. torch 2.13 deprecates broadcast_buffers in
        # favour of forward_sync_buffers, which would still sync them at init; its own warning says to keep
        # broadcast_buffers=False until init_sync_buffers exists, so that warning is not shown to users.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
                find_unused_parameters=config.freeze_backbone_epochs > 0)
    if teacher is not None:
        teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    sampler = DistributedSampler(data.train, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed)
    data.train.rank = world.rank
    loader = DataLoader(data.train, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                        pin_memory=device.type == "cuda", drop_last=len(sampler) % config.batch_size == 1,
                        persistent_workers=False)
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    total = len(loader) * config.epochs
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total) if config.schedule == "cosine"
                 else torch.optim.lr_scheduler.MultiStepLR(optimiser, [total // 2, total * 3 // 4], gamma=0.1))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    result = TrainResult(config, 0.0, world_size=world.size, device=str(device))
    keyed = _state_config(config, model, data)
    if resume:
        state = load_state(out, keyed)
        check_state(state, out / STATE, model, optimiser, config.epochs, world.size, amp=config.amp == "fp16")
        load_into(state, out / STATE, model, optimiser, scheduler, scaler)
        result.history = [EpochLog(**log) for log in state["history"]]
        result.seconds, result.steps = float(state["seconds"]), int(state["steps"])
        result.resumed_from_epoch = state["epoch"]
        result.unreadable = dict(state.get("unreadable", {}))
    step = result.steps
    saved = result.resumed_from_epoch                 # the last epoch whose state is on disk
    for epoch in range(result.resumed_from_epoch + 1, config.epochs + 1):
        if config.max_steps is not None and step >= config.max_steps:
            break
        try:   # the whole epoch, its evaluation, save and report: a signal anywhere in it says what is saved
            step = _train_epoch(net, model, teacher, loader, sampler, data, optimiser, scheduler, scaler, config,
                                device, world, epoch, step, hooks, result, out, keyed)
            saved = epoch
            if hooks.on_epoch:
                hooks.on_epoch(result.history[-1])
        except KeyboardInterrupt:
            raise Interrupted(f"training interrupted in epoch {epoch}; epoch {saved} of {config.epochs} is saved in "
                              f"{out}" if saved else f"training interrupted in epoch {epoch}, before any epoch finished",
                              resume_hint if saved else "start it again") from None
        except _BadData as exc:
            raise RunFailed(f"training stopped in epoch {epoch}: {exc}; " + _kept(saved, config.epochs, out),
                            "fix or remove the unreadable images (each was readable when the run started), then "
                            + (resume_hint if saved else "start it again")) from None
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise RunFailed(f"training stopped in epoch {epoch}: a data loading worker died ({first}); "
                            + _kept(saved, config.epochs, out),
                            "out of memory? use fewer --workers or a smaller --batch-size, "
                            + (resume_hint if saved else "and start it again")) from None
    if result.final is None and result.history:   # resumed with nothing left to train: the card still needs it
        result.final = evaluate(model, data.evaluation, world, device, config.batch_size * 2)
    return result


def _kept(saved: int, epochs: int, out: Path) -> str:
    return f"epoch {saved} of {epochs} is saved in {out}" if saved else "no epoch had finished"


def _train_epoch(net, model, teacher, loader, sampler, data, optimiser, scheduler, scaler, config: TrainConfig,
                 device, world: World, epoch: int, step: int, hooks: Hooks, result: TrainResult, out: Path,
                 keyed: dict) -> int:
    """One epoch: train, average BN, evaluate, save the state (main process); the step count after it."""
    torch.manual_seed(config.seed * 100_003 + epoch)          # dropout, and the loader's worker seeds
    sampler.set_epoch(epoch)
    data.train.set_epoch(epoch)
    log, step, unreadable = _epoch(net, model, teacher, loader, optimiser, scheduler, scaler, config, device,
                                   world, epoch, step, hooks)
    log.skipped = int(all_sum([len(unreadable)], world, device)[0])
    for name, why in sorted(_gather(unreadable, world).items()):
        if len(result.unreadable) < MAX_LISTED:
            result.unreadable.setdefault(name, why)
    average_batchnorm(model, world)
    result.final = evaluate(model, data.evaluation, world, device, config.batch_size * 2)
    log.test_top1 = result.final.top1
    result.history.append(log)
    result.seconds += log.seconds
    result.steps = step
    if world.main:
        save_state(out, {"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "config": keyed, "history": [asdict(h) for h in result.history],
                         "seconds": result.seconds, "steps": step, "world_size": world.size,
                         "unreadable": result.unreadable})
    return step


def _state_config(config: TrainConfig, model: MobileNet, data: TrainData) -> dict:
    """What a resumed run must share with the one it continues (``max_steps`` and ``workers`` may change)."""
    keyed = {k: v for k, v in asdict(config).items() if k not in ("max_steps", "workers")}
    return keyed | {"spec": model.spec.to_json(), "data": data.name, "recipe": asdict(data.recipe)}


def _epoch(net, model, teacher, loader, optimiser, scheduler, scaler, config: TrainConfig, device, world: World,
           epoch: int, step: int, hooks: Hooks) -> tuple[EpochLog, int, dict[str, str]]:
    net.train()
    if config.freeze_backbone_epochs:
        _freeze_backbone(model, epoch <= config.freeze_backbone_epochs)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    seen = correct = 0
    loss_sum = wait = 0.0
    start = tick = time.perf_counter()
    unreadable: dict[str, str] = {}
    limit = max(MAX_BAD_FRACTION * len(loader.sampler), MIN_BAD_TOLERATED)
    for index, (x, y, skipped) in enumerate(loader):
        wait += time.perf_counter() - tick
        if config.max_steps is not None and step >= config.max_steps:
            break
        for text in filter(None, skipped):
            name, _, why = text.partition(": ")
            unreadable[name] = why
        if len(unreadable) > limit:
            name = next(iter(unreadable))
            raise _BadData(f"{len(unreadable)} of the {len(loader.sampler):,} images this process reads could not be "
                           f"read (more than {MAX_BAD_FRACTION:.0%}; e.g. {name}: {unreadable[name]})")
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = net(x)
            loss = distillation_loss(logits, y, teacher(x) if teacher is not None else None, config)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        scheduler.step()
        step += 1
        seen += len(y)
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += float(loss.detach()) * len(y)
        if hooks.on_step:
            hooks.on_step(epoch, index + 1, len(loader), loss_sum / seen)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    seen_all, correct_all, loss_all = all_sum([seen, correct, loss_sum], world, device)
    log = EpochLog(epoch, loss_all / max(seen_all, 1), 100.0 * correct_all / max(seen_all, 1), images=int(seen_all),
                   seconds=seconds, data_wait_s=wait, images_per_s=seen_all / max(seconds, 1e-9))
    return log, step, unreadable


MAX_LISTED = 1000   # unreadable images named in the training state and the card


class _BadData(Exception):
    """More unreadable training images than the run tolerates."""


def _gather(unreadable: dict[str, str], world: World) -> dict[str, str]:
    """Every process's unreadable images of the epoch (the names a process saw; at most MAX_LISTED each)."""
    mine = dict(sorted(unreadable.items())[:MAX_LISTED])
    if not world.distributed:
        return mine
    import torch.distributed as dist

    parts: list = [None] * world.size
    dist.all_gather_object(parts, mine)
    return {name: why for part in parts for name, why in part.items()}


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                      config: TrainConfig) -> torch.Tensor:
    """Cross-entropy (with label smoothing); with a teacher, (1 - w) CE + w T^2 KL(teacher_T || student_T)."""
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    if teacher_logits is None:
        return ce
    t = config.kd_temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - config.kd_weight) * ce + config.kd_weight * t * t * kl


@torch.no_grad()
def evaluate(model: nn.Module, source: Source, world: World, device: torch.device, batch: int = 128) -> Accuracy:
    """Top-1/top-5 of ``model`` (eval mode) on ``source``, each process taking every world-size-th image."""
    model.eval()
    shard = list(range(world.rank, source.count, world.size))
    part = Source(source.name, len(shard), lambda j: source.load(shard[j]), source.preprocessing, True,
                  source.fingerprint, source.num_classes)
    top1 = top5 = count = 0
    for chunk in batches(part, batch):
        x = torch.from_numpy(chunk.images).to(device).contiguous(memory_format=torch.channels_last)
        logits = model(x).float().cpu().numpy()
        top = np.argsort(-logits, axis=1)[:, :5]
        top1 += int((top[:, 0] == chunk.labels).sum())
        top5 += int((top == chunk.labels[:, None]).any(axis=1).sum())
        count += len(chunk.labels)
    top1, top5, count = all_sum([top1, top5, count], world, device)
    if count == 0:
        raise UlsamError(f"no usable evaluation images in {source.name}")
    return Accuracy(100.0 * top1 / count, 100.0 * top5 / count, int(count))


def _freeze_backbone(model: MobileNet, frozen: bool) -> None:
    """Hold every layer but the ULSAMs (and the classifier): new modules first learn to fit a pretrained
    backbone before it moves; its BatchNorm statistics stay those it was trained with meanwhile."""
    for module in model.features:
        if isinstance(module, ULSAM):
            continue
        module.requires_grad_(not frozen)
        if frozen:
            module.eval()
