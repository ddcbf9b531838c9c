"""ONNX -> TFLite (LiteRT): fp32 and fp16 with onnx2tf; INT8 with the TFLite converter.

onnx2tf converts an ONNX of its own, exported from the manifest's reference model with ULSAM in its
``spatial`` form (:func:`ulsam_deploy.nets.ulsam.export_form`): the softmax over a flattened H*W of the
ONNX Runtime graph (``spread`` form) would need NCHW <-> NHWC transposes in a channels-last graph (with the
eager form's 5-D broadcast of A: 10 TRANSPOSE and 14 RESHAPE over four ULSAMs); the spatial form needs none.

onnx2tf runs in a subprocess (:mod:`.onnx2tf_worker`): it rewrites its input in place, may call
``sys.exit``, and without a local sample file it downloads one from GitHub, so the worker gets a
copy of the ONNX in a scratch folder holding our own sample file, and refuses every download.

INT8 is built from the SavedModel onnx2tf writes, calibrated on the same calibration array as the
ONNX INT8 (NHWC, normalised - the model's own input). The default keeps ULSAM's attention path
(REDUCE_MAX, SUB, EXP, SUM, DIV, the convolution that spreads 1 + A over the channels and the MUL
x*(1 + A)) in float: INT8 would leave attention weights over 16-196 positions within a few quantisation
steps (LiteRT's INT8 softmax has a fixed output scale of 1/256), and XNNPACK does not take INT8 EXP or DIV.
Unlike ONNX Runtime (:mod:`.quantize`), XNNPACK gains nothing from an INT8 spread convolution and MUL: they
timed the same as float (ratio 1.000 over 3,000 interleaved calls at 224 px), with a little less parity.
It also keeps the classifier (FULLY_CONNECTED) in float with float32 model input and output, so logits beyond the
calibrated range are not clipped, and the ops of the ``keep_float`` paper layers (located through
:mod:`ulsam_deploy.export.layermap` on onnx2tf's float model, whose tensor keys the quantised model
shares). ``tflite-int8-plain`` is the converter's plain full-integer model (int8 I/O), for comparison.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import calibration_set
from ..errors import BackendUnavailable, UlsamError
from ..store.fileio import atomic_path
from . import FORMATS

SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"
# ULSAM's export form per format (nets/ulsam.py): the NPU's has no DIV (Ethos-U55/U65 have none), the
# microcontroller's softmax is the SOFTMAX op (TFLite Micro has no INT8 EXP); the others are channels-last.
FORMS = {"tflite-int8-npu": "npu", "tflite-int8-mcu": "spread"}
_SAVED: dict[str, tempfile.TemporaryDirectory] = {}   # reference sha256 + form -> onnx2tf output, reused in a run
_LOCATED: dict[str, dict] = {}                          # onnx2tf output folder -> taps and layer members


def _require() -> None:
    import importlib.util

    missing = [m for m in ("onnx2tf", "tensorflow", "ai_edge_litert") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailable(f"TFLite export needs {', '.join(missing)}, which is not installed",
                                 "pip install 'ulsam-deploy[tflite]'")


def _onnx2tf(reference: Path, form: str = "spatial") -> Path:
    """Export the reference model's channels-last ONNX (ULSAM in ``form``) and run onnx2tf on it, once per
    reference (by hash) and form; return onnx2tf's output folder (tflite files + SavedModel)."""
    from ..nets import load_model
    from ..nets.ulsam import export_form
    from .onnx import export_onnx

    digest = hashlib.sha256(Path(reference).read_bytes()).hexdigest() + f"-{form}"
    if digest in _SAVED:
        return Path(_SAVED[digest].name) / "out"
    scratch = tempfile.TemporaryDirectory(prefix="ulsam-onnx2tf-")
    work = Path(scratch.name)
    try:
        model = load_model(reference)
        with export_form(model, form):
            export_onnx(model, model.spec.input_size, work / "model.onnx")
        sample = calibration_set("photos", 128, 20)
        np.save(work / SAMPLE_NAME, sample.preprocessing.denormalise(sample.images))
        _worker("convert", str(work / "model.onnx"), str(work / "out"), cwd=work)
    except BaseException:   # also Ctrl-C / SIGTERM: leave no scratch folder behind
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


def _located(out: Path, manifest) -> dict:
    """Taps and layer members of onnx2tf's float model (the quantised models share its tensor keys)."""
    if str(out) not in _LOCATED:
        from . import layermap
        from ..store.manifest import REFERENCE
        from ..nets import load_model
        from ..runtime.litert import open_interpreter

        reference = load_model(manifest.directory / REFERENCE)
        float_model = out / "model_float32.tflite"
        taps, locations = layermap.taps_of(reference), layermap.tflite_locations(float_model, reference)
        nodes, graph_input = layermap.tflite_graph(open_interpreter(float_model))
        _LOCATED[str(out)] = {"taps": locations, "members": layermap.layer_members(nodes, locations, taps, graph_input),
                              "inputs": layermap.layer_inputs(locations, taps, graph_input), "graph_input": graph_input}
    return _LOCATED[str(out)]


def _float_ops(located: dict, keep_float: Sequence[int]) -> list[str]:
    """Tensor keys of the ops to keep float for ``keep_float``: each layer's ops and the op writing its
    input - LiteRT quantises a tensor where it is produced, so a float layer's input must be produced in float."""
    keys: list[str] = []
    for layer in sorted(keep_float):
        if not located["members"].get(layer):
            raise UlsamError(f"layer {layer} was not found in the TFLite model")
        source = located["inputs"][layer]
        keys += located["members"][layer] + ([source] if source != located["graph_input"] else [])
    return list(dict.fromkeys(keys))


def produce(name: str, manifest, target: Path, calib, keep_float: Sequence[int] = (), npu: str | None = None) -> dict:
    """Write the TFLite artifact ``name`` of ``manifest``'s ONNX to ``target``; ``keep_float`` paper
    layers stay float in ``tflite-int8`` (the plain model is the converter's untouched full-integer one).
    ``tflite-int8-npu`` is the full-integer model of ULSAM's ``npu`` form, compiled by Vela for ``npu``
    into a second file beside it (``vela.compiled_name``); ``tflite-int8-mcu`` the full-integer model of
    the ``spread`` form, for TFLite Micro."""
    _require()
    fmt = FORMATS[name]
    from ..store.manifest import REFERENCE

    out = _onnx2tf(manifest.directory / REFERENCE, FORMS.get(name, "spatial"))
    located = _located(out, manifest)
    # the I/O (layout, dtypes, quantisation) is read back by the pipeline; the taps serve `inspect`
    details = {"converter": "onnx2tf", "taps": located["taps"]}
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
            float_file = out.parent / "float-ops.json"
            float_file.write_text(json.dumps(_float_ops(located, keep_float) if keep else []))
            _worker("quantize", str(out), str(calib_file), str(tmp), "attention-float" if keep else "plain",
                    str(float_file), cwd=out.parent)
            if name == "tflite-int8-npu":
                from ..nets.build import sha256_file
                from . import vela

                compiled = target.with_name(vela.compiled_name(target.name))
                with atomic_path(compiled) as compiled_tmp:
                    details["vela"] = vela.compile_model(tmp, compiled_tmp, npu or vela.DEFAULT_NPU)
                details["vela"] |= {"file": compiled.name, "sha256": sha256_file(compiled),
                                    "size_bytes": compiled.stat().st_size}
            details |= {"converter": "onnx2tf SavedModel -> tf.lite.TFLiteConverter (full integer, int8 I/O)"
                                     if not keep else "onnx2tf SavedModel -> tf.lite.TFLiteConverter (selective)",
                        "attention_path": "float" if keep else "int8", "logits": "float" if keep else "int8",
                        "keep_float": sorted(keep_float) if keep else [],
                        "calibration_layout": "NHWC, normalised (the model input)"}
    return details
