"""Subprocess entry for the TensorFlow side of the TFLite export (TensorFlow never loads in the CLI).

    python -m ulsam_deploy.export.onnx2tf_worker convert MODEL.onnx OUT_DIR
    python -m ulsam_deploy.export.onnx2tf_worker quantize SAVED_MODEL_DIR CALIB_NHWC.npy OUT.tflite attention-float|plain [FLOAT_OPS.json]

``convert`` runs in a scratch folder that holds a copy of the ONNX and onnx2tf's sample file;
every network request is refused, so a conversion that would download fails instead of reaching out.
``quantize`` keeps in float, besides ULSAM's attention path, the classifier (so that logits beyond the
calibrated range are not clipped) and the ops named in FLOAT_OPS.json (tensor keys, see
:func:`ulsam_deploy.export.layermap.tensor_key`), through the converter's selective quantisation (denylist).
"""

from __future__ import annotations

import json
import os
import sys


# ULSAM's attention path in its spatial form (the softmax over H*W and x * (1 + A)); the backbones use none
# of these ops, so denying them by type keeps exactly the attention path in float.
ATTENTION_OPS = ("REDUCE_MAX", "SUB", "EXP", "SUM", "DIV", "MUL")


def convert(onnx_path: str, out_dir: str) -> int:
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import requests

    def refuse(url, *args, **kwargs):
        raise requests.exceptions.ConnectionError(f"ulsam-deploy converts offline; refused {url}")

    requests.get = requests.post = refuse
    import onnx2tf

    onnx2tf.convert(input_onnx_file_path=onnx_path, output_folder_path=out_dir, non_verbose=True)
    missing = [f for f in ("model_float32.tflite", "model_float16.tflite") if not os.path.isfile(os.path.join(out_dir, f))]
    if missing:
        print(f"onnx2tf wrote no {', '.join(missing)}", file=sys.stderr)
        return 3
    return 0


def quantize_int8(saved_model: str, calib_nhwc, keep_attention_float: bool, float_keys=()) -> bytes:
    import tensorflow as tf

    def representative():
        for i in range(len(calib_nhwc)):
            yield {"input": calib_nhwc[i:i + 1]}

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    if not keep_attention_float:
        converter.inference_input_type = converter.inference_output_type = tf.int8
        return converter.convert()
    # fully_quantize=False: float32 model input and output (the input is quantised by the model's first op).
    # With int8 I/O the float classifier's logits would be re-quantised, and clipped, on the way out.
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_ops=list(ATTENTION_OPS), denylisted_nodes=_float_tensors(saved_model, float_keys),
        fully_quantize=False)
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative,
                                                         debug_options=options)
    return debugger.get_nondebug_quantized_model()


def _float_tensors(saved_model: str, float_keys) -> list[str]:
    """Output names, in the float model, of the ops to keep in float: the convolution that spreads each
    attention map over its group's channels (the one reading a DIV) - named, as convolutions are quantised
    elsewhere -, the op that writes the logits, and the ops whose tensor key is in ``float_keys``."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from .layermap import tensor_key

    interpreter = Interpreter(model_content=tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert())
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()   # no public equivalent lists op inputs/outputs
    producer = {out: op["op_name"] for op in ops for out in op["outputs"]}
    logits = {d["index"] for d in interpreter.get_output_details()}
    wanted = set(float_keys)
    chosen = [names[op["outputs"][0]] for op in ops
              if (op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")
                  and any(producer.get(i) == "DIV" for i in op["inputs"]))
              or logits & set(op["outputs"]) or tensor_key(names[op["outputs"][0]]) in wanted]
    missing = wanted - {tensor_key(name) for name in chosen}
    if missing:
        raise SystemExit(f"no op writes {sorted(missing)[0]!r} in the converter's float model")
    return chosen


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    mode, *args = sys.argv[1:]
    if mode == "convert":
        return convert(*args)
    if mode == "quantize":
        import numpy as np

        saved, calib, out, recipe, *float_ops = args
        float_keys = json.loads(open(float_ops[0]).read()) if float_ops else []
        data = quantize_int8(saved, np.load(calib), keep_attention_float=recipe == "attention-float",
                             float_keys=float_keys)
        with open(out, "wb") as handle:
            handle.write(data)
        return 0
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
