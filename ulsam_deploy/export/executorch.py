"""The reference weights -> ExecuTorch programs (``.pte``) lowered to the XNNPACK delegate.

``torch.export`` (batch 1, what a phone runs) -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner ->
``to_executorch``. INT8 goes through PT2E first: the XNNPACK quantizer (int8 per-channel symmetric weights,
int8 per-tensor activations) annotates the exported graph, the calibration array of every other INT8 artifact
(NCHW, normalised - the model input) runs through the observers, ``convert_pt2e`` folds the ranges in.

ULSAM is traced in its ``spread`` form (:func:`ulsam_deploy.nets.ulsam.export_form`): all of it 4-D, so the
XNNPACK partitioner takes it whole (the broadcast form's ``unsqueeze`` of A to 5-D ran outside the delegate
and split the network into five delegated subgraphs). As in the TFLite recipe, ULSAM's attention path stays
float: the node filter leaves the softmax's pieces, the convolution that spreads ``1 + A`` over the channels
and the multiply ``x * (1 + A)`` of every ULSAM unannotated. (XNNPACK runs them inside the delegate and timed
an INT8 spread and multiply the same; ONNX Runtime, where they save layout changes, quantises them.)
The classifier (``nn.Linear``) stays float, so the logits are never clipped at the calibrated range, and so
do the ``keep_float`` paper layers with the op that writes each one's input (walked back through activations
and views to the op that computes it): otherwise the float layer would read a tensor rounded to INT8.
A convolution feeding a ReLU6 is calibrated on the clamped values (:func:`observe_after_clamps`), as TFLite
quantises after a fused activation.

Whatever the delegate does not take runs in ExecuTorch's portable kernels; the manifest entry records those
ops (``outside_delegate``, from ``executorch.devtools.backend_debug.get_delegation_info``).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UlsamError
from ..store.fileio import atomic_path
from . import FORMATS, quiet

CALIBRATION_BATCH = 16
# --calib-method -> the PT2E activation observer: min/max is the same rule as everywhere; PT2E ships no KL
# (entropy) or percentile observer, so both map to its histogram search (the range of least L2 error).
OBSERVERS = {"minmax": "MinMaxObserver", "entropy": "HistogramObserver", "percentile": "HistogramObserver"}
# ops that only shape, copy or activate a tensor: the float walk back from a float layer passes through them
_PASS_THROUGH = ("relu", "hardtanh", "clamp", "view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze",
                 "dropout", "clone", "max_pool2d")


def produce(name: str, manifest, target: Path, calib, keep_float: Sequence[int] = (),
            calib_method: str = "minmax") -> dict:
    """Write the ExecuTorch artifact ``name`` of ``manifest``'s reference weights to ``target``."""
    import torch

    from ..nets import load_model
    from ..nets.build import fold_batchnorm
    from ..nets.ulsam import export_form
    from ..store.manifest import REFERENCE, tool_versions

    # BatchNorm folded into the convolutions first: the program is the same (XNNPACK folds them, and PT2E
    # before quantising; bit-identical outputs), and the fp32 lowering takes half the time (13 s, not 28 s)
    model = fold_batchnorm(load_model(manifest.directory / REFERENCE).eval())
    size = manifest.spec.input_size
    example = (torch.zeros(1, 3, size, size),)
    used = {k: v for k, v in tool_versions().items() if k in ("executorch", "torchao")}
    details: dict = {"converter": "torch.export -> executorch.exir.to_edge_transform_and_lower (XnnpackPartitioner)",
                     "batch": 1, "versions": used}
    with _quiet_all(), export_form(model, "spread"):   # 4-D form: see ulsam_deploy.nets.ulsam
        if FORMATS[name].precision == "int8":
            graph, recipe = quantize(model, calib.images, calib_method, keep_float)
            details |= recipe
        else:
            graph = model
        exported = torch.export.export(graph, example)
        program, delegation = lower(exported)
    with atomic_path(target) as tmp:
        tmp.write_bytes(program.buffer)
    return details | delegation


def quantize(model, images: np.ndarray, method: str, keep_float: Sequence[int] = ()):
    """(the PT2E-converted module, its recipe record) of ``model`` calibrated on ``images`` (NCHW float32)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e import observer as observers
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if method not in OBSERVERS:
        raise UlsamError(f"calibration method {method!r} is unknown", f"choose one of {', '.join(OBSERVERS)}")
    batch = torch.export.Dim("batch", min=1, max=max(CALIBRATION_BATCH, 2))
    sample = torch.from_numpy(np.array(images[:2] if len(images) > 1 else np.repeat(images, 2, 0), np.float32))
    graph = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},)).module()
    float_nodes = float_node_names(graph, model, keep_float)
    observer = getattr(observers, OBSERVERS[method])
    config = get_symmetric_quantization_config(is_per_channel=True)
    activations = replace(config.input_activation, observer_or_fake_quant_ctr=observer.with_args(eps=2 ** -12))
    config = replace(config, input_activation=activations, output_activation=activations)

    def constructor(low, high):
        return clamped(observer, low, high).with_args(eps=2 ** -12)

    quantizer = clamp_aware_quantizer(constructor).set_global(config)
    quantizer.set_filter_function(lambda node: node.name not in float_nodes)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for start in range(0, len(images), CALIBRATION_BATCH):
            prepared(torch.from_numpy(np.array(images[start:start + CALIBRATION_BATCH], np.float32)))
    converted = convert_pt2e(prepared)
    recipe = {"quantizer": "XNNPACKQuantizer (PT2E): int8 per-channel symmetric weights, int8 per-tensor activations",
              "activation_observer": OBSERVERS[method], "relu6_outputs": "observed after the clamp",
              "per_channel": True, "attention_path": "float",
              "logits": "float", "classifier": "float", "keep_float": sorted(keep_float),
              "float_nodes": sorted(float_nodes), "calibration_layout": "NCHW, normalised (the model input)"}
    return converted, recipe


def clamp_aware_quantizer(constructor):
    """The XNNPACK quantizer with a ReLU6-fed convolution's output observed by ``constructor(low, high)`` on
    the clamped values (``observe_after_clamps``): post-training calibration and quantisation-aware training."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    class Quantizer(XNNPACKQuantizer):
        def annotate(self, gm):
            return observe_after_clamps(super().annotate(gm), constructor)

    return Quantizer()


def observe_after_clamps(gm, constructor):
    """Calibrate a convolution that feeds a ReLU6 on the clamped values; ``constructor(low, high)`` makes the
    observer (or fake quantiser, in quantisation-aware training) of such an output.

    The XNNPACK quantizer has no conv + hardtanh pattern: the convolution's output is observed before the
    clamp and ReLU6 shares its range, so MV2's activations would be quantised over the unclamped range (tens
    instead of 0-6, ten times coarser steps). TFLite quantises after the fused activation; this does the same."""
    import torch
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.hardtanh.default,
                                                            torch.ops.aten.hardtanh_.default):
            continue
        source = node.args[0]
        annotation = source.meta.get(Q_ANNOTATION_KEY) if isinstance(source, torch.fx.Node) else None
        if annotation is None or not isinstance(annotation.output_qspec, QuantizationSpec) or len(source.users) != 1:
            continue
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        annotation.output_qspec = replace(annotation.output_qspec, observer_or_fake_quant_ctr=constructor(low, high))
    return gm


def clamped(observer, low: float, high: float):
    """``observer`` seeing its input clamped to [low, high] (and passing the input on unchanged)."""
    class Clamped(observer):
        def forward(self, x):
            super().forward(x.detach().clamp(low, high))
            return x

    Clamped.__name__ = f"Clamped{observer.__name__}"
    return Clamped


# ULSAM's own ops after its two convolution blocks (both forms): the softmax's pieces, the convolution that
# spreads 1 + A over the channels, x*A (+ x)
_ATTENTION_OPS = ("mul", "add", "sub", "exp", "div", "amax", "sum", "conv2d")


def float_node_names(graph, model, keep_float: Sequence[int]) -> set[str]:
    """Names of the exported graph's nodes the quantizer must leave float (see the module docstring)."""
    from ..nets.ulsam import ULSAM

    ulsams = {name for name, module in model.named_modules() if isinstance(module, ULSAM)}
    layers = {f"features.{kind}{k}" for k in keep_float for kind in ("layer", "ulsam")}
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    keep: set[str] = set()
    in_layers: list = []
    for node in nodes:
        stack = _stack_of(node)
        innermost = stack[-1] if stack else ""
        op = _op(node)
        if (innermost in ulsams and op in _ATTENTION_OPS) or "classifier" in stack:
            keep.add(node.name)
        elif layers & set(stack):
            in_layers.append(node)
    keep |= {n.name for n in in_layers}
    # the op computing each float layer's input, through activations and views
    frontier = [arg for n in in_layers for arg in n.all_input_nodes
                if arg.op == "call_function" and arg.name not in keep]
    while frontier:
        node = frontier.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        if _op(node).startswith(_PASS_THROUGH):
            frontier += [a for a in node.all_input_nodes if a.op == "call_function"]
    missing = [k for k in keep_float if not any(f"features.layer{k}" in _stack_of(n) for n in nodes)]
    if missing:
        raise UlsamError(f"layer {missing[0]} was not found in the exported graph")
    return keep


def _op(node) -> str:
    """``aten.mul.Tensor`` -> ``mul``."""
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _stack_of(node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def lower(exported):
    """(the ExecuTorch program, its delegation record) of an exported program, lowered to XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    info = get_delegation_info(edge.exported_program().graph_module)
    # getitem only unpacks a delegate's outputs; every other node left outside runs in a portable kernel
    outside = {op: b.non_delegated for op, b in sorted(info.delegation_by_operator.items())
               if b.non_delegated and op != "getitem"}
    record = {"delegate": "XnnpackBackend", "delegated_subgraphs": info.num_delegated_subgraphs,
              "delegated_nodes": info.num_delegated_nodes, "outside_delegate": outside}
    return edge.to_executorch(), record


@contextlib.contextmanager
def _quiet_all():
    """torchao logs at import that its CUDA kernels are absent; the lowering warns per op. Keep the CLI clean."""
    from ..runtime.base import quiet_fd2

    with quiet(), quiet_fd2():
        yield
