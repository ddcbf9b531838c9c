"""The artifact formats: each user-facing name with its file, precision and the backend that runs it.

Below both the producers (``export``) and the export directory's schema (``store``), which both need the
names and files and nothing else of each other.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .errors import UlsamError


@dataclass(frozen=True)
class Format:
    name: str
    filename: str
    precision: str
    backend: str
    needs: tuple[str, ...] = ()     # formats that must exist first
    calibrated: bool = False


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", "model.onnx", "fp32", "onnxruntime"),
    Format("onnx-int8", "model.int8.onnx", "int8", "onnxruntime", ("onnx",), calibrated=True),
    Format("onnx-int8-vnni", "model.int8.vnni.onnx", "int8", "onnxruntime", ("onnx",), calibrated=True),
    Format("onnx-int8-trt", "model.int8.trt.onnx", "int8", "onnxruntime", ("onnx",), calibrated=True),
    Format("tflite-fp32", "model_fp32.tflite", "fp32", "litert", ("onnx",)),
    Format("tflite-fp16", "model_fp16.tflite", "fp16", "litert", ("onnx",)),
    Format("tflite-int8", "model_int8.tflite", "int8", "litert", ("onnx",), calibrated=True),
    Format("tflite-int8-plain", "model_int8_plain.tflite", "int8", "litert", ("onnx",), calibrated=True),
    Format("tflite-int8-npu", "model_int8_npu.tflite", "int8", "litert", ("onnx",), calibrated=True),
    Format("tflite-int8-mcu", "model_int8_mcu.tflite", "int8", "tflm", ("onnx",), calibrated=True),
    Format("trt-fp16", "model_fp16.engine", "fp16", "tensorrt", ("onnx",)),
    Format("trt-int8", "model_int8.engine", "int8", "tensorrt", ("onnx-int8-trt",), calibrated=True),
    Format("executorch-fp32", "model_fp32.pte", "fp32", "executorch"),
    Format("executorch-int8", "model_int8.pte", "int8", "executorch", calibrated=True),
)}
CPU_FORMATS = ("onnx", "onnx-int8", "tflite-fp32", "tflite-fp16", "tflite-int8")
# Built only on request: the plain full-integer TFLite (attention in INT8 too), for comparison, the
# symmetric Q/DQ ONNX that TensorRT builds from (ONNX Runtime runs it correctly but slowly on x86), and the
# 8-bit-weight ONNX Runtime INT8, exact only on CPUs whose integer kernels accumulate in 32 bits; and the
# full-integer TFLite for Arm Ethos-U NPUs (ULSAM in its `npu` form), compiled by Vela beside it; and the
# full-integer TFLite for microcontrollers without an NPU (ULSAM's softmax as the SOFTMAX op, which TFLite
# Micro has in INT8; it has no INT8 EXP), run by TFLite Micro.
DEFAULT_FORMATS = ("onnx", "onnx-int8")



# The INT8 formats whose recipe honours `export --keep-float` (the plain TFLite model is the converter's
# untouched full-integer baseline, kept for comparison).
KEEP_FLOAT_FORMATS = ("onnx-int8", "onnx-int8-vnni", "onnx-int8-trt", "tflite-int8", "trt-int8", "executorch-int8")
EXECUTORCH_FORMATS = ("executorch-fp32", "executorch-int8")
NPU_FORMATS = ("tflite-int8-npu",)
TFLITE_BACKENDS = ("litert", "tflm")    # backends whose artifacts are TFLite files


# The x86 features that decide whether ONNX Runtime's u8 x s8 kernels are exact (VNNI accumulates in 32 bits,
# the rest add two products in 16): what a manifest's ``isa`` may name (runtime/isa.py reads the host's).
ISA_FEATURES = ("AVX2", "AVX512F", "AVX512BW", "AVX512VNNI")


def cpu_formats() -> tuple[str, ...]:
    """What ``--formats cpu`` means: CPU_FORMATS, and the ExecuTorch formats when the executorch extra is
    installed (asked of the import system, without importing it)."""
    return CPU_FORMATS + (EXECUTORCH_FORMATS if importlib.util.find_spec("executorch") is not None else ())


def parse_formats(text: str) -> tuple[str, ...]:
    """``"onnx,tflite-int8"`` -> ordered tuple with dependencies first; ``all``/``cpu`` expand."""
    names: list[str] = []
    for raw in text.split(","):
        token = raw.strip().lower()
        if not token:
            raise UlsamError(f"empty format in {text!r}", f"choose from {', '.join(FORMATS)}")
        expanded = {"all": tuple(FORMATS), "cpu": cpu_formats(), "tflite": CPU_FORMATS[2:],
                    "trt": ("trt-fp16", "trt-int8"), "executorch": EXECUTORCH_FORMATS}.get(token, (token,))
        for name in expanded:
            if name not in FORMATS:
                raise UlsamError(f"format {name!r} is unknown", f"choose from {', '.join(FORMATS)}, cpu or all")
            if name not in names:
                names.append(name)
    ordered: list[str] = []

    def add(name: str) -> None:
        for dep in FORMATS[name].needs:
            add(dep)
        if name not in ordered:
            ordered.append(name)

    for name in names:
        add(name)
    return tuple(ordered)
