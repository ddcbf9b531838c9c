"""Where each paper layer lives inside an artifact: the one mapping from the eager model's module
names (``features.layer13``, ``features.ulsam8``) to ONNX tensor/node names and TFLite tensor/op names.

Neither graph keeps the module names: onnxsim drops the dynamo exporter's name-scope metadata, and
onnx2tf names tensors after its own Keras layers. So a tap is located by value: the float graph is run
once on a small batch, with every intermediate tensor exposed, and each eager tap (a layer's output, a
ULSAM's attention map) is matched to the first tensor in graph order that holds the same values (in the
same or the NHWC layout). Quantised graphs keep the float graph's tensor names (ONNX Runtime's Q/DQ
insertion; the TFLite converter's names up to the first ``;``), so the float mapping serves them too.
The members of a layer (the nodes between its input and its output tensor) follow from the taps.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

MATCH_RTOL = 1e-3       # float graphs agree with eager to ~1e-5 relative; anything else is another tensor


@dataclass(frozen=True)
class Tap:
    """One observed tensor of the network, in network order."""

    key: str          # "layer13", "layer13.attention", "ulsam8", "logits"
    label: str        # "13", "13 attn", "8:1", "8:1 attn", "logits"
    layer: int        # paper layer number (an inserted 'k:1' ULSAM counts as layer k)
    kind: str         # "output", "attention" or "logits"
    ulsam: bool       # the layer is, or is followed by, a ULSAM


def taps_of(model) -> list[Tap]:
    """Every paper layer's output and every ULSAM attention map, in network order, then the logits."""
    from ..nets.ulsam import ULSAM

    taps = []
    for name, module in model.features.named_children():
        inserted = name.startswith("ulsam")
        number = int(name.removeprefix("ulsam" if inserted else "layer"))
        label = f"{number}:1" if inserted else str(number)
        is_ulsam = isinstance(module, ULSAM)
        if is_ulsam:
            taps.append(Tap(f"{name}.attention", f"{label} attn", number, "attention", True))
        taps.append(Tap(name, label, number, "output", is_ulsam))
    return taps + [Tap("logits", "logits", taps[-1].layer + 1, "logits", False)]


def eager_taps(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """The eager fp32 values of every tap for ``images`` (NCHW), by tap key; attention maps (N, g, H, W)."""
    import torch

    from ..nets.ulsam import ULSAM

    values: dict[str, np.ndarray] = {}

    def hook(name):
        def record(module, inputs, output):
            values[name] = output.detach().numpy().copy()
            if isinstance(module, ULSAM):   # the same call the forward made, on the same input
                values[f"{name}.attention"] = module.attention(inputs[0]).detach().numpy().copy()
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.features.named_children()]
    try:
        with torch.inference_mode():
            values["logits"] = model.eval()(torch.from_numpy(np.ascontiguousarray(images, np.float32))).numpy()
    finally:
        for handle in handles:
            handle.remove()
    return values


def probe_sample(input_size: int, count: int = 2) -> np.ndarray:
    """A fixed input for locating taps: any input works (values only have to tell tensors apart)."""
    return np.random.default_rng(0).normal(size=(count, 3, input_size, input_size)).astype(np.float32)


def _layouts(array: np.ndarray, reference: np.ndarray) -> Iterable[tuple[list[int] | None, np.ndarray]]:
    """The ways a tensor may hold ``reference``'s values: as stored, or channels-last (NHWC, (N, HW, g))."""
    if array.size != reference.size:
        return
    yield None, array.reshape(reference.shape)
    if array.ndim == 4 and array.shape[0] == reference.shape[0]:
        yield [0, 3, 1, 2], array.transpose(0, 3, 1, 2).reshape(reference.shape)
    if array.ndim == 3 and array.shape[0] == reference.shape[0]:
        yield [0, 2, 1], array.transpose(0, 2, 1).reshape(reference.shape)


def match(eager: dict[str, np.ndarray], tensors: Sequence[tuple[str, np.ndarray]]) -> dict[str, dict]:
    """``{tap key: {"tensor": name, "perm": axes or None}}``: the first tensor (graph order) equal to each tap."""
    found: dict[str, dict] = {}
    for key, reference in eager.items():
        scale = float(np.abs(reference).max()) or 1.0
        for name, array in tensors:
            hit = next((perm for perm, view in _layouts(array, reference)
                        if np.abs(view.astype(np.float64) - reference).max() <= MATCH_RTOL * scale), False)
            if hit is not False:
                found[key] = {"tensor": name, "perm": hit}
                break
    return found


def to_eager_layout(array: np.ndarray, location: dict, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor read from an artifact, in the eager tap's layout ``shape`` (batch first)."""
    if location.get("perm"):
        array = array.transpose(location["perm"])
    return np.ascontiguousarray(array).reshape(shape)


def layer_members(nodes: Sequence[tuple[str, Sequence[str], Sequence[str]]], locations: dict[str, dict],
                  taps: Sequence[Tap], graph_input: str) -> dict[int, list[str]]:
    """Paper layer -> names of its nodes: everything that computes the layer's output from its input.

    ``nodes`` are (name, inputs, outputs) in graph order. Each layer's output tensor is walked back
    until the previous layer's output (or the graph input); a node claimed by an earlier layer stays there.
    """
    producer = {out: (name, inputs) for name, inputs, outputs in nodes for out in outputs}
    members: dict[int, list[str]] = {}
    claimed: set[str] = set()
    previous = graph_input
    for tap in taps:
        if tap.kind != "output" or tap.key not in locations:
            continue
        end = locations[tap.key]["tensor"]
        stack, seen = [end], {previous}
        found: list[str] = []
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor not in producer:
                continue
            seen.add(tensor)
            name, inputs = producer[tensor]
            if name in claimed:
                continue
            claimed.add(name)
            found.append(name)
            stack.extend(inputs)
        members.setdefault(tap.layer, []).extend(found)
        previous = end
    return members


def layer_inputs(locations: dict[str, dict], taps: Sequence[Tap], graph_input: str) -> dict[int, str]:
    """Paper layer -> the tensor it reads: the previous layer's output (the graph input for layer 1)."""
    inputs: dict[int, str] = {}
    previous = graph_input
    for tap in taps:
        if tap.kind == "output" and tap.key in locations:
            inputs.setdefault(tap.layer, previous)
            previous = locations[tap.key]["tensor"]
    return inputs


# --- ONNX ----------------------------------------------------------------------------------------
def onnx_locations(onnx_path: Path, model) -> dict[str, dict]:
    """Tap key -> tensor of the float ONNX, found with ONNX Runtime's own activation dump."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    sample = probe_sample(model.spec.input_size)
    graph = onnx.load(str(onnx_path)).graph

    class OneBatch(CalibrationDataReader):
        def __init__(self):
            self.feeds = [{graph.input[0].name: sample}]

        def get_next(self):
            return self.feeds.pop() if self.feeds else None

    with tempfile.TemporaryDirectory(prefix="ulsam-taps-") as work:
        augmented = str(Path(work) / "all-tensors.onnx")
        modify_model_output_intermediate_tensors(str(onnx_path), augmented)
        dumped = collect_activations(augmented, OneBatch())
    order = [out for node in graph.node for out in node.output if out in dumped]
    located = match(eager_taps(model, sample), [(name, dumped[name][0]) for name in order])
    producer = {out: node.op_type for node in graph.node for out in node.output}
    for where in located.values():    # the quantiser may fold a Relu/Clip away: the probe checks this
        where["op"] = producer.get(where["tensor"])
    return located


def onnx_nodes(graph) -> list[tuple[str, list[str], list[str]]]:
    return [(node.name, list(node.input), list(node.output)) for node in graph.node]


RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")   # ops that move no value


def onnx_consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it, in graph order."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def through_reshapes(tensor: str, consumers: dict[str, list]) -> list[str]:
    """``tensor``, then each reshape of it while a reshape is the only reader: the same values throughout
    (the softmax's (N, g, H*W) and the (N, g, H, W) after it)."""
    names = [tensor]
    while len(consumers.get(names[-1], [])) == 1 and consumers[names[-1]][0].op_type in RESHAPES:
        names.append(consumers[names[-1]][0].output[0])
    return names


# --- TFLite --------------------------------------------------------------------------------------
def tensor_key(name: str) -> str:
    """A TFLite op output's name without its last ``;`` part: the same in the float and the quantised
    model. A fused op's name ends with its folded constant's name, which quantisation renames
    (``.../Add/y1`` becomes ``Const_951``)."""
    parts = name.split(";")
    return ";".join(parts[:-1]) if len(parts) > 1 else name


def tflite_graph(interpreter) -> tuple[list[tuple[str, list[str], list[str]]], str]:
    """(ops as (output key, input keys, output keys), graph input key) of a LiteRT interpreter."""
    names = {d["index"]: tensor_key(d["name"]) for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()   # no public API lists an op's input and output tensors
    nodes = [(names[op["outputs"][0]], [names[i] for i in op["inputs"] if i >= 0], [names[o] for o in op["outputs"]])
             for op in ops if op["outputs"]]
    return nodes, names[interpreter.get_input_details()[0]["index"]]


def tflite_locations(tflite_path: Path, model) -> dict[str, dict]:
    """Tap key -> tensor key of a float TFLite model, read with LiteRT's preserved intermediate tensors
    (no delegate: XNNPACK would compute the float graph in its own buffers)."""
    from ai_edge_litert.interpreter import OpResolverType

    from ..runtime.litert import open_interpreter

    sample = probe_sample(model.spec.input_size)
    interpreter = open_interpreter(
        tflite_path, experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], [len(sample), *detail["shape"][1:]], strict=False)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], np.ascontiguousarray(sample.transpose(0, 2, 3, 1)))
    interpreter.invoke()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    tensors = []
    for op in interpreter._get_ops_details():
        for index in op["outputs"]:
            d = details[index]
            if d["dtype"] == np.float32:
                tensors.append((tensor_key(d["name"]), interpreter.get_tensor(index)))
    return match(eager_taps(model, sample), tensors)
