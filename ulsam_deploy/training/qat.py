"""Quantisation-aware fine-tuning (``train --qat``): the repair path of the full-integer formats.

An NPU or a microcontroller runs every op in INT8, so ``--keep-float`` has nothing to keep. Instead the
trained model is fine-tuned with the quantisation simulated in its forward pass (PT2E: ``torch.export`` in
training mode, ``prepare_qat_pt2e`` with the XNNPACK quantizer in its QAT configuration), so that its weights
and BatchNorm statistics settle where INT8 rounding costs least:

- weights: int8 per-channel symmetric, computed from the convolution with its BatchNorm folded in (the
  quantizer simulates the fold), as the TFLite converter quantises the folded convolution;
- activations: int8 per-tensor asymmetric, fake-quantised on moving-average min/max ranges; a convolution
  feeding a ReLU6 is quantised on the clamped values, as TFLite quantises after a fused activation;
- ULSAM traced in its ``npu`` form (log-sum-exp, no DIV), the form of ``tflite-int8-npu``; its exponent,
  logarithm and sums stay float in the simulation (the quantizer annotates no such ops).

The fine-tuned float weights are written back into the model, which is saved as any trained model; the
full-integer export calibrates its activation ranges on the calibration set as for post-training INT8 (the
TFLite converter takes no ranges from outside), now on weights that were trained under INT8 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nets import MobileNet
from ..nets.ulsam import export_form

FORM = "npu"          # ULSAM's export form the simulation traces
RECIPE = ("PT2E prepare_qat_pt2e, XNNPACK quantizer (QAT): int8 per-channel symmetric weights with BatchNorm "
          "folded, int8 per-tensor activations (moving-average min/max; ReLU6 outputs after the clamp), ULSAM in "
          f"its {FORM} form")


class QatNet(nn.Module):
    """``model`` with fake quantisation; ``train()``/``eval()`` switch the exported graph's BatchNorm and
    dropout as they would the module's. ``spec`` is the model's."""

    def __init__(self, model: MobileNet, graph: torch.fx.GraphModule):
        super().__init__()
        self.graph = graph
        self.spec = model.spec
        self.keys = tuple(model.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "QatNet":
        from torchao.quantization.pt2e import (disable_observer, enable_observer, move_exported_model_to_eval,
                                               move_exported_model_to_train)

        # the switch traces its patterns on random example inputs: the training's random stream must not see it
        with torch.random.fork_rng(devices=[]):
            (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        # ranges are learned on training batches only, never on what the model is evaluated on
        self.graph.apply(enable_observer if mode else disable_observer)
        self.training = mode
        return self

    def write_back(self, model: MobileNet) -> MobileNet:
        """Copy the fine-tuned weights and BatchNorm statistics into ``model`` (same names)."""
        state = self.graph.state_dict()
        model.load_state_dict({key: state[key].detach().clone() for key in self.keys})
        return model


def prepare(model: MobileNet, sample: torch.Tensor) -> QatNet:
    """``model`` (trained, on CPU) ready for quantisation-aware training; ``sample`` is a batch of inputs."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from ..export import quiet
    from ..export.executorch import clamp_aware_quantizer

    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
    quantizer = clamp_aware_quantizer(lambda low, high: _clamped_fake_quant(config, low, high)).set_global(config)

    model.train()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with quiet(), export_form(model, FORM):
        graph = torch.export.export(model, (sample.contiguous(),), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_qat_pt2e(graph, quantizer)
    return QatNet(model, prepared).train()


def _clamped_fake_quant(config, low: float, high: float):
    """The QAT activation fake quantiser, its moving-average observer seeing values clamped to [low, high]
    (the fused fake quantiser observes inside its kernel, so the unfused one carries the clamped observer)."""
    from torchao.quantization.pt2e import FakeQuantize, MovingAverageMinMaxObserver

    from ..export.executorch import clamped

    spec = config.output_activation
    return FakeQuantize.with_args(observer=clamped(MovingAverageMinMaxObserver, low, high), eps=2 ** -12,
                                  quant_min=spec.quant_min, quant_max=spec.quant_max, dtype=spec.dtype,
                                  qscheme=spec.qscheme)
