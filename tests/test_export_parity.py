"""Export -> manifest -> parity/check on a small model with O(1) logits (fast), and planted regressions."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ulsam_deploy.store.manifest import Manifest
from ulsam_deploy.nets.build import sha256_file

from small_models import SPEC, model_file as _model_file  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    root = tmp_path_factory.mktemp("export")
    ckpt = _model_file(root)
    out = root / "exp"
    result = CliRunner().invoke(app, ["export", "--model", str(ckpt), "--formats", "onnx,onnx-int8,onnx-int8-trt",
                                      "--calib", "digits", "--calib-samples", "64", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    return ckpt, out, json.loads(result.stdout)


def test_manifest_records_everything(exported):
    ckpt, out, summary = exported
    manifest = Manifest.load(out)
    data = manifest.data
    assert data["spec"] == SPEC.to_dict() and data["checkpoint"]["sha256"] == sha256_file(ckpt)
    assert data["calibration"]["source"] == "digits:train" and data["calibration"]["count"] == 64
    assert {"torch", "onnx", "onnxruntime", "onnxsim"} <= set(data["versions"])
    for key in ("onnx", "onnx-int8", "onnx-int8-trt"):
        entry = manifest.artifacts[key]
        assert entry["sha256"] == sha256_file(out / entry["file"]) and entry["size_bytes"] > 0
    assert not list(out.glob("*.part"))
    assert [a["status"] for a in summary["artifacts"]] == ["built", "built", "built"]


def test_onnx_graph_is_compact(exported):
    _, out, _ = exported
    entry = Manifest.load(out).artifacts["onnx"]
    ops = entry["ops_after_simplify"]
    assert "Identity" not in ops and "Cast" not in ops and "Tile" not in ops
    assert "BatchNormalization" not in ops          # folded into the convs
    assert ops["Softmax"] == 4 and ops["MaxPool"] == 4
    assert entry["opset"] >= 17
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param   # dynamic batch


def _qdq(path):
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    return model, inits, producers


def test_ort_int8_is_u8s8_with_per_channel_weights(exported):
    _, out, _ = exported
    model, inits, producers = _qdq(out / "model.int8.onnx")
    for node in model.graph.node:
        if node.op_type == "Conv":
            act, weight = producers[node.input[0]], producers[node.input[1]]
            assert act.op_type == weight.op_type == "DequantizeLinear"
            assert inits[act.input[2]].dtype == np.uint8                       # activations uint8
            assert inits[weight.input[0]].dtype == np.int8 and not inits[weight.input[2]].any()
            assert inits[weight.input[1]].shape == (inits[weight.input[0]].shape[0],)


def test_ort_int8_quantises_attention_over_the_whole_softmax_range(exported):
    """x * (1 + A) runs on INT8 inputs; A's quantisation covers [0, 1], as ONNX Runtime's fused QLinearSoftmax
    wraps a value beyond its output range round to 0 instead of saturating (a calibrated range would do that
    to any sharper map than calibration saw)."""
    from ulsam_deploy.export.quantize import softmax_outputs

    _, out, _ = exported
    entry = Manifest.load(out).artifacts["onnx-int8"]
    assert entry["attention_path"].startswith("softmax float") and entry["attention_range"] == "[0, 1]"
    model, inits, producers = _qdq(out / "model.int8.onnx")
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    assert len(muls) == 4 and all(producers[i].op_type == "DequantizeLinear" for n in muls for i in n.input)
    quantised = [q for name in softmax_outputs(model) for q in consumers.get(name, []) if q.op_type == "QuantizeLinear"]
    assert len(quantised) == 4
    for q in quantised:
        scale, zero = float(inits[q.input[1]]), int(inits[q.input[2]])
        assert zero == 0 and scale * 255 >= 1.0 - 1e-6, q.name


def test_int8_qdq_is_symmetric_per_channel_and_keeps_softmax_float(exported):
    _, out, _ = exported
    model = onnx.load(str(out / "model.int8.trt.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        assert zero_point is None or (zero_point.dtype == np.int8 and not zero_point.any())
    for node in model.graph.node:
        if node.op_type == "Softmax":
            assert producers[node.input[0]].op_type != "DequantizeLinear"
        if node.op_type == "Conv":
            weight_dq = producers[node.input[1]]
            assert weight_dq.op_type == "DequantizeLinear"
            scale = inits[weight_dq.input[1]]
            assert scale.ndim == 1 and scale.shape[0] == inits[weight_dq.input[0]].shape[0]   # per channel, axis 0
            assert producers[node.input[0]].op_type == "DequantizeLinear"                        # activations too


def test_second_export_keeps_current_artifacts(exported, cli):
    ckpt, out, _ = exported
    code, stdout, err = cli("export", "--model", ckpt, "--formats", "onnx,onnx-int8,onnx-int8-trt", "--calib",
                            "digits", "--calib-samples", "64", "--out", out, "--json")
    assert code == 0, err
    assert [a["status"] for a in json.loads(stdout)["artifacts"]] == ["kept", "kept", "kept"]


def test_parity_fp32_and_check_pass(exported, cli):
    _, out, _ = exported
    code, stdout, err = cli("check", "--export", out, "--data", "digits", "--formats", "onnx", "--json")
    assert code == 0, err
    (row,) = json.loads(stdout)
    for key in ("artifact", "backend", "precision", "top1_agreement", "cosine_min", "max_abs", "accuracy",
                "accuracy_delta", "passed"):
        assert key in row
    assert row["max_abs"] <= 1e-4 and row["top1_agreement"] == 100.0 and row["passed"]


def test_check_on_the_first_images_names_the_subset_and_caches_it_apart(exported, cli):
    _, out, _ = exported
    code, stdout, err = cli("check", "--export", out, "--data", "digits", "--formats", "onnx", "--images", "40",
                            "--json")
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["count"] == 40 and row["data"] == "digits:test, first 40 of 360"
    code, stdout, err = cli("check", "--export", out, "--data", "digits", "--formats", "onnx", "--json")
    assert code == 0, err       # the whole set after the subset: its own cache entry, not the 40 rows
    assert json.loads(stdout)[0]["count"] == 360
    code, _, err = cli("check", "--export", out, "--images", "0")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_stale_model_is_refused(exported, cli, tmp_path):
    _, out, _ = exported
    changed = _model_file(tmp_path, seed=1, name="changed.safetensors")
    code, stdout, err = cli("check", "--export", out, "--model", changed, "--formats", "onnx")
    assert code == 2 and "changed after export" in err and stdout == ""


def test_tampered_artifact_is_refused(exported, cli, tmp_path):
    import shutil

    _, out, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.onnx", "r+b") as handle:
        handle.seek(-64, 2)
        handle.write(b"\x00" * 8)
    code, _, err = cli("parity", "--export", copy, "--formats", "onnx")
    assert code == 2 and "does not match its manifest sha256" in err


def _plant(out, tmp_path, mutate, key="onnx"):
    """Copy the export, change the artifact with ``mutate``, and re-sign it in the manifest (a broken converter)."""
    import shutil

    copy = tmp_path / "planted"
    shutil.copytree(out, copy)
    manifest = Manifest.load(copy)
    path = copy / manifest.artifacts[key]["file"]
    model = onnx.load(str(path))
    mutate(model)
    onnx.save(model, str(path))
    manifest.artifacts[key]["sha256"] = sha256_file(path)
    manifest.save()
    return copy


@pytest.mark.parametrize("key", ["onnx", "onnx-int8", "onnx-int8-trt"])
def test_planted_weight_perturbation_fails_check(exported, cli, tmp_path, key):
    _, out, _ = exported

    def perturb(model):
        # swap two classes in the head: the Gemm's weight (fp32 initializer, or the int8 one behind its DQ)
        head = next(n for n in model.graph.node if n.op_type == "Gemm")
        producers = {o: n for n in model.graph.node for o in n.output}
        name = head.input[1]
        if name in producers:
            name = producers[name].input[0]
        init = next(i for i in model.graph.initializer if i.name == name)
        array = numpy_helper.to_array(init).copy()
        array[[0, 1]] = array[[1, 0]]
        init.CopyFrom(numpy_helper.from_array(array, init.name))

    planted = _plant(out, tmp_path, perturb, key)
    code, _, err = cli("check", "--export", planted, "--data", "digits", "--formats", key)
    assert code == 1 and f"FAIL {key}" in err and ("max_abs" in err or "top1_agreement" in err)


def test_planted_constant_attention_fails_check(exported, cli, tmp_path):
    _, out, _ = exported

    def flatten_attention(model):   # softmax -> uniform: attention replaced by a constant map
        for node in model.graph.node:
            if node.op_type == "Softmax":
                node.op_type = "Sigmoid"
                del node.attribute[:]

    planted = _plant(out, tmp_path, flatten_attention)
    code, _, err = cli("check", "--export", planted, "--data", "digits", "--formats", "onnx")
    assert code == 1 and "max_abs" in err


@pytest.mark.parametrize("kind", ["garbage-onnx", "truncated-onnx", "garbage-tflite", "truncated-tflite"])
def test_corrupt_artifacts_are_refused_in_one_line(exported, cli, tmp_path, kind):
    """An artifact whose manifest hash matches but whose bytes are not a model (a broken converter)."""
    import shutil

    _, out, _ = exported
    copy = tmp_path / "corrupt"
    shutil.copytree(out, copy)
    manifest = Manifest.load(copy)
    source = (copy / "model.onnx").read_bytes()
    if kind.endswith("tflite"):
        pytest.importorskip("ai_edge_litert")
        key, name = "tflite-fp32", "model_fp32.tflite"
        manifest.artifacts[key] = dict(manifest.artifacts["onnx"], file=name, backend="litert")
        source = b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 64
    else:
        key, name = "onnx", "model.onnx"
    data = b"not a model at all " * 100 if kind.startswith("garbage") else source[: len(source) // 3]
    (copy / name).write_bytes(data)
    manifest.artifacts[key]["sha256"] = sha256_file(copy / name)
    manifest.save()
    code, out_text, err = cli("parity", "--export", copy, "--formats", key)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "cannot load" in err, err
