"""The benchmark suite: pick artifacts, export what is missing, time every Runner (two models
interleaved when comparing), join the parity columns of the same run, and report rows + ratios."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .timing import LatencyStats, interleaved, measure
from ..errors import BackendUnavailable, UlsamError
from ..extras import install_hint
from ..export import FORMATS
from ..store.manifest import REFERENCE, Manifest
from ..runtime import open_entry, torch_runner
from ..runtime.isa import cpu_model, isa_label, refusal, safe_here

BACKENDS = ("torch", "onnxruntime", "litert", "executorch", "trt")
_BACKEND_NAME = {"trt": "tensorrt"}


@dataclass
class BenchRow:
    model: str
    backend: str
    precision: str
    artifact: str
    threads: int
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float          # images/s at p50
    size_mb: float
    params: int
    macs: int                  # per image, direct count
    gflops: float              # achieved: 2 * MACs * batch / p50
    efficiency: float | None   # gflops / the machine's peak of this precision (fp32 GEMM; INT8 GEMM for int8)
    top1_agreement: float | None = None
    accuracy_delta: float | None = None
    vs_ratio: float | None = None      # with --vs: p50(this) / p50(the other model), interleaved rounds


@dataclass
class RatioRow:
    backend: str
    precision: str
    batch: int
    ratio: float               # p50(model A) / p50(model B), median over interleaved rounds
    low: float
    high: float
    rounds: int


@dataclass
class BenchReport:
    cpu: str
    threads: int
    peak_gflops: float                 # fp32 GEMM, best of several shapes (torch, ORT)
    models: list[str]
    peak_int8_gops: float = 0.0        # INT8 GEMM (ORT MatMulInteger u8 x s8)
    rows: list[BenchRow] = field(default_factory=list)
    ratios: list[RatioRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ops: list = field(default_factory=list)   # with --ops: each artifact's kernel time by op type


@dataclass
class Subject:
    """One model to benchmark: its export directory (manifest) and direct counts."""

    manifest: Manifest
    params: int
    macs: int

    @property
    def name(self) -> str:
        """The model's name; INT8 artifacts with float layers say which (two exports of one model differ)."""
        kept = sorted({k for e in self.manifest.artifacts.values() for k in e.get("keep_float", [])})
        return self.manifest.data["model"] + (f" (float layers {','.join(map(str, kept))})" if kept else "")


def trt_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def encoding_safe_here(name: str) -> bool:
    """Whether the INT8 encoding format ``name`` is written in is exact on this CPU (True for other formats)."""
    from ..export.pipeline import ONNX_ENCODINGS
    from ..export.quantize import ENCODINGS

    return name not in ONNX_ENCODINGS or safe_here(ENCODINGS[ONNX_ENCODINGS[name]].isa)


def formats_for(backends: tuple[str, ...], precisions: tuple[str, ...], skipped: list[str],
                force: bool = False) -> list[str]:
    """Artifact formats (besides eager torch) that the chosen backends and precisions need; an INT8 encoding
    that is not exact on this CPU is left out (noted in ``skipped``) unless ``force``."""
    names = []
    for name, fmt in FORMATS.items():
        backend = "trt" if fmt.backend == "tensorrt" else fmt.backend
        if backend not in backends or fmt.precision not in precisions or name.endswith(("-plain", "-trt", "-npu")):
            continue
        if backend == "trt" and not trt_available():
            if len(backends) == 1:
                raise BackendUnavailable("bench --backend trt needs TensorRT and an NVIDIA GPU, and this machine "
                                         "has not both", "pip install 'ulsam-deploy[tensorrt]' on a machine with an "
                                         "NVIDIA GPU and driver")
            skipped.append(f"{name}: TensorRT or an NVIDIA GPU is not available here")
            continue
        if backend == "litert" and importlib.util.find_spec("onnx2tf") is None:
            if len(backends) == 1:
                raise BackendUnavailable("bench --backend litert needs the TFLite stack", "pip install 'ulsam-deploy[tflite]'")
            skipped.append(f"{name}: the TFLite stack is not installed")
            continue
        if not encoding_safe_here(name) and not force:
            skipped.append(f"{name}: its INT8 encoding is not exact on this CPU ({isa_label()}; --force times it)")
            continue
        if backend == "executorch" and importlib.util.find_spec("executorch") is None:
            if len(backends) == 1:
                raise BackendUnavailable("bench --backend executorch needs ExecuTorch", install_hint("executorch"))
            skipped.append(f"{name}: ExecuTorch is not installed")
            continue
        names.append(name)
    return names


def _runners(subject: Subject, key: str, threads: int, force: bool = False):
    """(runner, artifact size in MB, backend, precision) for an artifact key, 'torch' = eager reference."""
    from ..nets import load_model

    directory = subject.manifest.directory
    if key == "torch":
        return (torch_runner(load_model(directory / REFERENCE), threads),
                (directory / REFERENCE).stat().st_size / 1e6, "torch", "fp32")
    entry = subject.manifest.artifacts[key]
    path = subject.manifest.verify_artifact(key)
    reason = refusal(key, entry)
    if reason and not force:
        raise UlsamError(reason, "time it on such a CPU, or pass --force to time it anyway")
    return open_entry(path, entry, threads), entry["size_bytes"] / 1e6, \
        entry["backend"], entry["precision"]


def _row(subject: Subject, key: str, backend: str, precision: str, size_mb: float, stats: LatencyStats,
         threads: int, batch: int, report: "BenchReport", parity: dict) -> BenchRow:
    gflops = 2.0 * subject.macs * batch / (stats.p50_ms / 1000.0) / 1e9
    agreement = parity.get(key)
    return BenchRow(subject.name, backend, precision, key, threads, batch, stats.p50_ms, stats.p90_ms, stats.p99_ms,
                    stats.mean_ms, stats.throughput(batch), size_mb, subject.params, subject.macs, gflops,
                    _efficiency(gflops, report.peak_int8_gops if precision == "int8" else report.peak_gflops),
                    100.0 if key == "torch" else (agreement.top1_agreement if agreement else None),
                    0.0 if key == "torch" and parity else (agreement.accuracy_delta if agreement else None))


def run_suite(subjects: list[Subject], keys: list[str], threads: int, batches: list[int], warmup: int, runs: int,
              parity: list[dict], report: BenchReport, size: int,
              on_step: Callable[[str], None] | None = None, force: bool = False) -> BenchReport:
    """Time ``keys`` (artifact formats, plus 'torch') of one subject, or of two side by side."""
    rng = np.random.default_rng(0)
    for batch in batches:
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        for key in keys:
            if on_step:
                on_step(f"{key} batch {batch}")
            opened = [_runners(s, key, threads, force) for s in subjects]
            try:
                if len(subjects) == 1:
                    stats = [measure(opened[0][0], x, warmup, runs)]
                else:
                    sa, sb, ratio = interleaved(opened[0][0], opened[1][0], x, warmup, runs)
                    stats = [sa, sb]
                    report.ratios.append(RatioRow(opened[0][2], opened[0][3], batch, ratio.median, ratio.low,
                                                  ratio.high, ratio.rounds))
            finally:
                for runner, *_ in opened:
                    runner.close()
            for index, (subject, (_, size_mb, backend, precision), st, par) in enumerate(
                    zip(subjects, opened, stats, parity)):
                row = _row(subject, key, backend, precision, size_mb, st, threads, batch, report, par)
                if report.ratios and len(subjects) == 2:
                    row.vs_ratio = report.ratios[-1].ratio if index == 0 else 1.0 / report.ratios[-1].ratio
                report.rows.append(row)
    return report


def new_report(subjects: list[Subject], threads: int) -> BenchReport:
    if not subjects:
        raise UlsamError("nothing to benchmark")
    from .peak import gemm_peak

    return BenchReport(cpu_model(), threads, gemm_peak(threads), [s.name for s in subjects],
                       peak_int8_gops=gemm_peak(threads, int8=True))


def _efficiency(gops: float, peak: float) -> float | None:
    return gops / peak if peak > 0 else None
