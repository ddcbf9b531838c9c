"""One training process from start to model folder: device, place in the world, data, model, teacher,
the loop, and (rank 0 alone) the lock, progress, training state and the written model."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UlsamError
from ..model.options import ModelOptions
from .distributed import World, join, launched, leave, lost_peer
from .state import STATE
from .train import Hooks, TrainConfig, train


@dataclass(frozen=True)
class RunRequest:
    out: Path
    options: ModelOptions
    start_from: Path | None
    data: str
    val: Path | None
    shift: int | None
    hflip: bool | None
    config: TrainConfig
    device: str = "auto"
    teacher: Path | None = None
    resume: bool = False
    allow_large: bool = False
    command: str = ""
    resume_command: str = ""


def choose_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a missing device is refused."""
    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UlsamError(f"--device {name!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UlsamError(f"--device {name!r}: only cpu and cuda are supported", "use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UlsamError(f"--device {name}: no CUDA device is visible", "use --device cpu (or auto)")
        if (device.index or 0) >= count:
            raise UlsamError(f"--device {name}: only {count} CUDA device(s) are visible", f"use cuda:0..cuda:{count - 1}")
    return device


AMP_MODES = ("off", "bf16", "fp16")
_RANGES = {"epochs": (1, 1000), "batch_size": (2, 4096), "lr": (1e-6, 10.0), "label_smoothing": (0.0, 0.5),
           "workers": (0, 64), "max_steps": (1, 10 ** 12), "freeze_backbone_epochs": (0, 1000),
           "kd_weight": (0.0, 1.0), "kd_temperature": (0.1, 100.0), "seed": (0, 2 ** 63 - 1)}


def validate_training(config: TrainConfig, out: Path, teacher: Path | None, val: Path | None, device: str,
                      sync_bn: bool, force: bool, resume: bool, start_from: Path | None = None) -> torch.device:
    """Every check of a training request that needs no data or model, before anything starts; the device."""
    from .state import check_output

    for name, (low, high) in _RANGES.items():
        value = getattr(config, name)
        whole = isinstance(low, int) and isinstance(high, int)
        if value is None and name == "max_steps":
            continue
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not low <= value <= high:
            raise UlsamError(f"{name.replace('_', '-')} {value!r} is out of range", f"use a value in [{low}, {high}]")
    if config.schedule not in ("cosine", "step"):
        raise UlsamError(f"--schedule {config.schedule!r} is unknown", "use cosine or step")
    if config.amp not in AMP_MODES:
        raise UlsamError(f"--amp {config.amp!r} is unknown", f"use {', '.join(AMP_MODES)}")
    if teacher is not None and not teacher.exists():
        raise UlsamError(f"--teacher {teacher} does not exist")
    if val is not None and not val.is_dir():
        raise UlsamError(f"--val {val} is not a folder")
    if config.qat:
        _check_qat(config, start_from)
    chosen = choose_device(device)
    if config.amp == "fp16" and chosen.type == "cpu":
        raise UlsamError("--amp fp16 needs a CUDA device", "use --amp bf16 on CPU, or --device cuda")
    if sync_bn and chosen.type != "cuda":
        raise UlsamError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel)",
                         "drop it: on CPU the BatchNorm statistics are averaged over the processes after each epoch")
    check_output(out, force, resume)
    return chosen


def _check_qat(config: TrainConfig, start_from: Path | None) -> None:
    from ..extras import require

    if start_from is None:
        raise UlsamError("--qat fine-tunes a trained model, and no --start-from was given",
                         "train the model first, then: ulsam-deploy train --qat --start-from MODEL ...")
    if config.amp != "off":
        raise UlsamError("--qat simulates INT8 in float32; it does not combine with --amp", "drop --amp")
    if config.freeze_backbone_epochs:
        raise UlsamError("--qat fine-tunes every layer; it does not combine with --freeze-backbone-epochs",
                         "drop --freeze-backbone-epochs")
    require("executorch", "--qat (the XNNPACK quantizer of ExecuTorch)")


def _process_device(chosen: torch.device) -> torch.device:
    """Under torchrun on CUDA each process takes the GPU of its local rank."""
    if chosen.type == "cuda" and launched():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return chosen


def run_training(request: RunRequest, quiet: bool = False) -> dict | None:
    """Train as ``request`` asks; rank 0 returns the summary (``--json``), other ranks None. ``quiet``: no
    progress and no per-epoch lines (the Python API's default)."""
    from ..workflow import teacher_model, training_setup
    from .card import check_writable
    from .state import folder_lock

    device = _process_device(choose_device(request.device))
    world = join(device)
    try:
        # everything that can refuse the input comes before the first write (the folder and its lock)
        model, data = training_setup(request.data, request.val, request.start_from, request.options,
                                     request.shift, request.hflip, request.config.seed,
                                     allow_large=request.allow_large)
        teacher = teacher_model(request.teacher, model.spec) if request.teacher is not None else None
        sources = _sources(request)
        check_writable(model, data, request.config, *sources)
        net = model
        if request.config.qat:
            from .qat import prepare

            size = model.spec.input_size
            net = prepare(model, torch.zeros(2, 3, size, size))
        with folder_lock(request.out) if world.main else contextlib.nullcontext():
            with _progress(world, request.config, data, quiet) as hooks:
                try:
                    result = train(net, data, request.config, request.out, world, device, teacher, request.resume,
                                   hooks, request.resume_command)
                except (RuntimeError, OSError) as exc:     # a collective with a process that died
                    lost = lost_peer(exc, world)
                    if lost is None:
                        raise
                    raise lost from None
            if net is not model:    # the float weights trained under simulated INT8, evaluated as saved
                from .train import evaluate

                net.write_back(model)
                result.final = evaluate(model, data.evaluation, world, device, request.config.batch_size * 2)
            if not world.main:
                return None
            return _finish(model, data, result, request, *sources)
    finally:
        leave()


def _sources(request: RunRequest) -> tuple[str | None, str | None]:
    """Where the initial weights and the teacher come from, as the model's metadata records them."""
    from ..nets.build import checkpoint_file, sha256_file
    from ..workflow import checkpoint_metadata

    origin = None
    if request.start_from is not None:
        before = checkpoint_metadata(request.start_from).get("origin")
        origin = (f"{request.start_from} (sha256 {sha256_file(checkpoint_file(request.start_from))})"
                  + (f", itself from {before}" if before else ""))
    teacher = (f"{request.teacher} (sha256 {sha256_file(checkpoint_file(request.teacher))})"
               if request.teacher is not None else None)
    return origin, teacher


def _finish(model, data, result, request: RunRequest, origin: str | None, teacher: str | None) -> dict:
    from .card import write_model_folder

    final = result.final
    write_model_folder(model, request.out, data, result, final, request.command, origin, teacher)
    (request.out / STATE).unlink(missing_ok=True)     # finished: the model folder is the result
    trained = sum(log.images for log in result.history)
    waited = sum(log.data_wait_s for log in result.history)
    return {"model": str(request.out), "spec": model.spec.to_dict(), "seconds": round(result.seconds, 1),
            "test_top1": final.top1, "test_top5": final.top5, "test_count": final.count,
            "evaluated_on": data.evaluation_note, "world_size": result.world_size, "device": result.device,
            "amp": request.config.amp, "steps": result.steps, "images_per_s": trained / max(result.seconds, 1e-9),
            "data_wait_s": round(waited, 2), "resumed_from_epoch": result.resumed_from_epoch,
            "skipped_at_scan": len(data.extra.get("scan_skipped", [])),
            "unreadable_reads": sum(log.skipped for log in result.history),
            "recipe": asdict(data.recipe), "history": [asdict(log) for log in result.history]}


@contextlib.contextmanager
def _progress(world: World, config: TrainConfig, data, quiet: bool = False):
    """Rich progress and one line per epoch, on rank 0 only."""
    if not world.main or quiet:
        yield Hooks()
        return
    from ..render import report

    with report.progress() as bar:
        task = bar.add_task("train", total=None)

        def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
            bar.update(task, completed=step, total=steps, description=f"epoch {epoch}/{config.epochs} loss {loss:.3f}")

        def on_epoch(log) -> None:
            report.log(f"epoch {log.epoch}/{config.epochs}: loss {log.loss:.4f}, train top-1 {log.train_top1:.2f} %, "
                       f"test top-1 {log.test_top1:.2f} %, {log.images_per_s:.1f} images/s "
                       f"(data wait {log.data_wait_s:.1f} of {log.seconds:.1f} s)")

        yield Hooks(on_step, on_epoch)
