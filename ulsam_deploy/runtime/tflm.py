"""TFLite Micro Runner: a full-integer TFLite file run by TensorFlow Lite for Microcontrollers' reference kernels
(the ``tflite-micro`` package's Python interpreter), as a microcontroller without an NPU runs it.

TFLite Micro plans one static arena for batch 1: a batch is run image by image. INT8 input and output are
(de)quantised here with the file's own parameters; NCHW -> NHWC as in the LiteRT runner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputFileError
from .base import quiet_fd2


class TFLiteMicroRunner:
    def __init__(self, path: Path, precision: str = "int8", threads: int = 0, **options):
        from tflite_micro.python.tflite_micro import runtime

        try:
            with quiet_fd2():        # the interpreter prints a kernel's refusal to fd 2 before raising
                self.interpreter = runtime.Interpreter.from_file(str(path))
        except (RuntimeError, ValueError) as exc:
            raise InputFileError(f"TFLite Micro cannot load {Path(path).name}: {str(exc).splitlines()[0][:200]}",
                                 "it runs full-integer files whose ops it has in INT8 (tflite-int8-mcu)") from None
        self.input = self.interpreter.get_input_details(0)
        self.output = self.interpreter.get_output_details(0)
        self.name = f"tflm-{precision}"

    @staticmethod
    def _params(details: dict) -> tuple[float, int]:
        quant = details["quantization_parameters"]
        return float(quant["scales"][0]), int(quant["zero_points"][0])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(batch, np.float32).transpose(0, 2, 3, 1))
        dtype = self.input["dtype"]
        if dtype != np.float32:
            scale, zero = self._params(self.input)
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        out = []
        for image in x:
            self.interpreter.set_input(image[None], 0)
            self.interpreter.invoke()
            out.append(np.array(self.interpreter.get_output(0), copy=True))
        y = np.concatenate(out)
        if y.dtype != np.float32:
            scale, zero = self._params(self.output)
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def close(self) -> None:
        self.interpreter = None
