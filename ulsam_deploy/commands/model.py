"""Model commands: profile, build, train, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from ..errors import UlsamError


@o.model_options
def profile(options: o.ModelOptions, model: o.ModelPath = None,
            paper: Annotated[bool, typer.Option("--paper", help="Compare with every number of the paper's tables.")] = False,
            json_out: o.Json = False) -> None:
    """Per-layer params and MACs: the direct count and the paper's convention."""
    from ..render import report
    from ..model.profile import paper_comparison, profile as run_profile
    from ..workflow import spec_for_model

    if paper:
        checks = paper_comparison()
        report.print_json(checks) if json_out else report.console.print(report.paper_table(checks))
        return
    spec = spec_for_model(model, options)
    result = run_profile(spec)
    report.print_json(result) if json_out else report.console.print(report.profile_table(result))


@o.model_options
def build(out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .safetensors checkpoint.")],
          options: o.ModelOptions,
          from_checkpoint: Annotated[Optional[Path], typer.Option(
              "--from", help="Start from this checkpoint (.safetensors, .pth/.pt): ours, official ULSAM, torchvision "
                             "mobilenet_v2, timm mobilenetv2_*/mobilenetv1_*. Every backbone tensor that has a place "
                             "in the spec is kept (one missing is refused); new ULSAMs (and a classifier for another "
                             "class count, or for --num-classes when it has none) are initialised. Arch and width "
                             "are read from it.")] = None,
          seed: Annotated[int, typer.Option(help="Seed for random initialisation.")] = 0,
          allow_large: o.AllowLarge = False,
          force: Annotated[bool, typer.Option("--force", help="Replace the checkpoint already at --out.")] = False,
          json_out: o.Json = False) -> None:
    """Write a safetensors checkpoint of a spec: randomly initialised, or a pretrained backbone with ULSAM put in."""
    import json

    from ..render import report
    from ..errors import InputFileError, printable
    from ..nets.build import build_model, check_model_size, read_checkpoint, save_checkpoint, sha256_file
    from ..nets.surgery import source_fields, transplant

    if out.suffix != ".safetensors":
        raise InputFileError(f"--out {out} must end in .safetensors")
    if out.is_dir():
        raise InputFileError(f"--out {out} is a folder", "name a .safetensors file")
    if out.exists() and not force:
        raise InputFileError(f"--out {out} already exists", "choose another file, or pass --force to replace it")
    transplanted, extra = None, {}
    if from_checkpoint is None:
        spec = options.spec()
        check_model_size(spec, allow_large=allow_large)
        model = build_model(spec, seed=seed)
        prep = options.preprocessing(spec)
    else:
        checkpoint = read_checkpoint(from_checkpoint)
        spec = options.spec(source_fields(checkpoint))
        check_model_size(spec, allow_large=allow_large)
        model, transplanted = transplant(checkpoint, spec, seed=seed, classes_asked=options.num_classes is not None)
        recorded = checkpoint.metadata.preprocessing_dict() if checkpoint.metadata else None
        prep = options.preprocessing(spec, recorded, checkpoint.layout.preprocess)
        extra["origin"] = printable(f"{from_checkpoint} ({checkpoint.layout.title} layout, "
                                    f"sha256 {sha256_file(checkpoint.path)})")
        names = checkpoint.metadata.class_names if checkpoint.metadata else None
        if names and len(names) == spec.num_classes:   # the classifier kept: its labels too
            extra["class_names"] = json.dumps(list(names), ensure_ascii=False)
    save_checkpoint(model, out, extra={"preprocessing": json.dumps(prep.to_dict()), **extra})
    summary = {"path": printable(str(out)), "spec": spec.to_dict(), "name": spec.name, "sha256": sha256_file(out),
               "params": sum(p.numel() for p in model.parameters()), "preprocessing": prep.to_dict(),
               "origin": extra.get("origin"), "transplant": transplanted}
    if json_out:
        report.print_json(summary)
        return
    if transplanted is not None:
        report.console.print(_transplant_table(transplanted))
    report.console.print(f"wrote {summary['path']} ({spec.name}, {summary['params']:,} params)", markup=False)


def _transplant_table(result):
    """Per layer: what the checkpoint had, what the model has, and which tensors were loaded, dropped, new."""
    from ..render import report

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


def evaluate(model: Annotated[Path, typer.Option("--model", "-m", help="Model folder or checkpoint.")],
             data: Annotated[Optional[str], typer.Option(help="'digits', 'fashion', or a labelled ImageFolder; default: the model's own test set.")] = None,
             threads: Annotated[int, typer.Option("--threads", min=0, max=256, help="Torch threads (0 = default).")] = 0,
             json_out: o.Json = False) -> None:
    """Top-1/top-5 accuracy of the eager model on its test split (streamed: any number of images)."""
    from ..render import report
    from ..data.preprocess import Preprocessing
    from ..data.sets import evaluation_source, reference_set
    from ..errors import printable
    from ..workflow import evaluate_stream, model_preprocessing, reference_model

    net, meta = reference_model(model)
    recorded = meta.dataset if meta else None
    source_name = data or reference_set(recorded)
    if not source_name:
        trained = f" (it was trained on {printable(recorded)!r}, which a checkpoint cannot make the tool read)" \
            if recorded else ""
        raise UlsamError(f"the model records no reference data set{trained}",
                         "pass --data digits, --data fashion or --data DIR")
    source = evaluation_source(source_name, net.spec.input_size,
                               Preprocessing.from_dict(model_preprocessing(meta, net.spec)))
    if not source.labelled or source.num_classes not in (None, net.spec.num_classes):
        raise UlsamError(f"{source.name} has no labels for this {net.spec.num_classes}-class model",
                         "pass --data digits, --data fashion or a labelled ImageFolder")
    with report.progress() as bar:
        task = bar.add_task(f"evaluate {source.name}", total=source.count)
        top1, top5, count, stats = evaluate_stream(net, source, threads, on_batch=lambda n: bar.update(task, advance=n))
    result = {"model": printable(str(model)), "data": source.name, "top1": top1, "top5": top5, "count": count,
              "skipped": stats.skipped, "skipped_reasons": stats.skipped_reasons,
              "card_top1": meta.test_top1 if meta else None}
    skipped = f"; {stats.skipped} skipped ({'; '.join(stats.skipped_reasons)})" if stats.skipped else ""
    report.print_json(result) if json_out else report.console.print(
        f"{result['model']}: top-1 {top1:.2f} %, top-5 {top5:.2f} % on {count} images of {source.name}{skipped}",
        markup=False)
