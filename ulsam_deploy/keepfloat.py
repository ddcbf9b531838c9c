"""``export --keep-float auto``: keep the most damaging layers in float until ``check`` passes.

Sensitivity is measured, not guessed: ``inspect`` probes the first INT8 artifact and gives the SQNR each
paper layer loses (dB, against the eager model). The most sensitive layer still quantised - where the
error first jumps, else the one losing most - is kept in float, one per step; each step rebuilds every
requested INT8 artifact with the new list, runs the parity thresholds on them, times them and measures
again, until ``check`` passes or no remaining layer fits the float budget (a share of the model's MACs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import UlsamError

DEFAULT_BUDGET = 25.0       # percent of the model's MACs that may run in float
LATENCY_RUNS, LATENCY_WARMUP = 30, 5


@dataclass
class FloatStep:
    layer: int | None                     # the layer added at this step; None for the starting point
    keep_float: list[int]
    mac_share: float                      # percent of the model's MACs in the float layers
    results: list = field(default_factory=list)      # ParityResult of each INT8 artifact
    latency_ms: dict[str, float] = field(default_factory=dict)   # artifact -> p50 ms, batch 1
    sensitivity: list[tuple[int, float]] = field(default_factory=list)   # (layer, dB lost) measured after it

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


@dataclass
class FloatSearch:
    directory: str
    budget: float
    steps: list[FloatStep] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    mac_share: float = 0.0
    passed: bool = False
    stop: str = ""


@functools.lru_cache(maxsize=8)
def layer_macs(spec) -> tuple[dict[int, int], int]:
    """(MACs per paper layer - an inserted ULSAM counted with the layer it follows -, model total)."""
    from .model.profile import count_layers

    per_layer: dict[int, int] = {}
    total = 0
    for row in count_layers(spec):
        total += row.macs
        if row.layer != "fc":
            number = int(row.layer.split(":")[0])
            per_layer[number] = per_layer.get(number, 0) + row.macs
    return per_layer, total


def mac_share(layers, spec) -> float:
    per_layer, total = layer_macs(spec)
    return 100.0 * sum(per_layer.get(k, 0) for k in layers) / total


def sensitivity(directory, artifact: str, data: str | None, threads: int, images: int = 128) -> list[tuple[int, float]]:
    """(paper layer, SQNR lost at its output in dB) measured by ``inspect`` on ``artifact``, most
    sensitive first: the layer where the error first jumps, then the others by the dB they lose."""
    from .verify.inspect import inspect_export, mark_jump

    inspection, _ = inspect_export(directory, [artifact], data, images, threads)
    rows = inspection.artifacts[0].rows
    first, _ = mark_jump(rows)
    drops = [(r.layer, r.drop_db) for r in rows if r.kind == "output" and r.drop_db is not None]
    return sorted(drops, key=lambda item: (item[0] != first, -item[1]))


def search(export: Callable[[tuple[int, ...]], object], int8_formats: list[str], data: str | None,
           threads: int, budget: float = DEFAULT_BUDGET,
           on_step: Callable[[FloatStep], None] | None = None) -> FloatSearch:
    """Run the search; ``export(keep_float)`` (re)exports and returns the directory's Manifest.

    Each step measures where the first INT8 artifact inspect can read loses precision now (``inspect``), keeps the worst
    layer that is still quantised and fits the budget in float, rebuilds and re-checks. Measuring again
    after every step matters: a tensor that two layers read stays quantised until both are float, and
    only then does the next layer's damage show."""
    if not int8_formats:
        raise UlsamError("--keep-float auto needs an INT8 format", "add onnx-int8, onnx-int8-trt or tflite-int8")
    probed = _probed(int8_formats)
    if not 0 < budget <= 100:
        raise UlsamError(f"--float-budget {budget:g} must be a percentage in (0, 100]")
    chosen: list[int] = []
    manifest = export(())
    spec = manifest.spec
    result = FloatSearch(str(manifest.directory), budget)
    step = _evaluate(manifest, None, (), int8_formats, data, threads, spec)
    while True:
        result.steps.append(step)
        if step.passed:
            result.passed, result.stop = True, "check passes" if chosen else "check passes without float layers"
            if on_step:
                on_step(step)
            break
        ranking = [(layer, drop) for layer, drop in sensitivity(manifest.directory, probed, data, threads)
                   if layer not in chosen and drop > 0]
        step.sensitivity = ranking[:5]
        if on_step:
            on_step(step)
        fitting = [layer for layer, _ in ranking if mac_share(chosen + [layer], spec) <= budget]
        if not fitting:
            result.stop = ("the float budget is spent" if ranking else
                           "no quantised layer loses precision any more")
            break
        chosen.append(fitting[0])
        manifest = export(tuple(sorted(chosen)))
        step = _evaluate(manifest, fitting[0], tuple(sorted(chosen)), int8_formats, data, threads, spec)
    result.chosen, result.mac_share = sorted(chosen), mac_share(chosen, spec)
    mark_gate(manifest.directory, result.steps[-1])
    return result


def mark_gate(directory, step: FloatStep) -> None:
    """Record on each INT8 artifact the search leaves whether it passes ``check``, and what it breaches."""
    from .store.manifest import Manifest, locked

    with locked(directory, "write"):
        manifest = Manifest.load(directory)
        for r in step.results:
            if r.artifact in manifest.artifacts:
                manifest.artifacts[r.artifact]["gate"] = {
                    "passed": bool(r.passed), "breaches": [b[:500] for b in r.breaches][:16],
                    "by": "export --keep-float auto", "data": r.data[:500], "count": int(r.count)}
        manifest.save()


def failure_line(result: FloatSearch) -> str:
    """One line for a search that ended without a passing artifact: what broke, what was tried, what it cost."""
    last = result.steps[-1]
    broken = "; ".join(f"{r.artifact}: {', '.join(r.breaches)}" for r in last.results if not r.passed)
    tried = ",".join(str(step.layer) for step in result.steps if step.layer is not None) or "none"
    return (f"keep-float auto found no INT8 artifact that passes check ({broken}); layers tried in float: {tried}; "
            f"{result.mac_share:.1f} % of MACs in float of a {result.budget:g} % budget ({result.stop}); "
            f"the artifacts left are marked as failing in the manifest")


def _probed(int8_formats: list[str]) -> str:
    """The first INT8 format whose layers ``inspect`` can read (the sensitivity comes from there)."""
    from .formats import FORMATS
    from .verify.inspect import NOT_PROBED

    probed = [name for name in int8_formats if FORMATS[name].backend not in NOT_PROBED]
    if not probed:
        raise UlsamError(f"--keep-float auto measures each layer's loss with inspect, which cannot read the layers of "
                         f"{', '.join(int8_formats)}", "add onnx-int8 or tflite-int8 to --formats")
    return probed[0]


def _evaluate(manifest, layer, keep_float, int8_formats, data, threads, spec) -> FloatStep:
    """Parity (the check thresholds) and batch-1 latency of every INT8 artifact."""
    from .bench.timing import measure
    from .runtime import open_entry
    from .workflow import parity_for

    step = FloatStep(layer, list(keep_float), mac_share(keep_float, spec))
    step.results = parity_for(manifest, int8_formats, data, threads, {})
    x = np.zeros((1, 3, spec.input_size, spec.input_size), np.float32)
    for name in int8_formats:
        entry = manifest.artifacts[name]
        runner = open_entry(manifest.directory / entry["file"], entry, threads)
        try:
            step.latency_ms[name] = measure(runner, x, LATENCY_WARMUP, LATENCY_RUNS).p50_ms
        finally:
            runner.close()
    return step
