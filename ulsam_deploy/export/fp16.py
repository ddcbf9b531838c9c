"""FP32 ONNX -> FP16 ONNX with float32 graph inputs and outputs: the source of the TensorRT FP16 engine.

TensorRT 11 builds strongly typed networks only (no FP16 builder flag), so an FP16 engine needs an
ONNX whose tensors already are float16. Float initializers become float16 (saturated at +-65504);
Cast nodes convert at the float32 graph inputs/outputs and around the nodes kept in float32 -
by default ULSAM's attention path (Softmax -> Reshape -> Mul -> Add), whose weights over 16-196
positions are small numbers summed with the identity.

ONNX Runtime's CPU provider runs this file too, but has float16 kernels for few ops (1.31 on x86:
Clip, Reshape, and Relu through its Max function body); for the rest (Conv, Add, Mul, MaxPool,
Softmax, ReduceMean, GlobalAveragePool, Gemm) it inserts its own Casts at session creation and
computes in float32 (and may then run Clip in float32 too, to save Cast pairs). So ORT parity checks
the float16 rounding of the weights and of the tensors between ops, not float16 arithmetic; the file
stays fully float16, as TensorRT needs it, rather than baking one runtime's gaps into the artifact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UlsamError
from ..store.fileio import atomic_path

FP16_MAX = float(np.finfo(np.float16).max)
_SUFFIX = {True: "__fp16", False: "__fp32"}     # names of Casts and of initializer copies, by target


def to_fp16_onnx(src: Path, dst: Path, keep_float: list[str]) -> dict:
    """Write the float16 version of ``src`` to ``dst``; nodes named in ``keep_float`` stay float32.

    Returns details for the manifest: kept nodes, Cast count, initializers converted and saturated.
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)), strict_mode=True)
    graph = model.graph
    seen: set[str] = set()
    for i, node in enumerate(graph.node):   # precision is looked up by node name: make names unique
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}__{i}"
        seen.add(node.name)
    unknown = sorted(set(keep_float) - seen)
    if unknown:
        raise UlsamError(f"nodes to keep in float32 are not in {Path(src).name}: {', '.join(unknown[:5])}")
    half = {node.name: node.name not in keep_float for node in graph.node}
    floats = _float_tensors(graph)
    inits = {init.name: init for init in graph.initializer if init.name in floats}
    outputs = _rename_half_outputs(graph, half, floats)
    saturated = _convert_initializers(graph, inits, half)
    nodes, casts = [], {}
    is_half = {vi.name: False for vi in graph.input}     # float tensor -> produced in float16?
    for node in graph.node:
        _retype_node(node, half[node.name])
        for i, name in enumerate(node.input):
            if name in is_half and is_half[name] != half[node.name]:
                node.input[i] = _cast(name, half[node.name], casts, nodes)
        nodes.append(node)
        is_half |= {out: half[node.name] for out in node.output if out in floats}
    nodes += [onnx.helper.make_node("Cast", [inner], [outer], name=f"{outer}__to_fp32", to=onnx.TensorProto.FLOAT)
              for outer, inner in outputs]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise UlsamError(f"the float16 graph of {Path(src).name} is inconsistent: {first}") from None
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return {"converter": "ulsam_deploy.export.fp16 (onnx + numpy)", "io": "float32",
            "float_nodes": list(keep_float), "casts": len(casts) + len(outputs),
            "initializers_fp16": sum(1 for init in model.graph.initializer
                                     if init.data_type == onnx.TensorProto.FLOAT16),
            "values_saturated": saturated}


def _float_tensors(graph) -> set[str]:
    """Names of every float32 tensor: graph inputs, initializers, and (inferred) node outputs."""
    from onnx import TensorProto

    typed = list(graph.input) + list(graph.value_info) + list(graph.output)
    names = {vi.name for vi in typed if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    names |= {init.name for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    known = {vi.name for vi in typed}
    missing = [out for node in graph.node for out in node.output if out and out not in known]
    if missing:   # a float tensor of unknown type could not be cast correctly
        raise UlsamError(f"shape inference left {len(missing)} tensors untyped, e.g. {missing[0]}")
    return names


def _rename_half_outputs(graph, half: dict, floats: set[str]) -> list[tuple[str, str]]:
    """Graph outputs produced in float16 get an inner name; a final Cast restores the float32 name."""
    producers = {out: node for node in graph.node for out in node.output}
    renamed = []
    for output in graph.output:
        node = producers.get(output.name)
        if node is None or output.name not in floats or not half[node.name]:
            continue
        inner = output.name + _SUFFIX[True]
        for other in graph.node:
            other.input[:] = [inner if name == output.name else name for name in other.input]
            other.output[:] = [inner if name == output.name else name for name in other.output]
        floats.add(inner)
        renamed.append((output.name, inner))
    return renamed


def _convert_initializers(graph, inits: dict, half: dict) -> int:
    """Float16 initializers for float16 consumers: in place if no float32 node reads them, else a copy.

    Returns how many values lay beyond the float16 range and were saturated.
    """
    from onnx import numpy_helper

    consumers: dict[str, set[bool]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                consumers.setdefault(name, set()).add(half[node.name])
    saturated = 0
    for name, kinds in consumers.items():
        if True not in kinds:
            continue
        values = numpy_helper.to_array(inits[name])
        saturated += int((np.abs(values) > FP16_MAX).sum())
        converted = numpy_helper.from_array(np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16), name)
        if False in kinds:   # shared with a float32 node (Clip bounds, say): keep both
            converted.name = name + _SUFFIX[True]
            graph.initializer.append(converted)
            for node in graph.node:
                if half[node.name]:
                    node.input[:] = [converted.name if n == name else n for n in node.input]
        else:
            inits[name].CopyFrom(converted)
    return saturated


def _retype_node(node, to_half: bool) -> None:
    """Type-carrying attributes follow the node's precision: Cast's ``to``, Constant's ``value``."""
    from onnx import TensorProto, numpy_helper

    if not to_half:
        return
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))


def _cast(name: str, to_half: bool, casts: dict, nodes: list) -> str:
    """``name`` in the consumer's precision; one Cast per tensor and direction, placed at its first use."""
    key = (name, to_half)
    if key not in casts:
        from onnx import TensorProto, helper

        out = name + _SUFFIX[to_half]
        nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}__cast",
                                      to=TensorProto.FLOAT16 if to_half else TensorProto.FLOAT))
        casts[key] = out
    return casts[key]
