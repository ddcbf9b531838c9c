"""Layer by layer: where an artifact's numbers leave the eager model's (``ulsam-deploy inspect``).

Each artifact is run through a probe (:mod:`.probe`) - its own file in its own runtime, proven to be
so by logits identical to its Runner's on every batch - and every paper layer's output and every ULSAM
attention map (N, g, H, W) is compared with the eager fp32 model on the same batch. Statistics
accumulate batch by batch; the first layer whose error jumps is named per artifact.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputFileError, UlsamError
from ..export.layermap import Tap, eager_taps, onnx_locations, taps_of
from ..formats import TFLITE_BACKENDS
from .parity import row_cosine

JUMP_DB = 6.0          # a jump: SQNR falls by >= 6 dB (the error at least doubles) from one layer to the next
DEFAULT_IMAGES = 256
SETTLE_IMAGES = 128    # images on which a probe must reproduce the Runner's logits before it is used
SQNR_CAP_DB = 200.0    # identical tensors (JSON has no infinity)
PICTURE_IMAGES = 2     # images whose attention maps are kept for the picture
# Backends whose runtime cannot expose a paper layer's output: their artifacts are skipped with this note.
NOT_PROBED = {"executorch": "skipped: the ExecuTorch runtime exposes no paper-layer outputs (ETDump's debug buffer "
                            "holds only the outputs of delegate calls and of ops outside the delegate; inside the "
                            "XNNPACK delegate, where every layer runs, it records timings only)"}


@dataclass
class TapStats:
    label: str
    key: str
    layer: int
    kind: str                           # "output", "attention" or "logits"
    ulsam: bool
    observed: str                       # post-/pre-quantisation, float, output, or not observable
    cosine_mean: float | None           # per sample (attention: per map over H*W)
    cosine_min: float | None
    rel_error: float | None             # mean over samples (maps) of |artifact - eager| / |eager|
    sqnr_db: float | None               # 10 log10(sum eager^2 / sum (artifact - eager)^2) over the tensor
    argmax_agreement: float | None = None   # attention maps: % whose peak position agrees with eager
    drop_db: float | None = None        # SQNR lost since the previous layer's output
    # attention maps: spread = (max - min) x H*W per map, i.e. in units of the uniform weight (0 = uniform)
    eager_spread_mean: float | None = None
    eager_spread_min: float | None = None
    spread_mean: float | None = None    # the artifact's maps


@dataclass
class ArtifactInspection:
    artifact: str
    backend: str
    precision: str
    count: int
    logits_identical: bool              # the probe's logits equal the artifact Runner's, every batch
    logits_max_diff: float
    first_jump_layer: int | None        # paper layer number where the error first jumps
    first_jump: str | None              # its row label ("13", "8:1", ...)
    keep_float: list[int] = field(default_factory=list)
    rows: list[TapStats] = field(default_factory=list)
    # ONNX INT8: per paper layer, the largest |int16 pair sum| its weights allow (export/saturation.py)
    pair_bounds: dict[int, int] = field(default_factory=dict)
    kernels: str | None = None          # where its integer kernels are exact, and whether this CPU is one


@dataclass
class Inspection:
    directory: str
    model: str
    data: str
    count: int
    artifacts: list[ArtifactInspection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # artifacts skipped, and why


@dataclass
class AttentionSamples:
    """What the picture needs besides the statistics: a few inputs and their attention maps."""

    images: np.ndarray                                  # (K, H, W, 3), displayable RGB in [0, 1]
    eager: dict[str, np.ndarray] = field(default_factory=dict)                 # tap key -> (K, g, h, w)
    artifacts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # artifact -> tap key -> maps


class _TapAccumulator:
    """Online statistics of one tap (float64 sums, O(1) memory in the number of images)."""

    def __init__(self, tap: Tap):
        self.tap = tap
        self.ref2 = self.diff2 = self.cos_sum = self.rel_sum = 0.0
        self.cos_min, self.n, self.argmax_hits = math.inf, 0, 0
        self.spread_ref = self.spread_out = 0.0
        self.spread_ref_min = math.inf

    def update(self, value: np.ndarray, reference: np.ndarray) -> None:
        units = reference.shape[0] * (reference.shape[1] if self.tap.kind == "attention" else 1)
        ref = reference.astype(np.float64).reshape(units, -1)
        out = value.astype(np.float64).reshape(units, -1)
        diff = out - ref
        ref_norm = np.linalg.norm(ref, axis=1)
        cosine = row_cosine(out, ref)   # NaN where either holds a non-finite value: never a perfect score
        self.ref2 += float((ref ** 2).sum())
        self.diff2 += float((diff ** 2).sum())
        self.cos_sum += float(cosine.sum())
        self.cos_min = float(np.min([self.cos_min, cosine.min()]))
        self.rel_sum += float((np.linalg.norm(diff, axis=1) / np.maximum(ref_norm, 1e-30)).sum())
        self.n += units
        if self.tap.kind == "attention":
            self.argmax_hits += int((ref.argmax(1) == out.argmax(1)).sum())
            spread_ref, spread_out = np.ptp(ref, axis=1) * ref.shape[1], np.ptp(out, axis=1) * out.shape[1]
            self.spread_ref += float(spread_ref.sum())
            self.spread_out += float(spread_out.sum())
            self.spread_ref_min = min(self.spread_ref_min, float(spread_ref.min()))

    def result(self, observed: str) -> TapStats:
        if not (math.isfinite(self.ref2) and math.isfinite(self.diff2)):
            sqnr = math.nan             # a NaN or an infinity in the artifact's (or eager) tensor
        elif self.diff2 > 0:
            sqnr = min(10 * math.log10(self.ref2 / self.diff2), SQNR_CAP_DB) if self.ref2 > 0 else -SQNR_CAP_DB
        else:
            sqnr = SQNR_CAP_DB
        attention = self.tap.kind == "attention"
        return TapStats(self.tap.label, self.tap.key, self.tap.layer, self.tap.kind, self.tap.ulsam, observed,
                        self.cos_sum / self.n, self.cos_min, self.rel_sum / self.n, sqnr,
                        100.0 * self.argmax_hits / self.n if attention else None,
                        eager_spread_mean=self.spread_ref / self.n if attention else None,
                        eager_spread_min=self.spread_ref_min if attention else None,
                        spread_mean=self.spread_out / self.n if attention else None)


def mark_jump(rows: list[TapStats]) -> tuple[int | None, str | None]:
    """Fill each output row's SQNR drop; return where the error jumps, or None when every layer output is
    float-exact (SQNR >= 60 dB).

    A jump is a drop of at least JUMP_DB; of those, the first whose added error - the noise-to-signal
    ratio it adds, 10^(-SQNR/10) after minus before - is at least half the largest. In dB alone the
    first quantised layers always look worst (every INT8 MobileNet-V2 falls ~10-13 dB from a ~45 dB
    stem), while the same fall later, from 30 dB, means a hundred times more error. Only layer outputs
    count (an attention map's error is its own)."""
    outputs = [row for row in rows if row.kind == "output" and row.sqnr_db is not None]
    broken = next((row for row in outputs if math.isnan(row.sqnr_db)), None)
    if broken is not None:       # the first layer whose output is NaN or infinite is where it went wrong
        return broken.layer, broken.label
    added: dict[int, float] = {}
    for previous, row in zip(outputs, outputs[1:]):
        if math.isfinite(previous.sqnr_db) and math.isfinite(row.sqnr_db):
            row.drop_db = previous.sqnr_db - row.sqnr_db
            added[id(row)] = 10 ** (-row.sqnr_db / 10) - 10 ** (-previous.sqnr_db / 10)
    drops = [row for row in outputs if row.drop_db is not None]
    if not drops or min(row.sqnr_db for row in outputs) >= 60:
        return None, None
    jumps = [row for row in drops if row.drop_db >= JUMP_DB] or [max(drops, key=lambda row: row.drop_db)]
    bar = 0.5 * max(added[id(row)] for row in jumps)
    first = next(row for row in jumps if added[id(row)] >= bar)
    return first.layer, first.label


def _locations(manifest, name: str, entry: dict, reference, onnx_cache: dict) -> dict[str, dict]:
    if entry["backend"] == "onnxruntime":
        if "onnx" not in onnx_cache:
            onnx_cache["onnx"] = onnx_locations(manifest.verify_artifact("onnx"), reference)
        return onnx_cache["onnx"]
    if entry["backend"] in TFLITE_BACKENDS:       # TFLite Micro's file is probed on LiteRT (the same ops)
        if "taps" not in entry:
            raise InputFileError(f"{name} in {manifest.directory} records no layer taps (an older export)",
                                 "re-run `ulsam-deploy export` to rebuild it")
        return entry["taps"]
    raise UlsamError(f"inspect does not probe {entry['backend']} artifacts", "inspect onnx-int8-trt, its input")


def inspect_export(directory, formats: list[str] | None, data: str | None, images: int = DEFAULT_IMAGES,
                   threads: int = 0, batch: int = 32, on_batch=None) -> tuple[Inspection, AttentionSamples]:
    """Compare every artifact of ``formats`` (default: all but TensorRT engines) layer by layer with the
    eager model on the first ``images`` images of ``data`` (default: the model's own test set)."""
    from ..data.stream import batches
    from ..store.manifest import REFERENCE, Manifest, locked
    from ..nets import load_model
    from .probe import open_probe
    from ..runtime import open_entry, runner_options
    from .run import data_source

    with locked(directory, "read"):
        manifest = Manifest.load(directory)
        reference = load_model(manifest.directory / REFERENCE)
        names = formats or [n for n, e in manifest.artifacts.items() if e["backend"] != "tensorrt"]
        unprobed = {n: NOT_PROBED[e["backend"]] for n in names
                    if (e := manifest.artifacts.get(n)) is not None and e["backend"] in NOT_PROBED}
        names = [n for n in names if n not in unprobed]
        if not names:
            raise UlsamError(f"inspect has nothing to probe: {'; '.join(f'{n}: {why}' for n, why in unprobed.items())}",
                             "inspect onnx-int8 or tflite-int8 of the same model")
        taps, onnx_cache = taps_of(reference), {}
        located = {}
        for name in names:
            entry = manifest.artifacts.get(name)
            if entry is None:
                raise InputFileError(f"{manifest.directory} has no artifact {name!r}",
                                     f"it has: {', '.join(manifest.artifacts) or 'none'}")
            located[name] = {k: v for k, v in _locations(manifest, name, entry, reference, onnx_cache).items()
                             if k != "logits"}
        paths = {name: manifest.verify_artifact(name) for name in names}
        source = data_source(manifest, data)
        accumulators = {name: {t.key: _TapAccumulator(t) for t in taps} for name in names}
        identical = {name: True for name in names}
        max_diff = {name: 0.0 for name in names}
        samples: AttentionSamples | None = None
        probes, plain, seen = {}, {}, 0
        stream = batches(source, batch)
        first = _first_images(stream, min(images, SETTLE_IMAGES))
        if not len(first.images):
            raise InputFileError(f"no usable images in {source.name}")
        try:
            for chunk in itertools.chain([first], stream):
                x = chunk.images[: images - seen]
                eager = eager_taps(reference, x)
                shapes = {k: v.shape for k, v in eager.items()}
                if samples is None:
                    samples = _start_samples(x, eager, manifest)
                for name in names:
                    entry = manifest.artifacts[name]
                    if name not in probes:
                        probes[name] = open_probe(paths[name], entry["backend"], entry["precision"], threads,
                                                  located[name], first.images, **runner_options(entry))
                        plain[name] = open_entry(paths[name], entry, threads)
                    logits, values = probes[name](x, shapes)
                    expected = plain[name](x)
                    if not np.array_equal(logits, expected) and hasattr(probes[name], "resettle"):
                        for key in probes[name].resettle(x, expected):   # its readings so far go too
                            accumulators[name][key] = _TapAccumulator(accumulators[name][key].tap)
                        logits, values = probes[name](x, shapes)
                    identical[name] &= bool(np.array_equal(logits, expected))
                    max_diff[name] = max(max_diff[name], float(np.abs(logits - expected).max()))
                    values["logits"] = logits
                    for key, value in values.items():
                        accumulators[name][key].update(value, eager[key])
                    _keep_samples(samples, name, values)
                seen += len(x)
                if on_batch:
                    on_batch(len(x))
                if seen >= images:
                    break
        finally:
            for runner in list(probes.values()) + list(plain.values()):
                runner.close()
    result = Inspection(str(manifest.directory), manifest.data.get("model", ""), source.name, seen,
                        notes=[f"{n}: {why}" for n, why in unprobed.items()])
    for name in names:
        entry = manifest.artifacts[name]
        observed = probes[name].observed | {"logits": "output"}
        # a tap the probe could not read without changing the artifact's numbers keeps its row, empty
        rows = [accumulators[name][t.key].result(observed[t.key]) if accumulators[name][t.key].n else
                TapStats(t.label, t.key, t.layer, t.kind, t.ulsam, "not observable", None, None, None, None)
                for t in taps]
        layer, label = mark_jump(rows)
        inspected = ArtifactInspection(name, entry["backend"], entry["precision"], seen, identical[name],
                                       max_diff[name], layer, label, list(entry.get("keep_float", [])), rows)
        if entry["backend"] == "onnxruntime" and entry["precision"] == "int8":
            inspected.pair_bounds = _pair_bounds(manifest, paths[name], reference, onnx_cache)
            inspected.kernels = _kernels(name, entry)
        result.artifacts.append(inspected)
    return result, samples


def _pair_bounds(manifest, path, reference, onnx_cache: dict) -> dict[int, int]:
    """Paper layer -> the saturation audit's worst pair over the layer's integer convolutions."""
    import onnx

    from ..export.layermap import layer_members, onnx_nodes
    from ..export.saturation import audit_file

    if "members" not in onnx_cache:
        graph = onnx.load(str(manifest.verify_artifact("onnx"))).graph
        onnx_cache["members"] = layer_members(onnx_nodes(graph), onnx_cache["onnx"], taps_of(reference),
                                              graph.input[0].name)
    layer_of = {node: layer for layer, nodes in onnx_cache["members"].items() for node in nodes}
    bounds: dict[int, int] = {}
    for row in audit_file(path).layers:
        if row.node in layer_of:
            layer = layer_of[row.node]
            bounds[layer] = max(bounds.get(layer, 0), row.worst)
    return bounds


def _kernels(name: str, entry: dict) -> str:
    from ..runtime.isa import describe, isa_label, refusal

    isa = entry.get("isa")
    if not isinstance(isa, dict):
        return "encoding not recorded (an older export)"
    here = "NOT exact here" if refusal(name, entry) else "exact here"
    return f"{entry.get('encoding')}: exact on {describe(isa)}; {here} ({isa_label()})"


def _first_images(stream, count: int):
    """The stream's first batches joined until ``count`` images (one batch for the probes to settle on)."""
    from ..data.stream import Batch

    parts = []
    for chunk in stream:
        parts.append(chunk)
        if sum(len(p.images) for p in parts) >= count:
            break
    if not parts:
        return Batch(np.zeros((0, 3, 1, 1), np.float32), None)
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
    return Batch(np.concatenate([p.images for p in parts]), labels)


def _start_samples(x: np.ndarray, eager: dict[str, np.ndarray], manifest) -> AttentionSamples:
    from ..data.preprocess import Preprocessing

    shown = x[:PICTURE_IMAGES]
    prep = Preprocessing.from_dict(manifest.data["preprocessing"])
    return AttentionSamples(prep.denormalise(shown), {k: v[:PICTURE_IMAGES] for k, v in eager.items() if k.endswith(".attention")})


def _keep_samples(samples: AttentionSamples, name: str, values: dict[str, np.ndarray]) -> None:
    if name not in samples.artifacts:
        samples.artifacts[name] = {k: v[:PICTURE_IMAGES] for k, v in values.items() if k.endswith(".attention")}
