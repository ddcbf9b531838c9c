"""Calibrated INT8 Q/DQ ONNX with ONNX Runtime's static quantisation, calibrated once, three encodings.

* ``onnx-int8`` (what ONNX Runtime runs, the default): uint8 asymmetric activations, int8 symmetric
  per-channel weights of 7 bits (codes in [-64, 64], ``reduce_range``). Its integer kernels compute the
  graph's Q/DQ meaning on every CPU: on x86 without VNNI ONNX Runtime's u8 x s8 kernels add two products
  in a 16-bit lane (VPMADDUBSW), and 255 * (64 + 64) = 32640 fits where 8-bit weights (255 * 254) do not
  (:mod:`.saturation` audits each artifact).
* ``onnx-int8-vnni``: the same with 8-bit weights (codes in [-127, 127]); one bit more of weight
  precision, exact only where the kernels accumulate in 32 bits (x86 with AVX-512 VNNI, arm64). ``check``
  and ``bench`` refuse it on other CPUs.
* ``onnx-int8-trt`` (what the TensorRT INT8 engine is built from): symmetric int8 activations and
  weights, zero points 0, per-channel weights on axis 0 - TensorRT's explicit-quantisation form. TensorRT
  accumulates in 32 bits; ONNX Runtime's fused x86 kernels for it saturate on AVX2 like U8S8 (97.3 % top-1
  agreement with its own Q/DQ meaning under an emulated Haswell), so ONNX Runtime checks it as its Q/DQ
  graph (``ort_graph: qdq``), the arithmetic TensorRT gives it, on every CPU.

All three come from the same activation ranges (one calibration pass, cached per ONNX + data + method).
Biases stay float. The ONNX holds ULSAM in its ``spread`` form (:mod:`ulsam_deploy.nets.ulsam`):
Softmax -> 1x1 conv g -> m (``1 + A`` over each group's channels) -> Mul ``x * (1 + A)``. The conv and the
Mul are quantised like the rest, so the attention path runs in integer kernels in the layout of the
convolutions around it (QLinearConv, QLinearMul; ONNX Runtime fuses the Softmax between its Q/DQ pairs
into QLinearSoftmax) instead of leaving and re-entering INT8 four times per ULSAM. Quantising ``1 + A``
rather than ``A`` is what keeps the attention: ``1 + A`` lies in [1, 2], so its rounding (a step of at most
2/255) moves x * (1 + A) by at most 0.4 % of x, where attention weights of 1/196-1/16 alone would sit within
a few steps of zero. In the U8S8 file A itself is quantised over [0, 1], whatever calibration saw: ONNX
Runtime's QLinearSoftmax (1.31) wraps a value beyond its output range round to 0 instead of saturating, so a
map sharper than any in the calibration set would lose its attention. ``keep_attention_float`` keeps
Softmax -> conv -> Mul float instead (the TensorRT FP16 source keeps the same nodes float32). The
classifier's output (the logits) is not quantised: a logit beyond the calibrated maximum would otherwise be
clipped to it (digits: 31.27 calibrated, 32.03 in the test split).
``keep_float`` paper layers run in float: no Q/DQ on their weights, their inner tensors or their inputs,
so TensorRT, which runs a layer in INT8 only where its inputs and weights are quantised, keeps them in float too.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UlsamError
from ..store.fileio import atomic_path
from . import quiet
from .saturation import audit_model

METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Encoding:
    label: str
    activations_symmetric: bool
    reduce_range: bool                 # weights of 7 bits
    isa: dict                          # architecture -> "any" or the x86 features of which one must be present
    qdq_graph: bool = False            # ONNX Runtime checks it as its Q/DQ graph (what TensorRT computes)


# Where ONNX Runtime's integer kernels compute each encoding's Q/DQ meaning (measured: docs/formats.md).
ENCODINGS = {
    "ort": Encoding("U8S8, 7-bit weights", False, True, {"x86_64": "any", "arm64": "any"}),
    "ort-vnni": Encoding("U8S8, 8-bit weights", False, False, {"x86_64": ["AVX512VNNI"], "arm64": "any"}),
    "tensorrt": Encoding("S8S8 symmetric (TensorRT)", True, False, {"x86_64": "any", "arm64": "any"}, qdq_graph=True),
}
QUANTIZED_OPS = ["Conv", "Gemm", "Add", "Mul", "MaxPool", "GlobalAveragePool", "ReduceMean", "Relu", "Clip"]


def attention_nodes(model) -> list[str]:
    """Names of every ULSAM's attention path after its scores: Softmax -> Reshape -> Conv (1 + A) -> Mul.

    (An ONNX of the broadcast form, from an older export: Softmax -> Reshape -> Mul -> Add.)"""
    from .layermap import onnx_consumers

    consumers = onnx_consumers(model.graph)
    keep: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        keep.append(node.name)
        frontier, spread = [node], False
        for _ in range(4):
            nxt = [c for n in frontier for out in n.output for c in consumers.get(out, [])
                   if c.op_type in ("Reshape", "Unsqueeze", "Conv", "Mul", "Add")]
            keep += [c.name for c in nxt if c.name not in keep]
            spread |= any(c.op_type == "Conv" for c in nxt)
            if any(c.op_type == "Add" or (spread and c.op_type == "Mul") for c in nxt):
                break
            frontier = nxt
    return keep


def softmax_outputs(model) -> list[str]:
    """Every Softmax's output tensor, and the reshapes of it up to the op that reads it."""
    from .layermap import onnx_consumers, through_reshapes

    consumers = onnx_consumers(model.graph)
    return [name for node in model.graph.node if node.op_type == "Softmax"
            for name in through_reshapes(node.output[0], consumers)]


class _Reader:
    """ONNX Runtime CalibrationDataReader over a fixed array, in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 16):
        self.input_name, self.images, self.batch, self.pos = input_name, images, batch, 0

    def get_next(self):
        if self.pos >= len(self.images):
            return None
        chunk = np.ascontiguousarray(self.images[self.pos:self.pos + self.batch], dtype=np.float32)
        self.pos += self.batch
        return {self.input_name: chunk}

    def rewind(self):
        self.pos = 0


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


_RANGES: dict[tuple[str, str, str], tempfile.TemporaryDirectory] = {}
_MEMBERS: dict[str, tuple] = {}   # float ONNX sha256 -> (layer -> node names, layer -> input tensor)


def ranges_for(fp32_path: Path, calibration: np.ndarray, method: str) -> Path:
    """The calibration cache (JSON ranges) for this ONNX, data and method; computed once per process."""
    import hashlib

    key = (hashlib.sha256(Path(fp32_path).read_bytes()).hexdigest(),
           hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest(), method)
    if key not in _RANGES:
        scratch = tempfile.TemporaryDirectory(prefix="ulsam-ranges-")
        calibrate(fp32_path, calibration, method, Path(scratch.name) / "ranges.json")
        _RANGES[key] = scratch
    return Path(_RANGES[key].name) / "ranges.json"


def calibrate(fp32_path: Path, calibration: np.ndarray, method: str, cache: Path) -> None:
    """Activation ranges by ``method`` written to an ORT calibration cache (JSON).

    ``quantize_static`` forwards no bin counts to its calibrators, and its Entropy default of 128
    histogram bins for 128 quantised bins leaves a single candidate threshold, the full range: the
    same scales as MinMax. We run the calibrator ourselves with 2048 bins so the methods differ.
    """
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    options = {"symmetric": False}   # raw ranges; each encoding symmetrises as it needs
    if method == "entropy":
        options |= {"num_bins": 2048, "num_quantized_bins": 128}
    elif method == "percentile":
        options |= {"num_bins": 2048, "percentile": 99.99}
    model = onnx.load(str(fp32_path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch = dim.dim_value if dim.dim_value > 0 else 16    # a static batch must be fed as it is
    with tempfile.TemporaryDirectory(prefix="ulsam-calib-") as work:
        calibrator = create_calibrator(Path(fp32_path), QUANTIZED_OPS,
                                       augmented_model_path=str(Path(work) / "augmented.onnx"),
                                       calibrate_method=_method(method), extra_options=options)
        calibrator.collect_data(_Reader(model.graph.input[0].name, calibration, batch))
        save_tensors_data(calibrator.compute_data(), cache)


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, method: str = "minmax",
                  keep_attention_float: bool = False, encoding: str = "ort", keep_float: Sequence[int] = (),
                  reference=None) -> dict:
    """Write the Q/DQ INT8 ONNX of ``fp32_path`` calibrated on ``calibration`` (NCHW float32).

    ``keep_float`` paper layers stay float; locating them needs ``reference`` (the eager model)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise UlsamError(f"calibration method {method!r} is unknown", f"choose one of {', '.join(METHODS)}")
    model = onnx.load(str(fp32_path))
    float_nodes = attention_nodes(model) if keep_attention_float else []
    layer_nodes = _layer_nodes(fp32_path, model, keep_float, reference)
    float_nodes += [n for n in layer_nodes if n not in float_nodes]
    if encoding not in ENCODINGS:
        raise UlsamError(f"unknown INT8 encoding {encoding!r}", f"choose one of {', '.join(ENCODINGS)}")
    recipe = ENCODINGS[encoding]
    symmetric = recipe.activations_symmetric
    # Biases stay float (QuantizeBias False): TensorRT fuses a float bias, int32 DequantizeLinear it does not take.
    extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": False,
             "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "Gemm": 0},
             "OpTypesToExcludeOutputQuantization": ["Gemm"]}
    if not symmetric:   # A over the whole [0, 1] a softmax can reach (QLinearSoftmax): see the module docstring
        whole = [{"rmin": np.float32(0), "rmax": np.float32(1)}]
        extra["TensorQuantOverrides"] = {name: whole for name in softmax_outputs(model)}
    with quiet():
        cache = ranges_for(fp32_path, calibration, method)
    with atomic_path(out_path) as tmp, quiet():
        quantize_static(str(fp32_path), str(tmp), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=QUANTIZED_OPS, per_channel=True, reduce_range=recipe.reduce_range,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes,
                        calibrate_method=_method(method), extra_options=extra, calibration_cache_path=str(cache))
        quantized = onnx.load(str(tmp))
        if layer_nodes:
            _float_inputs(quantized, set(layer_nodes), model)
            onnx.save(quantized, str(tmp))
        onnx.checker.check_model(quantized)
    ops = {}
    for node in quantized.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    audit = audit_model(quantized)
    return {"method": method, "encoding": recipe.label, "weight_bits": 7 if recipe.reduce_range else 8,
            "isa": recipe.isa, "saturation": audit.summary(), **({"ort_graph": "qdq"} if recipe.qdq_graph else {}),
            "activations_symmetric": symmetric, "per_channel": True, "format": "QDQ",
            "float_nodes": float_nodes, "keep_float": sorted(keep_float), "logits": "float",
            "attention_path": "float" if keep_attention_float else "softmax float, 1 + A and x * (1 + A) int8",
            "attention_range": "calibrated" if symmetric else "[0, 1]", "ops": dict(sorted(ops.items()))}


def _layer_nodes(fp32_path: Path, model, keep_float: Sequence[int], reference) -> list[str]:
    """Node names of the ``keep_float`` paper layers in the float ONNX."""
    if not keep_float:
        return []
    if reference is None:
        raise UlsamError("keeping layers in float needs the eager model to locate them")
    import hashlib

    from . import layermap

    key = hashlib.sha256(Path(fp32_path).read_bytes()).hexdigest()   # the ONNX holds the weights: one model
    if key not in _MEMBERS:
        nodes, taps = layermap.onnx_nodes(model.graph), layermap.taps_of(reference)
        locations, graph_input = layermap.onnx_locations(fp32_path, reference), model.graph.input[0].name
        _MEMBERS[key] = (layermap.layer_members(nodes, locations, taps, graph_input),
                         layermap.layer_inputs(locations, taps, graph_input))
    members, inputs = _MEMBERS[key]
    missing = [k for k in keep_float if not members.get(k)]
    if missing:
        raise UlsamError(f"layer {missing[0]} was not found in {Path(fp32_path).name}")
    # The ReLU/Clip that writes a float layer's input stays a float node too: quantize_static folds an
    # activation into the Q/DQ range that follows it, which would leave the float layer reading the
    # convolution's output before its activation.
    producer = {out: node for node in model.graph.node for out in node.output}
    activations = [producer[inputs[k]].name for k in keep_float
                   if inputs[k] in producer and producer[inputs[k]].op_type in ("Relu", "Clip")]
    return [name for k in sorted(keep_float) for name in members[k]] + activations


def _float_inputs(model, float_nodes: set[str], fp32_model) -> None:
    """Feed the float nodes the unquantised tensors and drop Q/DQ pairs nothing reads any more.

    ``quantize_static`` leaves an excluded node reading the DequantizeLinear output of an input that
    a quantised neighbour shares: the layer would still see INT8-rounded inputs, and TensorRT would
    still quantise them. A weight shared with a quantised node (onnxsim merges equal constants, such as
    the spread convolutions of two ULSAMs of the same width) is read from the float model's copy."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    initialisers = {i.name for i in graph.initializer}
    originals = {i.name: i for i in fp32_model.graph.initializer}
    for node in graph.node:
        if node.name not in float_nodes:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in initialisers:
                node.input[i] = q.input[0]
            elif dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in initialisers:
                weight = dq.input[0].removesuffix("_quantized")
                if weight in originals:
                    if weight not in initialisers:
                        graph.initializer.append(originals[weight])
                        initialisers.add(weight)
                    node.input[i] = weight
    while True:   # a Q/DQ whose output nothing (and no graph output) reads any more
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in read for out in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
