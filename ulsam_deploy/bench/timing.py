"""The one place that times things: warm-up, then timed runs with ``perf_counter_ns``.

Backend-agnostic: it receives Runners. ``interleaved`` alternates two runners round by round
(A B A B ...) so that drift in machine load hits both alike; ratios are taken per round. ``alternate`` does
the same for any number of calls.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..runtime import Runner


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int

    @classmethod
    def from_samples(cls, samples_ms: list[float], warmup: int) -> "LatencyStats":
        if not samples_ms:
            raise ValueError("no timing samples")
        p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(np.mean(samples_ms)), float(min(samples_ms)),
                   len(samples_ms), warmup)

    def throughput(self, batch: int) -> float:
        """Images per second at the median latency."""
        return batch * 1000.0 / self.p50_ms


def time_calls(call: Callable[[], object], runs: int) -> list[float]:
    """Milliseconds of ``runs`` consecutive calls."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def measure(runner: Runner, batch: np.ndarray, warmup: int, runs: int) -> LatencyStats:
    time_calls(lambda: runner(batch), warmup)
    return LatencyStats.from_samples(time_calls(lambda: runner(batch), runs), warmup)


@dataclass(frozen=True)
class Ratio:
    median: float        # median over rounds of p50(A) / p50(B)
    low: float           # 10th percentile over rounds
    high: float          # 90th percentile over rounds
    rounds: int


def alternate(calls: Sequence[Callable[[], object]], per_round: int, rounds: int, reverse: bool = False
              ) -> list[list[list[float]]]:
    """Milliseconds of ``per_round`` consecutive calls of each of ``calls``, round after round:
    ``samples[round][i]`` for ``calls[i]``. Within a round the calls take turns (in reverse order every other
    round when ``reverse``), so that drift in machine load hits all of them alike."""
    samples = []
    for r in range(rounds):
        order = range(len(calls)) if not (reverse and r % 2) else reversed(range(len(calls)))
        round_ = [[] for _ in calls]
        for i in order:
            round_[i] = time_calls(calls[i], per_round)
        samples.append(round_)
    return samples


def interleaved(a: Runner, b: Runner, batch: np.ndarray, warmup: int, runs: int, rounds: int = 10
                ) -> tuple[LatencyStats, LatencyStats, Ratio]:
    """Time ``a`` and ``b`` alternately in ``rounds`` blocks of runs/rounds calls each."""
    time_calls(lambda: a(batch), warmup)
    time_calls(lambda: b(batch), warmup)
    samples = alternate([lambda: a(batch), lambda: b(batch)], max(1, runs // rounds), rounds)
    ratios = [statistics.median(sa) / statistics.median(sb) for sa, sb in samples]
    low, med, high = np.percentile(ratios, [10, 50, 90])
    return (LatencyStats.from_samples([t for sa, _ in samples for t in sa], warmup),
            LatencyStats.from_samples([t for _, sb in samples for t in sb], warmup),
            Ratio(float(med), float(low), float(high), rounds))
