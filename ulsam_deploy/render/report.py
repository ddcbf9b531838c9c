"""Render result dataclasses: a Rich table on a terminal, JSON under --json. Library code never prints."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import PurePath
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import printable

# Off a terminal (pipes, CI logs) Rich would assume 80 columns and truncate; give tables room.
console = Console(width=None if sys.stdout.isatty() else 160)


def log(message: str) -> None:
    """A status line on stderr (never mixed into --json output on stdout)."""
    print(message, file=sys.stderr, flush=True)


def progress():
    """A transient progress bar on stderr (hidden when stderr is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values; strict JSON has no NaN or infinity, so a non-finite number is written as the
    string "NaN", "Infinity" or "-Infinity" (it must show, not vanish), and text is made printable."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, PurePath):
        return printable(str(obj))
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(to_jsonable(obj), indent=2, allow_nan=False))


def millions(value: float) -> str:
    return f"{value / 1e6:,.3f}M"


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]], caption: str | None = None) -> Table:
    """A Rich table; its text is shown as it is (a file named ``[/b].png`` is no markup), printable."""
    title, caption = _plain(title), None if caption is None else _plain(caption)
    out = Table(title=title, caption=caption, header_style="bold")
    for name in columns:
        out.add_column(name, justify="left" if name in ("layer", "type", "model", "positions", "artifact",
                                                        "backend", "metric", "status", "verified on") else "right")
    for row in rows:
        out.add_row(*[_plain(cell) for cell in row])
    return out


def _plain(value: Any) -> str:
    return escape(printable(str(value)))


def profile_table(prof) -> Table:
    rows = [(r.layer, r.type, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}") for r in prof.layers]
    rows.append(("total", "direct count", "", f"{prof.params:,}", f"{prof.macs:,}"))
    rows.append(("total", f"paper convention ({prof.paper_base} base)", "",
                 f"{round(prof.paper_params):,}", f"{round(prof.paper_macs):,}"))
    title = (f"{prof.arch.upper()} width {prof.width:g}, ULSAM at [{prof.positions or '-'}] g={prof.groups}, "
             f"{prof.num_classes} classes, {prof.input_size}x{prof.input_size}")
    return table(title, ("layer", "type", "output", "params", "MACs"), rows)


def paper_table(checks) -> Table:
    rows = [(c.table, c.model, c.positions, c.metric, millions(c.paper), millions(c.ours),
             f"{c.rel_error * 100:+.2f}%", "ok" if c.within else "OUT") for c in checks]
    inside = sum(c.within for c in checks)
    return table("Paper tables vs our count (paper convention)",
                 ("table", "model", "positions", "metric", "paper", "ours", "error", "status"), rows,
                 caption=f"{inside} of {len(checks)} within 1 %")


def export_table(result) -> Table:
    rows = [(a.format, a.file, a.precision, a.backend, f"{a.size_mb:.2f}", f"{a.seconds:.1f}", a.status)
            for a in result.artifacts]
    calib = result.calibration
    caption = f"total {result.seconds:.1f} s" + (f"; calibration: {calib['source']}, {calib['count']} samples, "
                                                 f"{calib['method']}" if calib else "")
    return table(f"Export of {result.model} -> {result.directory}",
                 ("format", "file", "precision", "backend", "MB", "seconds", "status"), rows, caption=caption)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _parity_cells(r) -> tuple:
    return (r.artifact, r.backend, r.precision, _pct(r.top1_agreement), _pct(r.top5_agreement), _pct(r.accuracy),
            "-" if r.accuracy_delta is None else f"{r.accuracy_delta:+.2f}", f"{r.cosine_mean:.6f}",
            f"{r.cosine_min:.6f}", f"{r.max_abs:.2e}", f"{r.mean_abs:.2e}")


PARITY_COLUMNS = ("artifact", "backend", "precision", "top-1 agr %", "top-5 agr %", "acc %", "acc delta",
                  "cos mean", "cos min", "max abs", "mean abs")


def _status(r) -> str:
    return "pass" if r.passed else "FAIL: " + "; ".join(r.breaches)


def parity_table(run) -> Table:
    """A :class:`~ulsam_deploy.verify.run.ParityRun`: one row per artifact, missing ones as FAIL rows; a column
    names where each artifact was verified (the manifest's ``verified_on``) once any was."""
    verified = any(r.verified_on for r in run.results)
    rows = [_parity_cells(r) + (_status(r),) + (("; ".join(r.verified_on) or "-",) if verified else ())
            for r in run.results]
    rows += [(name,) + ("-",) * 10 + ("FAIL: missing (not built)",) + (("-",) if verified else ())
             for name in run.missing]
    count = run.results[0].count if run.results else 0
    skipped = (f", {run.skipped} skipped: " + "; ".join(run.skipped_reasons)
               + (" ..." if run.skipped > len(run.skipped_reasons) else "")) if run.skipped else ""
    return table(f"Parity vs eager fp32 - {run.directory} - {run.data} ({count} images{skipped})",
                 PARITY_COLUMNS + ("status",) + (("verified on",) if verified else ()), rows, caption=_times(run.times))


def device_table(run) -> Table:
    """A :class:`~ulsam_deploy.verify.device.DeviceRun`: the verdicts recomputed here, the device's latency."""
    rows = [_parity_cells(r) + (f"{run.latency_ms[r.artifact]['p50']:.3f}", f"{run.latency_ms[r.artifact]['p90']:.3f}",
                                _status(r)) for r in run.results]
    speed = ("latency under emulation is the emulator's, not that CPU's" if run.emulated
             else f"latency: batch 1, {run.threads or 'default'} threads on the device")
    caption = (f"{run.identity.get('system', '')} {run.identity.get('release', '')}, {run.identity.get('cores', 0)} "
               f"cores, Python {run.identity.get('python', '')}; run {run.date}; INT8 probe (MatMulInteger u8 x s8): "
               f"{run.probe}; {speed}; verdicts recomputed here from the device's logits, recorded in "
               f"{run.directory}/manifest.json (verified_on)")
    return table(f"Verified on {run.device} - {run.model} - pack {run.pack_id[:12]} - {run.data} ({run.images} images)",
                 PARITY_COLUMNS + ("p50 ms", "p90 ms", "status"), rows, caption=caption)


def pack_table(result) -> Table:
    rows = [(a.format, a.file, a.precision, a.backend, f"{a.size_bytes / 1e6:.2f}") for a in result.artifacts]
    caption = (f"pack {result.pack_id}; {result.images} images of {result.data}"
               f"{' with labels' if result.labelled else ''}; {result.size_bytes / 1e6:.2f} MB"
               f"{' zipped' if result.zipped else ''}; reference kept in {result.kept}")
    return table(f"Pack of {result.model} -> {result.path}", ("artifact", "file", "precision", "backend", "MB"), rows,
                 caption=caption)


def _times(t) -> str | None:
    if not t.images:
        return None
    parts = [f"{t.images} images in {t.wall:.1f} s ({t.images_per_second:.0f} img/s)",
             f"waiting for decode {t.decode_wait:.1f} s",
             "reference: cached logits" if t.reference_cached else f"reference (eager) {t.reference:.1f} s"]
    parts += [f"{name} {seconds:.1f} s" for name, seconds in t.artifacts.items()]
    return "; ".join(parts)


def bench_table(result) -> Table:
    rows = [(r.model, r.backend, r.precision, r.batch, f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
             f"{r.throughput:.1f}", f"{r.size_mb:.2f}", f"{r.macs / 1e6:.1f}", f"{r.gflops:.1f}",
             _efficiency(r.efficiency), _pct(r.top1_agreement),
             "-" if r.accuracy_delta is None else f"{r.accuracy_delta:+.2f}") for r in result.rows]
    over = any(r.efficiency is not None and r.efficiency > 1.0 for r in result.rows)
    caption = (f"CPU: {result.cpu}; {result.threads} threads; measured GEMM peak fp32 {result.peak_gflops:.1f} GFLOP/s, "
               f"INT8 {result.peak_int8_gops:.1f} GOP/s (eff % of int8 rows is against the INT8 peak)"
               + ("; '!' = efficiency over 100 %: the peak was under-measured (machine busy, or the backend has a "
                  "faster kernel path than the GEMM probe) - do not read those rows' efficiency" if over else "")
               + ("; skipped: " + "; ".join(result.skipped) if result.skipped else ""))
    return table("Benchmark", ("model", "backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s",
                               "MB", "MMACs", "GFLOP/s", "eff %", "top-1 agr %", "acc delta"), rows, caption=caption)


def _efficiency(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}" + ("!" if value > 1.0 else "")


def npu_table(result) -> Table:
    """Vela's estimate of each model's NPU file (bench --backend ethos-u)."""
    rows = [(e.model, e.npu, f"{e.clock_mhz:g}", f"{e.inference_ms:.3f}", f"{1e3 / e.inference_ms:.1f}",
             f"{e.cycles:,}", f"{e.macs / 1e6:.1f}", f"{e.sram_kib:.1f}", f"{e.flash_kib:.1f}",
             "-" if e.npu_ops is None else e.npu_ops, "-" if e.cpu_ops is None else e.cpu_ops, e.segments,
             _pct(e.top1_agreement)) for e in result.estimates]
    caption = f"Estimate by {result.source}; top-1 agr: the uncompiled file on LiteRT against eager"
    if result.cycles_ratio is not None:
        first, second = result.estimates
        caption += f"; {first.model} / {second.model}: {result.cycles_ratio:.3f}x the cycles"
    return table("Ethos-U estimate", ("model", "NPU", "MHz", "est. ms", "est. inf/s", "cycles", "MMACs", "SRAM KiB",
                                      "weights KiB", "NPU ops", "CPU ops", "segments", "top-1 agr %"), rows,
                 caption=caption)


def ratio_table(result) -> Table:
    a, b = result.models
    rows = [(r.backend, r.precision, r.batch, f"{r.ratio:.3f}", f"{r.low:.3f} - {r.high:.3f}", r.rounds)
            for r in result.ratios]
    return table(f"Latency ratio {a} / {b} (interleaved)", ("backend", "precision", "batch", "p50 ratio",
                                                            "p10 - p90 over rounds", "rounds"), rows)


def ops_table(profile) -> Table:
    """Where one artifact's time goes (ONNX Runtime), or how its graph splits across the delegate."""
    title = f"{profile.model} / {profile.artifact}"
    if profile.rows:
        rows = [(r.op, r.nodes, f"{r.ms:.3f}", f"{r.share:.1f}") for r in profile.rows]
        return table(f"Kernel time by op: {title}", ("op", "nodes", "ms / inference", "% of kernels"), rows,
                     caption=f"summed kernel time {profile.kernel_ms:.2f} ms per inference (ONNX Runtime profiler)")
    outside = ", ".join(f"{op} x{n}" for op, n in profile.outside.items()) or "none"
    rows = [(op, n, profile.outside.get(op, 0)) for op, n in profile.ops.items()] or [("-", "-", "-")]
    return table(f"Delegate split: {title}", ("op", "in graph", "outside delegate"), rows,
                 caption=f"{profile.partitions} delegate partition(s); outside: {outside}. {profile.note}")


def plot_bench(result, path) -> None:
    """Grouped bars: p50 latency per backend x precision (x batch), p90 whiskers; one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..store.fileio import atomic_path

    def label(r) -> str:
        return f"{r.backend}\n{r.precision}" + (f"\nb{r.batch}" if r.batch != 1 else "")

    labels = list(dict.fromkeys(label(r) for r in result.rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.2))
    width = 0.8 / len(result.models)
    for i, model in enumerate(result.models):
        rows = {label(r): r for r in result.rows if r.model == model}
        xs = [j + (i - (len(result.models) - 1) / 2) * width for j, lab in enumerate(labels) if lab in rows]
        p50 = [rows[lab].p50_ms for lab in labels if lab in rows]
        p90 = [rows[lab].p90_ms - rows[lab].p50_ms for lab in labels if lab in rows]
        ax.bar(xs, p50, width, yerr=[[0] * len(p50), p90], capsize=3, label=model)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("latency per batch, ms (p50; whisker p90)")
    spread = [r.p50_ms for r in result.rows]
    if max(spread) > 20 * min(spread):
        ax.set_yscale("log")
    ax.set_title(f"{result.cpu}, {result.threads} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
