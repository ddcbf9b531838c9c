"""``ulsam-deploy bench``: latency, throughput, size, MACs and parity of every backend side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from ..errors import UlsamError

Vs = Annotated[Optional[str], typer.Option(
    "--vs", help="Second model, timed interleaved with the first: a model folder/checkpoint, or ARCH[@POSITIONS] "
                 "with the first model's groups, width, classes and input size (e.g. 'mv2', 'mv2@17:1').")]


def _int_list(text: str, flag: str, low: int, high: int) -> list[int]:
    values = []
    for token in text.split(","):
        token = token.strip()
        if not token.isascii() or not token.isdigit() or not (low <= int(token) <= high):
            raise UlsamError(f"{flag} {text!r}: {token!r} is not a whole number in {low}..{high}")
        values.append(int(token))
    return values


def _choices(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(allowed) if text.strip().lower() == "all" else tuple(t.strip().lower() for t in text.split(","))
    for token in chosen:
        if token not in allowed:
            raise UlsamError(f"{flag} {token!r} is unknown", f"choose from {', '.join(allowed)} or all")
    return chosen


def _vs_reference(vs: str, primary_spec) -> tuple[Path | None, o.ModelOptions]:
    path = Path(vs)
    if path.exists():
        return path, o.ModelOptions()
    arch, _, positions = vs.partition("@")
    same_arch = arch.strip().lower() == primary_spec.arch   # another arch keeps its own default activation
    return None, o.ModelOptions(arch, positions, primary_spec.groups, primary_spec.width, primary_spec.num_classes,
                                primary_spec.input_size, primary_spec.activation if same_arch else None)


def _subject_manifest(model, options, formats, export_dir):
    """An export directory passed as such is read as it is; a model is exported (into ``export_dir`` if given)."""
    from ..store.manifest import MANIFEST, Manifest
    from ..workflow import export_for

    if model is not None and (Path(model) / MANIFEST).is_file():
        export_dir, model = Path(model), None
    if export_dir is not None and model is None and options == o.ModelOptions():
        return Manifest.load(export_dir)
    from ..export import parse_formats
    from ..export.options import ExportOptions

    # with their dependencies (the TFLite formats are converted from the ONNX, which --backend litert does not name)
    chosen = parse_formats(",".join(formats)) if formats else ("onnx",)
    return export_for(model, options, ExportOptions(chosen, export_dir))[1]


@o.model_options
def bench(options: o.ModelOptions, model: o.ModelPath = None,
          export_dir: Annotated[Optional[Path], typer.Option(
              "--export", "-e", help="Export directory to time (its artifacts; with --model, missing formats are "
                                     "exported into it). Default: runs/<model name>.")] = None,
          vs: Vs = None,
          backend: Annotated[str, typer.Option(help="torch, onnxruntime, litert, executorch, trt (comma list) or all.")] = "all",
          precision: Annotated[str, typer.Option(help="fp32, fp16, int8 (comma list) or all.")] = "all",
          threads: Annotated[int, typer.Option(min=1, max=256, help="Threads per runtime.")] = os.cpu_count() or 1,
          batch: Annotated[str, typer.Option(help="Batch sizes, comma list.")] = "1",
          warmup: Annotated[int, typer.Option(min=0, max=10_000)] = 10,
          runs: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
          parity: Annotated[bool, typer.Option(help="Also run parity for the agreement columns.")] = True,
          plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of p50 latency (p90 whiskers).")] = None,
          ops: Annotated[bool, typer.Option(
              "--ops", help="Also show where the time goes: kernel time by op type (ONNX Runtime's profiler) and "
                            "the delegate split (TFLite, ExecuTorch) of every artifact timed.")] = False,
          force: o.Unsafe = False, json_out: o.Json = False) -> None:
    """Time every artifact (exported if missing) and print one table; with --vs, per-backend ratios."""
    from ..render import report
    import contextlib

    from ..store.manifest import locked
    from ..model.profile import count_layers
    from ..bench.suite import BACKENDS, Subject, encoding_safe_here, formats_for, new_report, run_suite
    from ..runtime.isa import isa_label
    from ..workflow import parity_for

    backends = _choices(backend, "--backend", BACKENDS)
    precisions = _choices(precision, "--precision", ("fp32", "fp16", "int8"))
    batches = _int_list(batch, "--batch", 1, 4096)
    if plot is not None and (plot.suffix.lower() != ".png" or plot.is_dir()):
        raise UlsamError(f"--plot {plot} must be a .png file path")
    refs = [(model, options)]
    skipped: list[str] = []
    formats = formats_for(backends, precisions, skipped, force)
    for name in [f for f in formats if not encoding_safe_here(f)]:
        report.log(f"warning: {name} is timed with --force on a CPU its INT8 encoding is not exact on "
                   f"({isa_label()}): its numbers are this CPU's kernels, not the artifact's meaning")
    keys = (["torch"] if "torch" in backends and "fp32" in precisions else []) + formats
    if not keys:
        raise UlsamError("no artifact matches --backend/--precision", "; ".join(skipped) or None)
    subjects, parities = [], []
    with report.progress() as bar:
        task = bar.add_task("export", total=None)
        for index in range(2 if vs else 1):
            if index == 1:
                refs.append(_vs_reference(vs, subjects[0].manifest.spec))
            ref_model, ref_options = refs[index]
            bar.update(task, description=f"export {ref_model or ref_options.arch}")
            manifest = _subject_manifest(ref_model, ref_options, formats, export_dir if index == 0 else None)
            rows = count_layers(manifest.spec)
            subjects.append(Subject(manifest, sum(r.params for r in rows), sum(r.macs for r in rows)))
            if parity and formats:
                bar.update(task, description=f"parity {manifest.data['model']}")
                parities.append({r.artifact: r for r in parity_for(manifest, formats, None, threads, {}, force=force)})
            else:
                parities.append({})
        for key in [k for k in keys if k != "torch"]:
            holders = [s.name for s in subjects if key not in s.manifest.artifacts]
            if holders:
                keys.remove(key)
                skipped.append(f"{key}: not in the export directory of {', '.join(holders)}")
        result = new_report(subjects, threads)
        result.skipped = skipped
        with contextlib.ExitStack() as held:   # an export running meanwhile cannot swap an artifact being timed
            for subject in subjects:
                held.enter_context(locked(subject.manifest.directory, "read"))
            run_suite(subjects, keys, threads, batches, warmup, runs, parities, result,
                      subjects[0].manifest.spec.input_size,
                      on_step=lambda what: bar.update(task, description=f"timing {what}"), force=force)
        profiles = []
        if ops:
            from ..bench.ops import profile_ops

            bar.update(task, description="profiling ops")
            profiles = profile_ops(subjects, [k for k in keys if k != "torch"], threads, runs)
    if plot is not None:
        report.plot_bench(result, plot)
    if json_out:
        report.print_json({"rows": result.rows, "ratios": result.ratios, "ops": profiles} if ops else result.rows)
    else:
        report.console.print(report.bench_table(result))
        if result.ratios:
            report.console.print(report.ratio_table(result))
        for profile in profiles:
            report.console.print(report.ops_table(profile))
