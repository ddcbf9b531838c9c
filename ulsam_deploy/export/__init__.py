"""Artifact producers and the layer map (which graph nodes belong to which paper layer); the format table
itself lives in ``ulsam_deploy.formats``. Producers are imported only when their format is asked for."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from ..errors import UlsamError
from ..formats import (CPU_FORMATS, DEFAULT_FORMATS, FORMATS, KEEP_FLOAT_FORMATS, Format,  # noqa: F401
                       parse_formats)


# Bumped whenever a producer's output changes, so that `export` rebuilds artifacts made by an older recipe.
# 3: INT8 logits no longer quantised (no clipping at the calibrated range); TFLite entries record their taps.
# 4: TFLite and ONNX files carry their preprocessing, class names and description (export/describe.py).
# 5: ULSAM in each target's export form (ONNX and ExecuTorch: spread, TFLite: spatial); INT8 quantises the
#    spread convolution and x * (1 + A) (export/quantize.py).
# 6: onnx-int8 with 7-bit weights, exact on every CPU (8-bit weights: onnx-int8-vnni); ONNX INT8 entries
#    record their encoding, the instruction sets it is exact on and a saturation audit (export/saturation.py).
RECIPE = "6"


def parse_keep_float(text: str) -> tuple[int, ...]:
    """``"1, 2,13"`` -> (1, 2, 13): paper layer numbers, checked against the model by :func:`check_keep_float`."""
    layers: list[int] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token.isascii() or not token.isdigit():
            raise UlsamError(f"--keep-float {text!r}: {token!r} is not a paper layer number",
                             "pass e.g. 1,2,13 or auto")
        layers.append(int(token))
    return tuple(sorted(set(layers)))


def check_keep_float(layers: tuple[int, ...], spec) -> None:
    """Refuse layer numbers the model does not have (MobileNet-V1: 1-14, MobileNet-V2: 1-19)."""
    last = len(spec.layers)
    for layer in layers:
        if not 1 <= layer <= last:
            raise UlsamError(f"--keep-float {layer} is not a layer of {spec.arch.upper()} (1-{last})")


@contextlib.contextmanager
def quiet():
    """The exporter logs progress and warnings about optional torchvision ops; keep the CLI clean."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
