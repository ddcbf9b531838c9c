"""TFLite/LiteRT: conversion of the shipped reference model, parity for every precision, and the
ULSAM-aware INT8 recipe (attention path in float) against plain full-integer INT8."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx2tf", reason="TFLite extra not installed: pip install 'ulsam-deploy[tflite]'")

from ulsam_deploy.store.manifest import Manifest  # noqa: E402
from ulsam_deploy.runtime import open_artifact  # noqa: E402

pytestmark = pytest.mark.slow


def test_artifacts_and_io(tflite_export):
    manifest = Manifest.load(tflite_export)
    assert {"onnx", "tflite-fp32", "tflite-fp16", "tflite-int8", "tflite-int8-plain"} <= set(manifest.artifacts)
    assert manifest.artifacts["tflite-int8"]["attention_path"] == "float"
    assert manifest.artifacts["tflite-int8-plain"]["attention_path"] == "int8"
    x = np.random.default_rng(0).normal(size=(3, 3, 112, 112)).astype(np.float32)
    for key in ("tflite-fp32", "tflite-int8"):
        entry = manifest.artifacts[key]
        runner = open_artifact(tflite_export / entry["file"], "litert", entry["precision"], threads=2)
        assert runner(x).shape == (3, 10) and runner(x[:1]).shape == (1, 10)   # batch resized both ways
        runner.close()
    assert not list(Path(tflite_export).glob("*.part"))


def test_check_passes_every_precision(tflite_export, cli):
    code, out, err = cli("check", "--export", tflite_export, "--formats", "tflite-fp32,tflite-fp16,tflite-int8",
                         "--threads", "2", "--json")
    assert code == 0, err
    rows = {r["artifact"]: r for r in json.loads(out)}
    assert rows["tflite-fp32"]["max_abs"] <= 1e-4 * rows["tflite-fp32"]["logit_range"]
    assert rows["tflite-fp16"]["top1_agreement"] >= 99.5
    assert rows["tflite-int8"]["top1_agreement"] >= 98.0 and rows["tflite-int8"]["accuracy_delta"] >= -1.0


def test_attention_float_recipe_is_at_least_as_close(tflite_export, cli):
    code, out, _ = cli("parity", "--export", tflite_export, "--formats", "tflite-int8,tflite-int8-plain", "--json")
    assert code == 0
    rows = {r["artifact"]: r for r in json.loads(out)}
    assert rows["tflite-int8"]["mean_abs"] <= rows["tflite-int8-plain"]["mean_abs"]


@pytest.mark.parametrize("key", ["tflite-fp32", "tflite-fp16", "tflite-int8"])
def test_planted_head_swap_in_tflite_fails_check(tflite_export, cli, tmp_path, key):
    """Swap two classes' rows of the classifier inside the .tflite flatbuffer: check must fail."""
    copy = tmp_path / "planted"
    shutil.copytree(tflite_export, copy)
    manifest = Manifest.load(copy)
    path = copy / manifest.artifacts[key]["file"]
    data = bytearray(path.read_bytes())
    weights = _classifier_weights(path)
    rows = weights.reshape(10, -1)
    raw_0, raw_1 = rows[0].tobytes(), rows[1].tobytes()
    start = data.find(raw_0)
    assert start > 0
    other = data.find(raw_1)
    data[start:start + len(raw_0)], data[other:other + len(raw_1)] = raw_1, raw_0
    path.write_bytes(bytes(data))
    manifest.artifacts[key]["sha256"] = __import__("ulsam_deploy.nets.build", fromlist=["x"]).sha256_file(path)
    manifest.save()
    code, _, err = cli("check", "--export", copy, "--formats", key)
    assert code == 1 and f"FAIL {key}" in err and "top1_agreement" in err


def _classifier_weights(path):
    """The classifier's weight tensor as stored in the file (fp32, fp16 or int8 constant)."""
    from ai_edge_litert.interpreter import Interpreter

    data = Path(path).read_bytes()
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    for detail in interpreter.get_tensor_details():
        if tuple(detail["shape"]) != (10, 1280):
            continue
        try:
            tensor = interpreter.get_tensor(detail["index"])
        except ValueError:
            continue
        if data.find(tensor[0].tobytes()) > 0:
            return tensor
    raise AssertionError("classifier weights not found")


def test_manifest_records_the_xnnpack_split(tflite_export):
    """The default TFLite models run in one XNNPACK partition, and ULSAM adds no layout change to them: the
    only TRANSPOSE and RESHAPE are the head's flatten of the pooled features, as in MV2. The plain
    full-integer model leaves XNNPACK at every ULSAM (LiteRT's INT8 EXP and DIV are not delegated)."""
    manifest = Manifest.load(tflite_export)
    for name in ("tflite-fp32", "tflite-fp16", "tflite-int8"):
        split = manifest.artifacts[name]["xnnpack"]
        assert split["partitions"] == 1 and split["outside_delegate"] == {}, name
        assert split["ops"]["TRANSPOSE"] == 1 and split["ops"]["RESHAPE"] == 1, name
        assert split["ops"]["EXP"] == 4 and "SOFTMAX" not in split["ops"], name
    plain = manifest.artifacts["tflite-int8-plain"]["xnnpack"]
    assert plain["outside_delegate"] == {"EXP": 4, "DIV": 4} and plain["partitions"] == 9
