"""Model commands: profile, build, train, evaluate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from ..errors import UlsamError


@o.model_options
def profile(options: o.ModelOptions, model: o.ModelPath = None,
            paper: Annotated[bool, typer.Option("--paper", help="Compare with every number of the paper's tables.")] = False,
            json_out: o.Json = False) -> None:
    """Per-layer params and MACs: the direct count and the paper's convention."""
    from .. import report
    from ..profile import paper_comparison, profile as run_profile

    if paper:
        checks = paper_comparison()
        report.print_json(checks) if json_out else report.console.print(report.paper_table(checks))
        return
    spec = o.spec_for_model(model, options)
    result = run_profile(spec)
    report.print_json(result) if json_out else report.console.print(report.profile_table(result))


@o.model_options
def build(out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .safetensors checkpoint.")],
          options: o.ModelOptions,
          from_checkpoint: Annotated[Optional[Path], typer.Option(
              "--from", help="Start from this checkpoint (.safetensors, .pth/.pt): ours, official ULSAM, torchvision "
                             "mobilenet_v2, timm mobilenetv2_*/mobilenetv1_*. Every backbone tensor that has a place "
                             "in the spec is kept; new ULSAMs (and a classifier for another class count) are "
                             "initialised. Arch and width are read from it.")] = None,
          seed: Annotated[int, typer.Option(help="Seed for random initialisation.")] = 0,
          json_out: o.Json = False) -> None:
    """Write a safetensors checkpoint of a spec: randomly initialised, or a pretrained backbone with ULSAM put in."""
    import json

    from .. import report
    from ..errors import InputFileError
    from ..nets.build import build_model, read_checkpoint, save_checkpoint, sha256_file
    from ..nets.surgery import source_fields, transplant

    if out.suffix != ".safetensors":
        raise InputFileError(f"--out {out} must end in .safetensors")
    if out.is_dir():
        raise InputFileError(f"--out {out} is a folder", "name a .safetensors file")
    transplanted, extra = None, {}
    if from_checkpoint is None:
        spec = options.spec()
        model = build_model(spec, seed=seed)
        prep = options.preprocessing(spec)
    else:
        checkpoint = read_checkpoint(from_checkpoint)
        spec = options.spec(source_fields(checkpoint))
        model, transplanted = transplant(checkpoint, spec, seed=seed)
        recorded = json.loads(checkpoint.metadata["preprocessing"]) if "preprocessing" in checkpoint.metadata else None
        prep = options.preprocessing(spec, recorded, checkpoint.layout.preprocess)
        extra["origin"] = (f"{from_checkpoint} ({checkpoint.layout.title} layout, "
                           f"sha256 {sha256_file(checkpoint.path)})")
    save_checkpoint(model, out, extra={"preprocessing": json.dumps(prep.to_dict()), **extra})
    summary = {"path": str(out), "spec": spec.to_dict(), "name": spec.name, "sha256": sha256_file(out),
               "params": sum(p.numel() for p in model.parameters()), "preprocessing": prep.to_dict(),
               "origin": extra.get("origin"), "transplant": transplanted}
    if json_out:
        report.print_json(summary)
        return
    if transplanted is not None:
        report.console.print(_transplant_table(transplanted))
    report.console.print(f"wrote {out} ({spec.name}, {summary['params']:,} params)")


def _transplant_table(result):
    """Per layer: what the checkpoint had, what the model has, and which tensors were loaded, dropped, new."""
    from .. import report

    def names(keys: list[str]) -> str:   # module names without the layer prefix and the parameter name
        modules = dict.fromkeys(k.split(".", 2)[-1].rsplit(".", 1)[0] if k.startswith("features.") else
                                k.rsplit(".", 1)[0] for k in keys)
        return f"{len(keys)} ({' '.join(modules)})" if keys else ""

    rows = [(r.layer, r.checkpoint, r.model, r.loaded, names(r.dropped), names(r.new)) for r in result.layers]
    table = report.table(f"{result.source} ({result.layout}) -> {result.spec}",
                         ["layer", "checkpoint", "model", "loaded", "dropped", "new"], rows,
                         caption=f"tensors: {result.loaded} loaded, {result.dropped} dropped, {result.new} new "
                                 "(names: --json)")
    for column in table.columns:
        column.justify = "right" if column.header == "loaded" else "left"
    return table


@o.model_options
def train(out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write (model.safetensors + README.md).")],
          options: o.ModelOptions,
          start_from: Annotated[Optional[Path], typer.Option(
              "--start-from", "--model", "-m", help="Fine-tune this checkpoint, e.g. one from `build --from` "
                                                    "(--model is the same option).")] = None,
          freeze_backbone_epochs: Annotated[int, typer.Option(
              "--freeze-backbone-epochs", min=0, max=1000, help="Train only the ULSAMs and the classifier for the "
              "first N epochs; the backbone keeps its weights and BatchNorm statistics meanwhile.")] = 0,
          data: Annotated[str, typer.Option(help="'digits' or 'fashion' (reference sets) or an ImageFolder DIR/<class>/*.")] = "digits",
          epochs: Annotated[int, typer.Option(min=1, max=1000)] = 30,
          batch_size: Annotated[int, typer.Option(min=2, max=4096)] = 64,
          lr: Annotated[float, typer.Option(min=1e-6, max=10.0)] = 0.05,
          schedule: Annotated[str, typer.Option(help="cosine or step")] = "cosine",
          shift: Annotated[Optional[int], typer.Option(min=0, max=64, help="Random shift augmentation, px (default: input size / 14).")] = None,
          hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Random horizontal flips (default: on for fashion and folders, off for digits).")] = None,
          seed: int = 0, json_out: o.Json = False) -> None:
    """Train a spec on the digits reference set (or an ImageFolder) and write a model folder with its card."""
    import shlex

    from .. import report
    from ..nets.build import checkpoint_file, sha256_file
    from ..train import TrainConfig, accuracy, predict, train as run_train, write_model_folder
    from ..workflow import checkpoint_metadata, training_data

    if schedule not in ("cosine", "step"):
        raise UlsamError(f"--schedule {schedule!r} is unknown", "use cosine or step")
    if out.exists() and not out.is_dir():
        raise UlsamError(f"--out {out} exists and is not a folder")
    net, train_set, test_set, dataset = training_data(data, start_from, options)
    from ..data.sets import REFERENCE_SETS

    reference = REFERENCE_SETS.get(dataset)
    hflip = (reference.HFLIP if reference else True) if hflip is None else hflip
    shift = round(net.spec.input_size / 14) if shift is None else shift
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed,
                         max_shift=shift, hflip=hflip, freeze_backbone_epochs=freeze_backbone_epochs)
    description = reference.describe(net.spec.input_size) if reference else f"the ImageFolder `{dataset}`"
    with report.progress() as bar:
        task = bar.add_task("train", total=epochs * ((train_set.count + batch_size - 1) // batch_size))
        result = run_train(net, train_set, config, test_set, on_step=lambda e, s, n, loss, acc: bar.update(
            task, advance=1, description=f"epoch {e}/{epochs} loss {loss:.3f} acc {acc:.1f}%"),
            on_epoch=lambda log: report.log(f"epoch {log.epoch}/{epochs}: loss {log.loss:.4f}, train top-1 "
                                            f"{log.train_top1:.2f} %, test top-1 {log.test_top1:.2f} %"))
    test = accuracy(predict(net, test_set.images), test_set.labels)
    command = "ulsam-deploy " + shlex.join(sys.argv[1:])
    origin = None
    if start_from is not None:
        before = checkpoint_metadata(start_from).get("origin")
        origin = (f"{start_from} (sha256 {sha256_file(checkpoint_file(start_from))})"
                  + (f", itself from {before}" if before else ""))
    write_model_folder(net, out, dataset, test_set.preprocessing.to_dict(), result, test, command, description,
                       origin=origin)
    summary = {"model": str(out), "spec": net.spec.to_dict(), "seconds": round(result.seconds, 1),
               "test_top1": test.top1, "test_top5": test.top5, "test_count": test.count}
    report.print_json(summary) if json_out else report.console.print(
        f"wrote {out}: test top-1 {test.top1:.2f} %, top-5 {test.top5:.2f} % ({result.seconds:.0f} s)")


def evaluate(model: Annotated[Path, typer.Option("--model", "-m", help="Model folder or checkpoint.")],
             data: Annotated[Optional[str], typer.Option(help="'digits', 'fashion', or a labelled ImageFolder; default: the model's own test set.")] = None,
             threads: Annotated[int, typer.Option("--threads", min=0, max=256, help="Torch threads (0 = default).")] = 0,
             json_out: o.Json = False) -> None:
    """Top-1/top-5 accuracy of the eager model on its test split (streamed: any number of images)."""
    from .. import report
    from ..data.preprocess import Preprocessing
    from ..data.sets import evaluation_source
    from ..workflow import evaluate_stream, model_preprocessing, reference_model

    net, meta = reference_model(model)
    source_name = data or meta.get("dataset")
    if not source_name:
        raise UlsamError("the model records no data set", "pass --data digits, --data fashion or --data DIR")
    source = evaluation_source(source_name, net.spec.input_size,
                               Preprocessing.from_dict(model_preprocessing(meta, net.spec)))
    if not source.labelled or source.num_classes not in (None, net.spec.num_classes):
        raise UlsamError(f"{source.name} has no labels for this {net.spec.num_classes}-class model",
                         "pass --data digits, --data fashion or a labelled ImageFolder")
    with report.progress() as bar:
        task = bar.add_task(f"evaluate {source.name}", total=source.count)
        top1, top5, count, stats = evaluate_stream(net, source, threads, on_batch=lambda n: bar.update(task, advance=n))
    result = {"model": str(model), "data": source.name, "top1": top1, "top5": top5, "count": count,
              "skipped": stats.skipped, "skipped_reasons": stats.skipped_reasons,
              "card_top1": float(meta["test_top1"]) if "test_top1" in meta else None}
    skipped = f"; {stats.skipped} skipped ({'; '.join(stats.skipped_reasons)})" if stats.skipped else ""
    report.print_json(result) if json_out else report.console.print(
        f"{model}: top-1 {top1:.2f} %, top-5 {top5:.2f} % on {count} images of {source.name}{skipped}")
