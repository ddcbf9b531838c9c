"""Can an INT8 ONNX overflow ONNX Runtime's 16-bit pair sums? An audit from the artifact's weights alone.

On x86 without VNNI (AVX2, and AVX-512F/BW without VNNI) ONNX Runtime's u8 x s8 convolution and GEMM
kernels multiply with VPMADDUBSW: the products of two unsigned 8-bit activation codes and two signed 8-bit
weight codes are added in one signed 16-bit lane, which saturates at -32768 and 32767. VNNI (VPDPBUSD),
AMX and ARM's dot-product instructions accumulate in 32 bits and cannot. Whether a layer can saturate is
decided by its weights: with activation codes anywhere in [0, 255], a pair of weights w1, w2 reaches
``255 * (max(w1, 0) + max(w2, 0))`` and ``-255 * (max(-w1, 0) + max(-w2, 0))``.

The audit pairs the two largest positive (and the two largest negative) weights of each output channel,
not only the neighbours of one packing order, so its verdict holds for every layout the runtime chooses
(im2col in NCHW or NHWC, depthwise, GEMM) and on every CPU: a layer it passes cannot saturate anywhere.
Weights of 7 bits ([-64, 64]) never can: 255 * 128 = 32640.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

INT16_MAX, INT16_MIN = 32767, -32768
CODE_SPAN = 255          # activation codes seen by the kernel: uint8, or int8 shifted by 128
RULE = ("VPMADDUBSW pair bound: any two weights of one output channel, activation codes in [0, 255], "
        "sum within int16")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerAudit:
    node: str
    op: str                # "conv", "depthwise", "gemm"
    channels: int          # output channels
    at_risk: int           # output channels with a pair that can leave int16
    worst: int             # largest |pair sum| the weights allow (int16: 32767 up, 32768 down)

    @property
    def overflows(self) -> bool:
        return self.at_risk > 0


@dataclass
class SaturationAudit:
    layers: list[LayerAudit] = field(default_factory=list)
    weight_bits: int = 8          # the widest weight range seen: 7 when every code lies in [-64, 64]

    @property
    def overflows(self) -> bool:
        return any(layer.overflows for layer in self.layers)

    @property
    def worst(self) -> int:
        return max((layer.worst for layer in self.layers), default=0)

    def at_risk(self) -> list[LayerAudit]:
        return [layer for layer in self.layers if layer.overflows]

    def summary(self) -> dict:
        """What the manifest records: the rule, the verdict, the margin and the layers at risk."""
        risky = self.at_risk()
        return {"rule": RULE, "int8_layers": len(self.layers), "weight_bits": self.weight_bits,
                "worst_pair": self.worst, "limit": INT16_MAX, "overflow_possible": bool(risky),
                "layers_at_risk": [asdict(layer) for layer in risky]}


def pair_bounds(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (axis 0): the largest and the smallest a1*w1 + a2*w2 with activation codes in [0, 255]."""
    flat = codes.reshape(codes.shape[0], -1).astype(np.int64)
    top_pos = np.sort(np.maximum(flat, 0), axis=1)[:, -2:].sum(axis=1)
    top_neg = np.sort(np.maximum(-flat, 0), axis=1)[:, -2:].sum(axis=1)
    return CODE_SPAN * top_pos, -CODE_SPAN * top_neg


def audit_model(model) -> SaturationAudit:
    """Audit every convolution and GEMM whose activation input and weight are both 8-bit Q/DQ."""
    from onnx import numpy_helper

    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    audit = SaturationAudit(weight_bits=7)
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        act, weight = producer.get(node.input[0]), producer.get(node.input[1])
        if not (_is_dq(act) and _is_dq(weight)) or weight.input[0] not in init or act.input[0] in init:
            continue        # a float layer (keep_float, the logits) or not Q/DQ at all: no integer kernel
        codes = numpy_helper.to_array(init[weight.input[0]])
        if codes.dtype != np.int8:
            continue        # u8 weights (U8U8) run through kernels without the 16-bit pair sum
        op = "gemm"
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            codes = codes if trans_b else codes.T
        elif node.op_type == "MatMul":
            codes = codes.T
        else:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            op = "depthwise" if group > 1 and codes.shape[1] == 1 else "conv"
        high, low = pair_bounds(codes)
        if codes.size and (codes.min() < -64 or codes.max() > 64):
            audit.weight_bits = 8
        risky = (high > INT16_MAX) | (low < INT16_MIN)
        worst = max(int(high.max(initial=0)), int(-low.min(initial=0)))
        audit.layers.append(LayerAudit(node.name, op, int(codes.shape[0]), int(risky.sum()), worst))
    if not audit.layers:
        audit.weight_bits = 8
    return audit


def audit_file(path: Path) -> SaturationAudit:
    import onnx

    return audit_model(onnx.load(str(path)))


def _is_dq(node) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"
