"""``bench --backend ethos-u``: Vela's performance estimate of each model's NPU file, side by side.

Nothing is timed: no Ethos-U is attached to the machine running the tool. The figures are Vela's
estimate at the configuration's clock (cycles, inference time, memory), recorded at export; the
top-1 agreement column is the uncompiled full-integer file run by LiteRT against the eager model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import UlsamError
from ..formats import NPU_FORMATS

NPU_FORMAT = NPU_FORMATS[0]


@dataclass
class NpuEstimate:
    model: str
    npu: str
    accelerator: str
    clock_mhz: float
    cycles: int
    inference_ms: float          # Vela's estimate, not a measurement
    sram_kib: float
    flash_kib: float             # weights in off-chip Flash (or DRAM, by the configuration's memory mode)
    npu_ops: int | None
    cpu_ops: int | None
    segments: int
    macs: int
    top1_agreement: float | None = None


@dataclass
class NpuReport:
    estimates: list[NpuEstimate] = field(default_factory=list)
    cycles_ratio: float | None = None     # first model / second (with --vs)
    source: str = "Vela's performance model, not a measurement"


def estimate_of(manifest) -> NpuEstimate:
    entry = manifest.artifacts.get(NPU_FORMAT)
    vela = entry.get("vela") if isinstance(entry, dict) else None
    if not isinstance(vela, dict) or not isinstance(vela.get("estimate"), dict):
        raise UlsamError(f"{manifest.directory} has no {NPU_FORMAT} compiled by Vela",
                         f"export it: ulsam-deploy export --formats {NPU_FORMAT} --out {manifest.directory}")
    est, ops = vela["estimate"], vela.get("operators") or {}
    try:
        return NpuEstimate(manifest.data["model"], str(vela["npu"]), str(vela["accelerator"]),
                           float(est["clock_mhz"]), int(est["cycles"]), float(est["inference_ms"]),
                           float(est["sram_kib"]), float(est["flash_kib"]) + float(est.get("dram_kib", 0.0)),
                           ops.get("npu"), ops.get("cpu"), int(ops.get("segments", 0)), int(est["macs"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UlsamError(f"{manifest.directory}: the {NPU_FORMAT} entry's Vela record is malformed ({exc})",
                         "re-export it") from None


def run_npu_bench(manifests: list, npu: str | None, parity: bool, threads: int,
                  on_step: Callable[[str], None]) -> NpuReport:
    """The estimates of ``manifests`` (one, or a model and the one it is compared with), all compiled for
    ``npu`` when it is given; with ``parity``, each NPU file's top-1 agreement with its eager model."""
    from ..workflow import parity_for

    report = NpuReport([estimate_of(manifest) for manifest in manifests])
    for manifest, estimate in zip(manifests, report.estimates):
        if npu is not None and estimate.npu != npu:
            raise UlsamError(f"{manifest.directory}: {NPU_FORMAT} is compiled for {estimate.npu}, not {npu}",
                             f"re-export it with --npu {npu}")
    if len(report.estimates) == 2:
        first, second = report.estimates
        if first.npu != second.npu:
            raise UlsamError(f"the two models are compiled for different NPUs ({first.npu}, {second.npu})",
                             "export both with the same --npu")
        report.cycles_ratio = first.cycles / second.cycles
    for manifest, estimate in zip(manifests, report.estimates) if parity else ():
        on_step(f"parity {manifest.data['model']}")
        estimate.top1_agreement = parity_for(manifest, [NPU_FORMAT], None, threads, {})[0].top1_agreement
    return report
