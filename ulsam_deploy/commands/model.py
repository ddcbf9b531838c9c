"""Model commands: profile, build, train, evaluate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from ..errors import UlsamError


def profile(arch: o.Arch = None, positions: o.Positions = None, groups: o.Groups = None, width: o.Width = None,
            num_classes: o.NumClasses = None, input_size: o.InputSize = None, model: o.ModelPath = None,
            paper: Annotated[bool, typer.Option("--paper", help="Compare with every number of the paper's tables.")] = False,
            json_out: o.Json = False) -> None:
    """Per-layer params and MACs: the direct count and the paper's convention."""
    from .. import report
    from ..profile import paper_comparison, profile as run_profile

    if paper:
        checks = paper_comparison()
        report.print_json(checks) if json_out else report.console.print(report.paper_table(checks))
        return
    spec = o.spec_for_model(model, arch, positions, groups, width, num_classes, input_size)
    result = run_profile(spec)
    report.print_json(result) if json_out else report.console.print(report.profile_table(result))


def build(out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .safetensors checkpoint.")],
          arch: o.Arch = None, positions: o.Positions = None, groups: o.Groups = None, width: o.Width = None,
          num_classes: o.NumClasses = None, input_size: o.InputSize = None,
          from_checkpoint: Annotated[Optional[Path], typer.Option(
              "--from", help="Convert this checkpoint (.pth/.pt, official SubSpace layout accepted).")] = None,
          seed: Annotated[int, typer.Option(help="Seed for random initialisation.")] = 0,
          json_out: o.Json = False) -> None:
    """Write a safetensors checkpoint of a spec: randomly initialised, or converted from another checkpoint."""
    from .. import report
    from ..errors import InputFileError
    from ..nets.build import build_model, load_model, save_checkpoint, sha256_file

    if out.suffix != ".safetensors":
        raise InputFileError(f"--out {out} must end in .safetensors")
    if out.is_dir():
        raise InputFileError(f"--out {out} is a folder", "name a .safetensors file")
    spec = o.spec_from_options(arch, positions, groups, width, num_classes, input_size)
    model = load_model(from_checkpoint, spec) if from_checkpoint else build_model(spec, seed=seed)
    save_checkpoint(model, out)
    summary = {"path": str(out), "spec": spec.to_dict(), "name": spec.name, "sha256": sha256_file(out),
               "params": sum(p.numel() for p in model.parameters())}
    if json_out:
        report.print_json(summary)
    else:
        report.console.print(f"wrote {out} ({spec.name}, {summary['params']:,} params)")


def train(out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write (model.safetensors + README.md).")],
          arch: o.Arch = None, positions: o.Positions = None, groups: o.Groups = None, width: o.Width = None,
          num_classes: o.NumClasses = None, input_size: o.InputSize = None,
          model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Start from this checkpoint (fine-tune).")] = None,
          data: Annotated[str, typer.Option(help="'digits' (reference set) or an ImageFolder DIR/<class>/*.")] = "digits",
          epochs: Annotated[int, typer.Option(min=1, max=1000)] = 30,
          batch_size: Annotated[int, typer.Option(min=2, max=4096)] = 64,
          lr: Annotated[float, typer.Option(min=1e-6, max=10.0)] = 0.05,
          schedule: Annotated[str, typer.Option(help="cosine or step")] = "cosine",
          seed: int = 0, json_out: o.Json = False) -> None:
    """Train a spec on the digits reference set (or an ImageFolder) and write a model folder with its card."""
    import shlex

    from .. import report
    from ..train import TrainConfig, accuracy, predict, train as run_train, write_model_folder
    from ..workflow import training_data

    if schedule not in ("cosine", "step"):
        raise UlsamError(f"--schedule {schedule!r} is unknown", "use cosine or step")
    if out.exists() and not out.is_dir():
        raise UlsamError(f"--out {out} exists and is not a folder")
    net, train_set, test_set, dataset = training_data(data, model, arch, positions, groups, width, num_classes, input_size)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed)
    with report.progress() as bar:
        task = bar.add_task("train", total=epochs * ((train_set.count + batch_size - 1) // batch_size))
        result = run_train(net, train_set, config, test_set, on_step=lambda e, s, n, loss, acc: bar.update(
            task, advance=1, description=f"epoch {e}/{epochs} loss {loss:.3f} acc {acc:.1f}%"),
            on_epoch=lambda log: report.log(f"epoch {log.epoch}/{epochs}: loss {log.loss:.4f}, train top-1 "
                                            f"{log.train_top1:.2f} %, test top-1 {log.test_top1:.2f} %"))
    test = accuracy(predict(net, test_set.images), test_set.labels)
    command = "ulsam-deploy " + shlex.join(sys.argv[1:])
    write_model_folder(net, out, dataset, test_set.preprocessing.to_dict(), result, test, command)
    summary = {"model": str(out), "spec": net.spec.to_dict(), "seconds": round(result.seconds, 1),
               "test_top1": test.top1, "test_top5": test.top5, "test_count": test.count}
    report.print_json(summary) if json_out else report.console.print(
        f"wrote {out}: test top-1 {test.top1:.2f} %, top-5 {test.top5:.2f} % ({result.seconds:.0f} s)")


def evaluate(model: Annotated[Path, typer.Option("--model", "-m", help="Model folder or checkpoint.")],
             data: Annotated[Optional[str], typer.Option(help="'digits', or a labelled ImageFolder; default: the model's own test set.")] = None,
             json_out: o.Json = False) -> None:
    """Top-1/top-5 accuracy of the eager model on its test split."""
    from .. import report
    from ..train import accuracy, predict
    from ..workflow import evaluation_data, reference_model

    net, meta = reference_model(model)
    test_set = evaluation_data(data or meta.get("dataset"), net.spec)
    if test_set.labels is None:
        raise UlsamError(f"{test_set.source} has no labels", "pass --data digits or a labelled ImageFolder")
    acc = accuracy(predict(net, test_set.images), test_set.labels)
    result = {"model": str(model), "data": test_set.source, "top1": acc.top1, "top5": acc.top5, "count": acc.count,
              "card_top1": float(meta["test_top1"]) if "test_top1" in meta else None}
    report.print_json(result) if json_out else report.console.print(
        f"{model}: top-1 {acc.top1:.2f} %, top-5 {acc.top5:.2f} % on {acc.count} images of {test_set.source}")
