"""``export --keep-float auto``: keep the most damaging layers in float until ``check`` passes.

Sensitivity is measured, not guessed: for every paper layer, the ONNX Runtime INT8 model (U8S8, the
same calibration ranges) is rebuilt with only that layer in float and run on the evaluation data; a
layer's sensitivity is how much that lowers the mean |logit difference| to the eager model. Layers are
then added worst first, one per step - each step rebuilds every requested INT8 artifact with the new
list, runs the parity thresholds on them and times them - until ``check`` passes or the next layer would
push the float layers' share of the model's MACs over the budget.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
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

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


@dataclass
class FloatSearch:
    directory: str
    budget: float
    ranking: list[tuple[int, float]] = field(default_factory=list)   # (layer, mean |logit diff| with it float)
    baseline_error: float | None = None
    steps: list[FloatStep] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    mac_share: float = 0.0
    passed: bool = False
    stop: str = ""


@functools.lru_cache(maxsize=8)
def layer_macs(spec) -> tuple[dict[int, int], int]:
    """(MACs per paper layer - an inserted ULSAM counted with the layer it follows -, model total)."""
    from .profile import count_layers

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


def rank_layers(manifest, reference, calibration: np.ndarray, method: str, data: str | None, threads: int,
                images: int = 128) -> tuple[float, list[tuple[int, float]]]:
    """(baseline mean |logit diff|, [(layer, mean |logit diff| with only that layer float)] best first)."""
    from .data.stream import batches
    from .export import FORMATS
    from .export.quantize import quantize_int8
    from .runtime import open_artifact, run_batched, torch_runner
    from .verify import data_source

    chunks = []
    for chunk in batches(data_source(manifest, data), 64):
        chunks.append(chunk.images)
        if sum(len(c) for c in chunks) >= images:
            break
    x = np.concatenate(chunks)[:images]
    eager = run_batched(torch_runner(reference, threads), x, 64)
    onnx_path = manifest.directory / FORMATS["onnx"].filename

    def error(layers: tuple[int, ...]) -> float:
        with tempfile.TemporaryDirectory(prefix="ulsam-rank-") as work:
            path = Path(work) / "model.int8.onnx"
            quantize_int8(onnx_path, path, calibration, method, keep_float=layers, reference=reference)
            runner = open_artifact(path, "onnxruntime", "int8", threads)
            try:
                return float(np.abs(run_batched(runner, x, 64) - eager).mean())
            finally:
                runner.close()

    baseline = error(())
    scores = [(k, error((k,))) for k in range(1, len(reference.spec.layers) + 1)]
    return baseline, sorted(scores, key=lambda item: item[1])


def search(export: Callable[[tuple[int, ...]], object], int8_formats: list[str], reference, calibration: np.ndarray,
           method: str, data: str | None, threads: int, budget: float = DEFAULT_BUDGET,
           on_step: Callable[[FloatStep], None] | None = None) -> FloatSearch:
    """Run the search; ``export(keep_float)`` (re)exports and returns the directory's Manifest."""
    if not int8_formats:
        raise UlsamError("--keep-float auto needs an INT8 format", "add onnx-int8, onnx-int8-trt or tflite-int8")
    if not 0 < budget <= 100:
        raise UlsamError(f"--float-budget {budget:g} must be a percentage in (0, 100]")
    spec = reference.spec
    manifest = export(())
    result = FloatSearch(str(manifest.directory), budget)
    step = _evaluate(manifest, None, (), int8_formats, data, threads, spec)
    result.steps.append(step)
    if on_step:
        on_step(step)
    if step.passed:
        result.passed, result.stop = True, "check passes without float layers"
        return result
    result.baseline_error, result.ranking = rank_layers(manifest, reference, calibration, method, data, threads)
    chosen: list[int] = []
    for layer, score in result.ranking:
        if score >= result.baseline_error:
            result.stop = "no remaining layer lowers the error when kept in float"
            break
        if mac_share(chosen + [layer], spec) > budget:
            continue
        chosen.append(layer)
        manifest = export(tuple(sorted(chosen)))
        step = _evaluate(manifest, layer, tuple(sorted(chosen)), int8_formats, data, threads, spec)
        result.steps.append(step)
        if on_step:
            on_step(step)
        if step.passed:
            result.passed, result.stop = True, "check passes"
            break
    else:
        result.stop = "every layer that fits the float budget was tried"
    result.chosen, result.mac_share = sorted(chosen), mac_share(chosen, spec)
    return result


def _evaluate(manifest, layer, keep_float, int8_formats, data, threads, spec) -> FloatStep:
    """Parity (the check thresholds) and batch-1 latency of every INT8 artifact."""
    from .bench import measure
    from .runtime import open_artifact
    from .workflow import parity_for

    step = FloatStep(layer, list(keep_float), mac_share(keep_float, spec))
    step.results = parity_for(manifest, int8_formats, data, threads, {})
    x = np.zeros((1, 3, spec.input_size, spec.input_size), np.float32)
    for name in int8_formats:
        entry = manifest.artifacts[name]
        runner = open_artifact(manifest.directory / entry["file"], entry["backend"], entry["precision"], threads)
        try:
            step.latency_ms[name] = measure(runner, x, LATENCY_WARMUP, LATENCY_RUNS).p50_ms
        finally:
            runner.close()
    return step
