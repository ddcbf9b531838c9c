"""Parity: an artifact's Runner against the eager fp32 reference on the same preprocessed batches.

Metrics accumulate online (:class:`ParityAccumulator`), batch by batch, so a data set of any size is
compared in bounded memory; :func:`compare` is one batch of it, for whole arrays. Thresholds live in
one table (:data:`THRESHOLDS`), by precision with backend-specific rows where a backend needs it;
``check`` applies them and fails naming each breached metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np

from ..runtime import Runner


@dataclass(frozen=True)
class Thresholds:
    max_abs: float | None = None            # absolute max |logit difference|
    max_abs_rel: float | None = None        # max |difference| / reference logit range
    min_top1_agreement: float | None = None  # percent
    min_cosine: float | None = None          # minimum per-sample logit cosine
    min_accuracy_delta: float | None = None  # points; needs labels


# (backend or "*", precision) -> thresholds. The most specific row wins.
# fp32 tolerances scale with the reference's logit range: rounding differences grow with the logits' scale
# (measured against eager on 9 models with logit ranges 0.3-238: max abs / range 1.8e-7 to 9.1e-7 in ONNX
# Runtime), while a fixed 1e-4 failed a correct export of a model with large logits (2.2e-4 at range 238)
# and allowed 5e-4 of the range on one with small logits.
# A logit range under MIN_SPAN counts as MIN_SPAN: an untrained classifier's logits are all alike (range ~0),
# and its rounding differences (~1e-13 measured) must not fail it.
MIN_SPAN = 1.0
THRESHOLDS: dict[tuple[str, str], Thresholds] = {
    ("*", "fp32"): Thresholds(max_abs_rel=1e-5, min_top1_agreement=100.0),
    ("litert", "fp32"): Thresholds(max_abs_rel=1e-4, min_top1_agreement=100.0),
    ("*", "fp16"): Thresholds(min_top1_agreement=99.5, min_cosine=0.999),
    ("*", "int8"): Thresholds(min_top1_agreement=99.0, min_accuracy_delta=-1.0),
    ("litert", "int8"): Thresholds(min_top1_agreement=98.0, min_accuracy_delta=-1.0),
}
# TFLite Micro ("tflm") is gated as every other INT8 runtime ("*", "int8").


def thresholds_for(backend: str, precision: str, overrides: dict | None = None) -> Thresholds:
    base = THRESHOLDS.get((backend, precision)) or THRESHOLDS.get(("*", precision)) or Thresholds()
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "max_abs" in given and "max_abs_rel" not in given:   # an absolute bound asked for replaces the relative one
        given["max_abs_rel"] = None
    return replace(base, **given)


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
    nonfinite: int = 0                       # samples whose artifact logits hold a NaN or an infinity
    reference_nonfinite: int = 0             # samples whose eager reference logits do
    accuracy: float | None = None            # percent, when the data are labelled
    reference_accuracy: float | None = None
    accuracy_delta: float | None = None      # points (artifact - reference)
    skipped: int = 0                         # data files that could not be used
    skipped_reasons: list[str] = field(default_factory=list)   # the first few, "file: reason"
    seconds: float = 0.0                     # time in this artifact's runner
    reference_cached: bool = False           # eager logits read from the export directory's cache
    breaches: list[str] = field(default_factory=list)
    passed: bool = True
    verified_on: list[str] = field(default_factory=list)   # devices whose runs of these bytes were brought home

    def __bool__(self) -> bool:
        return self.passed


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    """Agreement and error statistics of ``logits`` against ``reference`` (both (N, classes))."""
    accumulator = ParityAccumulator()
    accumulator.update(logits, reference, labels)
    return accumulator.result()


def judge(result: ParityResult, limits: Thresholds) -> ParityResult:
    """Fill ``breaches``/``passed`` from ``limits``; each breach names the metric, value and limit.

    A non-finite logit fails whatever the limits: NaN compares false with every threshold."""
    breaches = []
    if result.nonfinite:
        breaches.append(f"non-finite logits (NaN or infinity) in {result.nonfinite} of {result.count} samples")
    if result.reference_nonfinite:
        breaches.append(f"the eager reference gives non-finite logits in {result.reference_nonfinite} of "
                        f"{result.count} samples")
    if limits.max_abs is not None and result.max_abs > limits.max_abs:
        breaches.append(f"max_abs {result.max_abs:.3g} > {limits.max_abs:g}")
    span = max(result.logit_range, MIN_SPAN)
    if limits.max_abs_rel is not None and result.max_abs > limits.max_abs_rel * span:
        breaches.append(f"max_abs/logit_range {result.max_abs / span:.3g} > {limits.max_abs_rel:g}")
    if limits.min_top1_agreement is not None and result.top1_agreement < limits.min_top1_agreement:
        breaches.append(f"top1_agreement {result.top1_agreement:.2f}% < {limits.min_top1_agreement:g}%")
    if limits.min_cosine is not None and result.cosine_min < limits.min_cosine:
        breaches.append(f"cosine_min {result.cosine_min:.5f} < {limits.min_cosine:g}")
    if (limits.min_accuracy_delta is not None and result.accuracy_delta is not None
            and result.accuracy_delta < limits.min_accuracy_delta):
        breaches.append(f"accuracy_delta {result.accuracy_delta:+.2f} points < {limits.min_accuracy_delta:+g}")
    result.breaches, result.passed = breaches, not breaches
    return result


class ParityAccumulator:
    """The parity statistics, accumulated batch by batch in float64 (memory O(classes)).

    A sample with a non-finite logit (artifact or reference) agrees on nothing and is counted; the
    cosine, difference and range statistics carry the NaN or infinity rather than hide it."""

    def __init__(self) -> None:
        self.n = self.top1 = self.top5 = self.correct = self.ref_correct = 0
        self.nonfinite = self.ref_nonfinite = 0
        self.labelled = True
        self.cos_sum, self.cos_min, self.max_abs, self.abs_sum, self.values = 0.0, np.inf, 0.0, 0.0, 0
        self.ref_max, self.ref_min = -np.inf, np.inf

    def update(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> None:
        logits, reference = logits.astype(np.float64), reference.astype(np.float64)
        k = min(5, reference.shape[1])
        top_ref = np.argsort(-reference, axis=1)[:, :k]
        top_out = np.argsort(-logits, axis=1)[:, :k]
        out_ok, ref_ok = np.isfinite(logits).all(1), np.isfinite(reference).all(1)
        valid = out_ok & ref_ok
        diff = np.abs(logits - reference)
        cosine = row_cosine(logits, reference)
        self.n += len(logits)
        self.nonfinite += int((~out_ok).sum())
        self.ref_nonfinite += int((~ref_ok).sum())
        self.top1 += int(((top_ref[:, 0] == top_out[:, 0]) & valid).sum())
        self.top5 += int(((np.sort(top_ref, 1) == np.sort(top_out, 1)).all(1) & valid).sum())
        self.cos_sum += float(cosine.sum())
        self.cos_min = float(np.min([self.cos_min, cosine.min()]))     # np.min keeps a NaN, min() drops it
        self.max_abs = float(np.max([self.max_abs, diff.max()]))
        self.abs_sum += float(diff.sum())
        self.values += diff.size
        self.ref_max = float(np.max([self.ref_max, reference.max()]))
        self.ref_min = float(np.min([self.ref_min, reference.min()]))
        if labels is None:
            self.labelled = False
        else:
            self.correct += int(((top_out[:, 0] == labels) & out_ok).sum())
            self.ref_correct += int(((top_ref[:, 0] == labels) & ref_ok).sum())

    def result(self) -> dict:
        """top-1/top-5 agreement %, cosine mean/min, max/mean abs, the reference's logit range, the samples
        with non-finite logits, and accuracy, reference accuracy and their delta (points) when every batch
        had labels."""
        if self.n == 0:
            raise ValueError("no samples were compared")
        stats = {"top1_agreement": self.top1 / self.n * 100, "top5_agreement": self.top5 / self.n * 100,
                 "cosine_mean": self.cos_sum / self.n, "cosine_min": self.cos_min, "max_abs": self.max_abs,
                 "mean_abs": self.abs_sum / self.values, "logit_range": self.ref_max - self.ref_min,
                 "nonfinite": self.nonfinite, "reference_nonfinite": self.ref_nonfinite}
        if self.labelled:
            acc, ref_acc = self.correct / self.n * 100, self.ref_correct / self.n * 100
            stats |= {"accuracy": acc, "reference_accuracy": ref_acc, "accuracy_delta": acc - ref_acc}
        return stats


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64, 2-D).

    Two zero rows are alike (1.0), a zero row against another is not (0.0), and a row holding a NaN or an
    infinity gives NaN: nothing non-finite may look like agreement."""
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    finite = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        cosine = (a * b).sum(1) / (norm_a * norm_b)
    zero_a, zero_b = norm_a == 0, norm_b == 0
    cosine = np.where(zero_a | zero_b, np.where(zero_a & zero_b, 1.0, 0.0), cosine)
    return np.where(finite, cosine, np.nan)


@dataclass
class PassTimes:
    """Where the time of one pass over the data went, seconds."""

    images: int = 0
    wall: float = 0.0
    decode_wait: float = 0.0
    reference: float = 0.0
    reference_cached: bool = False
    artifacts: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.wall if self.wall > 0 else 0.0


def compare_stream(batches: Iterable, reference: Callable[[np.ndarray], np.ndarray], runners: dict[str, Runner],
                   on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, ParityAccumulator], PassTimes]:
    """One pass: each batch (``.images``, ``.labels``) goes through ``reference`` and every runner.

    ``reference(images)`` returns the eager logits of the batch (computed or read from a cache)."""
    accumulators = {name: ParityAccumulator() for name in runners}
    times = PassTimes(artifacts={name: 0.0 for name in runners})
    start = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        ref = reference(batch.images)
        times.reference += time.perf_counter() - t0
        for name, runner in runners.items():
            t0 = time.perf_counter()
            logits = runner(np.ascontiguousarray(batch.images, np.float32))
            times.artifacts[name] += time.perf_counter() - t0
            accumulators[name].update(logits, ref, batch.labels)
        times.images += len(batch.images)
        if on_batch:
            on_batch(len(batch.images))
    times.wall = time.perf_counter() - start
    return accumulators, times
