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


@o.model_options
def bench(options: o.ModelOptions, model: o.ModelPath = None,
          export_dir: Annotated[Optional[Path], typer.Option(
              "--export", "-e", help="Export directory to time (its artifacts; with --model, missing formats are "
                                     "exported into it). Default: runs/<model name>.")] = None,
          vs: Vs = None,
          backend: Annotated[str, typer.Option(help="torch, onnxruntime, litert, executorch, trt (comma list) or all; "
                                                    "or ethos-u alone: Vela's estimate of the NPU file, not timed.")] = "all",
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
          npu: Annotated[Optional[str], typer.Option(
              "--npu", help="With --backend ethos-u: the Ethos-U configuration (default ethos-u55-128).")] = None,
          force: o.Unsafe = False, json_out: o.Json = False) -> None:
    """Time every artifact (exported if missing) and print one table; with --vs, per-backend ratios."""
    from ..bench.npu import NpuReport
    from ..bench.session import run_bench
    from ..render import report

    batches = _int_list(batch, "--batch", 1, 4096)
    if plot is not None and (plot.suffix.lower() != ".png" or plot.is_dir()):
        raise UlsamError(f"--plot {plot} must be a .png file path")
    with report.progress() as bar:
        task = bar.add_task("export", total=None)
        result = run_bench(model, options, export_dir, vs, backend, precision, threads, batches, warmup, runs, parity,
                           ops, force, on_step=lambda what: bar.update(task, description=what),
                           on_warning=lambda line: report.log(f"warning: {line}"), npu=npu)
    if isinstance(result, NpuReport):
        return report.print_json(result) if json_out else report.console.print(report.npu_table(result))
    if plot is not None:
        report.plot_bench(result, plot)
    if json_out:
        report.print_json({"rows": result.rows, "ratios": result.ratios, "ops": result.ops} if ops else result.rows)
    else:
        report.console.print(report.bench_table(result))
        if result.ratios:
            report.console.print(report.ratio_table(result))
        for profile in result.ops:
            report.console.print(report.ops_table(profile))
