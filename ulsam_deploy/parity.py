"""Parity: an artifact's Runner against the eager fp32 reference on the same preprocessed batches.

Thresholds live in one table (:data:`THRESHOLDS`), by precision with backend-specific rows where a
backend's issue set them differently; ``check`` applies them and fails naming each breached metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .data import DataSet
from .runtime import Runner, run_batched


@dataclass(frozen=True)
class Thresholds:
    max_abs: float | None = None            # absolute max |logit difference|
    max_abs_rel: float | None = None        # max |difference| / reference logit range
    min_top1_agreement: float | None = None  # percent
    min_cosine: float | None = None          # minimum per-sample logit cosine
    min_accuracy_delta: float | None = None  # points; needs labels


# (backend or "*", precision) -> thresholds. The most specific row wins.
THRESHOLDS: dict[tuple[str, str], Thresholds] = {
    ("*", "fp32"): Thresholds(max_abs=1e-4, min_top1_agreement=100.0),
    ("litert", "fp32"): Thresholds(max_abs_rel=1e-4, min_top1_agreement=100.0),
    ("*", "fp16"): Thresholds(min_top1_agreement=99.5, min_cosine=0.999),
    ("*", "int8"): Thresholds(min_top1_agreement=99.0, min_accuracy_delta=-1.0),
    ("litert", "int8"): Thresholds(min_top1_agreement=98.0, min_accuracy_delta=-1.0),
}


def thresholds_for(backend: str, precision: str, overrides: dict | None = None) -> Thresholds:
    base = THRESHOLDS.get((backend, precision)) or THRESHOLDS.get(("*", precision)) or Thresholds()
    return replace(base, **{k: v for k, v in (overrides or {}).items() if v is not None})


@dataclass
class ParityResult:
    artifact: str
    backend: str
    precision: str
    count: int
    data: str
    top1_agreement: float          # percent of samples whose top-1 class matches the reference
    top5_agreement: float          # percent whose top-5 set matches
    cosine_mean: float
    cosine_min: float
    max_abs: float
    mean_abs: float
    logit_range: float
    accuracy: float | None = None            # percent, when the data are labelled
    reference_accuracy: float | None = None
    accuracy_delta: float | None = None      # points (artifact - reference)
    breaches: list[str] = field(default_factory=list)
    passed: bool = True

    def __bool__(self) -> bool:
        return self.passed


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    """Agreement and error statistics of ``logits`` against ``reference`` (both (N, classes))."""
    logits, reference = logits.astype(np.float64), reference.astype(np.float64)
    k = min(5, reference.shape[1])
    top_ref = np.argsort(-reference, axis=1)[:, :k]
    top_out = np.argsort(-logits, axis=1)[:, :k]
    diff = np.abs(logits - reference)
    norms = np.linalg.norm(logits, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = np.where(norms > 0, (logits * reference).sum(1) / np.maximum(norms, 1e-30), 1.0)
    stats = {
        "top1_agreement": float((top_ref[:, 0] == top_out[:, 0]).mean() * 100),
        "top5_agreement": float((np.sort(top_ref, 1) == np.sort(top_out, 1)).all(1).mean() * 100),
        "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
        "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
        "logit_range": float(reference.max() - reference.min()),
    }
    if labels is not None:
        acc, ref_acc = float((top_out[:, 0] == labels).mean() * 100), float((top_ref[:, 0] == labels).mean() * 100)
        stats |= {"accuracy": acc, "reference_accuracy": ref_acc, "accuracy_delta": acc - ref_acc}
    return stats


def judge(result: ParityResult, limits: Thresholds) -> ParityResult:
    """Fill ``breaches``/``passed`` from ``limits``; each breach names the metric, value and limit."""
    breaches = []
    if limits.max_abs is not None and result.max_abs > limits.max_abs:
        breaches.append(f"max_abs {result.max_abs:.3g} > {limits.max_abs:g}")
    if limits.max_abs_rel is not None and result.max_abs > limits.max_abs_rel * max(result.logit_range, 1e-12):
        breaches.append(f"max_abs/logit_range {result.max_abs / max(result.logit_range, 1e-12):.3g} > {limits.max_abs_rel:g}")
    if limits.min_top1_agreement is not None and result.top1_agreement < limits.min_top1_agreement:
        breaches.append(f"top1_agreement {result.top1_agreement:.2f}% < {limits.min_top1_agreement:g}%")
    if limits.min_cosine is not None and result.cosine_min < limits.min_cosine:
        breaches.append(f"cosine_min {result.cosine_min:.5f} < {limits.min_cosine:g}")
    if (limits.min_accuracy_delta is not None and result.accuracy_delta is not None
            and result.accuracy_delta < limits.min_accuracy_delta):
        breaches.append(f"accuracy_delta {result.accuracy_delta:+.2f} points < {limits.min_accuracy_delta:+g}")
    result.breaches, result.passed = breaches, not breaches
    return result


def run_parity(artifact: str, backend: str, precision: str, runner: Runner, reference_logits: np.ndarray,
               data: DataSet, limits: Thresholds, batch: int = 32) -> ParityResult:
    """Run ``runner`` over ``data`` and judge it against ``reference_logits``."""
    logits = run_batched(runner, data.images, batch)
    stats = compare(logits, reference_logits, data.labels)
    result = ParityResult(artifact=artifact, backend=backend, precision=precision, count=data.count,
                          data=data.source, **stats)
    return judge(result, limits)
