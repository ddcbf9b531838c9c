"""``ulsam-deploy train``: fine-tune or train from scratch, in one process or several (torchrun)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import Interrupted
from . import options as o

@o.model_options
def train(ctx: typer.Context, out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write (model.safetensors + README.md).")],
          options: o.ModelOptions,
          start_from: Annotated[Optional[Path], typer.Option(
              "--start-from", "--model", "-m", help="Fine-tune this checkpoint, e.g. one from `build --from` "
                                                    "(--model is the same option).")] = None,
          freeze_backbone_epochs: Annotated[int, typer.Option(
              "--freeze-backbone-epochs", min=0, max=1000, help="Train only the ULSAMs and the classifier for the "
              "first N epochs; the backbone keeps its weights and BatchNorm statistics meanwhile.")] = 0,
          data: Annotated[str, typer.Option(help="'digits' or 'fashion' (reference sets) or an ImageFolder DIR/<class>/*.")] = "digits",
          val: Annotated[Optional[Path], typer.Option(
              "--val", help="ImageFolder to evaluate on (same classes). Default: 10 % of each class held out of --data.")] = None,
          epochs: Annotated[int, typer.Option(min=1, max=1000)] = 30,
          batch_size: Annotated[int, typer.Option(min=2, max=4096, help="Per process; global = this x processes.")] = 64,
          lr: Annotated[float, typer.Option(min=1e-6, max=10.0)] = 0.05,
          schedule: Annotated[str, typer.Option(help="cosine or step")] = "cosine",
          label_smoothing: Annotated[float, typer.Option("--label-smoothing", min=0.0, max=0.5)] = 0.0,
          shift: Annotated[Optional[int], typer.Option(min=0, max=64, help="Reference sets: random shift, px (default: input size / 14).")] = None,
          hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Random horizontal flips (default: on for fashion and folders, off for digits).")] = None,
          workers: Annotated[int, typer.Option("--workers", min=0, max=64, help="DataLoader worker processes per training process.")] = 2,
          max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after N optimiser steps.")] = None,
          device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
          amp: Annotated[str, typer.Option(help="Mixed precision: off, bf16 or fp16 (with a gradient scaler).")] = "off",
          nproc: Annotated[int, typer.Option("--nproc", min=1, max=1024, help="Local processes (torch.distributed.run).")] = 1,
          sync_bn: Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm across processes (CUDA only).")] = False,
          teacher: Annotated[Optional[Path], typer.Option(
              "--teacher", help="Distil from this checkpoint (any layout `build --from` reads).")] = None,
          kd_weight: Annotated[float, typer.Option("--kd-weight", min=0.0, max=1.0)] = 0.5,
          kd_temperature: Annotated[float, typer.Option("--kd-temperature", min=0.1, max=100.0)] = 4.0,
          qat: Annotated[bool, typer.Option(
              "--qat", help="Quantisation-aware fine-tuning of the --start-from model (INT8 simulated as the "
                            "full-integer TFLite formats quantise): the repair path for tflite-int8-npu/-mcu.")] = False,
          resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (same arguments).")] = False,
          force: Annotated[bool, typer.Option("--force", help="Replace the model already in --out.")] = False,
          allow_large: o.AllowLarge = False,
          seed: int = 0, json_out: o.Json = False) -> None:
    """Train on a reference set or an ImageFolder (streamed), on CPU or GPU, in one or several processes."""
    from ..training.distributed import check_nproc, launch, launched
    from ..training.run import validate_training
    from ..training.train import TrainConfig

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed,
                         label_smoothing=label_smoothing, freeze_backbone_epochs=freeze_backbone_epochs,
                         max_steps=max_steps, workers=workers, amp=amp, sync_bn=sync_bn, kd_weight=kd_weight,
                         kd_temperature=kd_temperature, qat=qat)
    chosen = validate_training(config, out, teacher, val, device, sync_bn, force, resume, start_from)
    check_nproc(nproc, chosen)
    argv = _invoked_args(ctx)
    if nproc > 1 and not launched():
        # torchrun's own parser would take --nproc as its --nproc-per-node, so the processes get the command
        # without it; the command as typed reaches them in the environment, for the card and the resume line
        os.environ[COMMAND_ENV] = shlex.join(argv)
        raise typer.Exit(launch(nproc, _without_nproc(argv), lambda: _saved(out, epochs, _resume_command(argv, resume))))
    if launched() and COMMAND_ENV in os.environ:
        from ..training.lifetime import die_with_launcher

        if not die_with_launcher():
            raise Interrupted("the launcher of this training process is gone; nothing was trained")
        argv = shlex.split(os.environ[COMMAND_ENV])
    from ..training.run import RunRequest, run_training

    request = RunRequest(out, options, start_from, data, val, shift, hflip, config, device, teacher, resume,
                         allow_large=allow_large, command="ulsam-deploy " + shlex.join(argv), resume_command=_resume_command(argv, resume))
    summary = run_training(request)
    if summary is None:         # not rank 0
        return
    from ..render import report

    if json_out:
        report.print_json(summary)
    else:
        report.console.print(f"wrote {out}: test top-1 {summary['test_top1']:.2f} %, top-5 {summary['test_top5']:.2f} % "
                             f"({summary['seconds']:.0f} s, {summary['images_per_s']:.1f} images/s, "
                             f"{summary['world_size']} process(es) on {summary['device']})")


COMMAND_ENV = "ULSAM_DEPLOY_TRAIN_COMMAND"


def _invoked_args(ctx: typer.Context) -> list[str]:
    """The command line as given (``ulsam-deploy`` excluded), to relaunch it and to record it in the card."""
    return list(getattr(ctx.find_root().command, "argv", sys.argv[1:]))


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def _saved(out: Path, epochs: int, resume_command: str) -> str:
    from ..training.state import saved_epoch

    epoch = saved_epoch(out)
    return f"epoch {epoch} of {epochs} is saved in {out} ({resume_command})" if epoch else "no epoch had finished"


def _resume_command(argv: list[str], resume: bool) -> str:
    args = [a for a in argv if a != "--force"] + ([] if resume else ["--resume"])
    return "resume with: ulsam-deploy " + shlex.join(args)
