"""ONNX -> TFLite (LiteRT): fp32 and fp16 with onnx2tf; INT8 with the TFLite converter.

onnx2tf runs in a subprocess (:mod:`.onnx2tf_worker`): it rewrites its input in place, may call
``sys.exit``, and without a local sample file it downloads one from GitHub, so the worker gets a
copy of the ONNX in a scratch folder holding our own sample file, and refuses every download.

INT8 is built from the SavedModel onnx2tf writes, calibrated on the same calibration array as the
ONNX INT8 (NHWC, normalised - the model's own input). The default keeps ULSAM's attention path
(SOFTMAX, the RESHAPE that follows it, the MUL x*A and the ADD x*A + x) in float: LiteRT's INT8
softmax has a fixed output scale of 1/256, which leaves attention weights over 16-196 positions
within a few quantisation steps. ``tflite-int8-plain`` is the plain full-integer model, for comparison.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..data import calibration_set
from ..errors import BackendUnavailable, UlsamError
from ..fileio import atomic_path
from . import FORMATS

SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"
_SAVED: dict[str, tempfile.TemporaryDirectory] = {}   # onnx sha256 -> onnx2tf output, reused within a run


def _require() -> None:
    import importlib.util

    missing = [m for m in ("onnx2tf", "tensorflow", "ai_edge_litert") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailable(f"TFLite export needs {', '.join(missing)}, which is not installed",
                                 "pip install 'ulsam-deploy[tflite]'")


def _onnx2tf(onnx_path: Path) -> Path:
    """Run onnx2tf once per ONNX (by hash); return its output folder (tflite files + SavedModel)."""
    digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    if digest in _SAVED:
        return Path(_SAVED[digest].name) / "out"
    scratch = tempfile.TemporaryDirectory(prefix="ulsam-onnx2tf-")
    work = Path(scratch.name)
    shutil.copy(onnx_path, work / "model.onnx")
    sample = calibration_set("photos", 128, 20)
    np.save(work / SAMPLE_NAME, sample.preprocessing.denormalise(sample.images))
    try:
        _worker("convert", str(work / "model.onnx"), str(work / "out"), cwd=work)
    except UlsamError:
        scratch.cleanup()
        raise
    _SAVED[digest] = scratch
    return work / "out"


def _worker(*args: str, cwd: Path) -> None:
    """Run the converter worker; TensorFlow stays out of this process and its logs out of the CLI."""
    proc = subprocess.run([sys.executable, "-m", "ulsam_deploy.export.onnx2tf_worker", *args], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()] or ["no output"]
        raise UlsamError(f"TFLite conversion ({args[0]}) failed, exit {proc.returncode}: {lines[-1][:300]}")


def produce(name: str, manifest, target: Path, calib) -> dict:
    """Write the TFLite artifact ``name`` of ``manifest``'s ONNX to ``target``."""
    _require()
    fmt = FORMATS[name]
    out = _onnx2tf(manifest.directory / FORMATS["onnx"].filename)
    details = {"converter": "onnx2tf", "layout": "NHWC", "input_quantization": None}
    with atomic_path(target) as tmp:
        if fmt.precision in ("fp32", "fp16"):
            produced = out / f"model_{'float32' if fmt.precision == 'fp32' else 'float16'}.tflite"
            if not produced.is_file():
                raise UlsamError(f"onnx2tf wrote no {produced.name}")
            shutil.copy(produced, tmp)
        else:
            keep = name == "tflite-int8"
            calib_file = out.parent / f"calib-{calib.sha256[:16]}.npy"
            np.save(calib_file, np.ascontiguousarray(calib.images.transpose(0, 2, 3, 1), np.float32))
            _worker("quantize", str(out), str(calib_file), str(tmp), "attention-float" if keep else "plain",
                    cwd=out.parent)
            details |= {"converter": "onnx2tf SavedModel -> tf.lite.TFLiteConverter (full integer, int8 I/O)",
                        "attention_path": "float" if keep else "int8",
                        "calibration_layout": "NHWC, normalised (the model input)"}
    return details
