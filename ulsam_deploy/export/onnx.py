"""PyTorch -> ONNX: the dynamo exporter, dynamic batch, onnxsim, full checker and shape inference.

The dynamo exporter (``dynamo=True``) gives a graph without the Shape/Slice/Concat noise of the
deprecated TorchScript exporter; ``external_data=False`` keeps the weights inside the one file.
"""

from __future__ import annotations

import collections
import copy
from pathlib import Path

import torch

from ..errors import UlsamError
from ..store.fileio import atomic_path
from . import quiet

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_BATCH = 1024


def op_counts(model) -> dict[str, int]:
    return dict(sorted(collections.Counter(node.op_type for node in model.graph.node).items()))


def export_onnx(model: torch.nn.Module, input_size: int, path: Path) -> dict:
    """Write the simplified, checked ONNX of ``model`` (eval mode) to ``path``; return graph details."""
    from ..store.onnxcache import cached_export, network_key

    model = model.eval()
    try:
        key = network_key(model, input_size, OPSET)
    except (RuntimeError, TypeError, ValueError):   # a tensor it cannot read as bytes: no cache
        key = None
    return cached_export(key, Path(path), lambda target: _export(model, input_size, target))


def _export(model: torch.nn.Module, input_size: int, path: Path) -> dict:
    import onnx
    from onnxsim import simplify

    from ..nets.build import fold_batchnorm

    # onnxsim folds every BatchNorm into its convolution anyway; folded first, the exporter traces a third
    # fewer nodes (about 2 s a model at 112 px). The caller's model is copied, never changed.
    model = fold_batchnorm(copy.deepcopy(model))
    example = (torch.zeros(2, 3, input_size, input_size),)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with atomic_path(path) as tmp, quiet():
        torch.onnx.export(model, example, str(tmp), dynamo=True, external_data=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                          verbose=False, optimize=True)
        exported = onnx.load(str(tmp))
        before = op_counts(exported)
        simplified, ok = simplify(exported)
        if not ok:
            raise UlsamError("onnxsim could not validate the simplified graph against the exported one")
        simplified = onnx.shape_inference.infer_shapes(simplified, check_type=True, strict_mode=True)
        onnx.checker.check_model(simplified, full_check=True)
        onnx.save(simplified, str(tmp))
    after = op_counts(simplified)
    return {"exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}", "opset": OPSET,
            "nodes_before_simplify": sum(before.values()), "nodes_after_simplify": sum(after.values()),
            "ops_before_simplify": before, "ops_after_simplify": after,
            "input": INPUT_NAME, "output": OUTPUT_NAME, "dynamic_batch": True}
