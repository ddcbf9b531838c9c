"""Where an artifact's latency goes: time by op type, and how a TFLite graph splits across XNNPACK.

- ONNX Runtime: the session's own profiler (``SessionOptions.enable_profiling``); every kernel event of
  the timed runs is summed by op type (ORT's fused kernels, e.g. ``FusedConv`` or ``QLinearConv``, are
  what ran) and divided by the number of runs.
- LiteRT: its Python interpreter has no op profiler (the per-op profile is the ``benchmark_model`` tool's,
  which is not on PyPI), so a TFLite row gives the XNNPACK delegate partitions and the ops the delegate
  left outside, from the interpreter's node list after the delegate was applied. The same facts are
  recorded in each TFLite manifest entry at export.
- ExecuTorch: the manifest entry records the delegate split (``outside_delegate``); per-op times inside the
  delegate need an ETDump-enabled runtime build, which the pip wheel is not.
"""

from __future__ import annotations

import bisect
import collections
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class OpRow:
    op: str
    nodes: int                 # kernel invocations per inference
    ms: float                  # per inference
    share: float               # % of the summed kernel time


@dataclass
class OpProfile:
    model: str
    artifact: str
    backend: str
    rows: list[OpRow] = field(default_factory=list)
    kernel_ms: float = 0.0     # summed kernel time per inference
    partitions: int | None = None           # TFLite: XNNPACK delegate partitions
    outside: dict[str, int] = field(default_factory=dict)   # TFLite: op types left outside the delegate
    ops: dict[str, int] = field(default_factory=dict)       # TFLite: op types in the graph
    note: str = ""


def onnxruntime_ops(path: Path, input_size: int, threads: int, runs: int, warmup: int = 5) -> tuple[list[OpRow], float]:
    """Kernel time by op type per inference (batch 1), from ONNX Runtime's session profiler."""
    import onnxruntime as ort

    from ..runtime.onnxruntime import session_options

    with tempfile.TemporaryDirectory(prefix="ulsam-ortprof-") as scratch:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name:
                np.random.default_rng(0).normal(size=(1, 3, input_size, input_size)).astype(np.float32)}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return kernel_time_by_op(events, warmup)


def kernel_time_by_op(events: list[dict], skip_runs: int) -> tuple[list[OpRow], float]:
    """ORT profile events -> (rows by op type per run, summed kernel ms per run), the first runs skipped."""
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip_runs:]
    if not windows:
        return [], 0.0
    starts = [w[0] for w in windows]

    def timed(event) -> bool:
        i = bisect.bisect_right(starts, event["ts"]) - 1
        return i >= 0 and event["ts"] <= windows[i][1]

    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and timed(e)]
    return _by_op(kernels, len(windows))


def _by_op(events: list[dict], runs: int) -> tuple[list[OpRow], float]:
    time: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for event in events:
        op = event.get("args", {}).get("op_name", "?")
        time[op] += float(event.get("dur", 0)) / 1000.0
        count[op] += 1
    total = sum(time.values())
    rows = [OpRow(op, round(count[op] / runs), t / runs, 100.0 * t / total if total else 0.0)
            for op, t in sorted(time.items(), key=lambda kv: -kv[1])]
    return rows, total / runs if runs else 0.0


def profile_ops(subjects, keys: list[str], threads: int, runs: int) -> list[OpProfile]:
    """One OpProfile per model and artifact in ``keys`` (ONNX Runtime and LiteRT artifacts; others noted)."""
    from ..formats import FORMATS

    profiles = []
    for subject in subjects:
        manifest = subject.manifest
        for key in keys:
            entry = manifest.artifacts.get(key)
            if entry is None:
                continue
            profile = OpProfile(subject.name, key, entry["backend"])
            path = manifest.directory / FORMATS[key].filename
            if entry["backend"] == "onnxruntime":
                profile.rows, profile.kernel_ms = onnxruntime_ops(path, manifest.spec.input_size, threads, runs)
            elif entry["backend"] == "litert":
                from ..runtime.litert import delegate_split

                split = delegate_split(path)
                profile.partitions, profile.outside, profile.ops = split["partitions"], split["outside_delegate"], split["ops"]
                profile.note = "LiteRT's Python interpreter has no op profiler: XNNPACK partitions and graph ops shown"
            elif entry["backend"] == "executorch":
                profile.outside = dict(entry.get("outside_delegate") or {})
                profile.partitions = entry.get("delegated_subgraphs")
                profile.note = "per-op times inside the delegate need an ETDump runtime build; the delegate split shown"
            else:
                profile.note = "no per-op profile for this backend here"
            profiles.append(profile)
    return profiles
