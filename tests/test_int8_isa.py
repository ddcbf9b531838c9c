"""INT8 that means the same numbers on every CPU: the saturation audit, the encodings' instruction sets in the
manifest, and `check`/`bench` refusing an encoding on a CPU its integer kernels are not exact on."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.small_models import model_file
from ulsam_deploy.export.saturation import INT16_MAX, audit_model
from ulsam_deploy.runtime import isa
from ulsam_deploy.store.manifest import Manifest

AVX2 = {"architecture": "x86_64", "cpu": "emulated", "features": ["AVX2"]}
AVX512 = {"architecture": "x86_64", "cpu": "emulated", "features": ["AVX2", "AVX512F", "AVX512BW"]}
VNNI = {"architecture": "x86_64", "cpu": "emulated", "features": ["AVX2", "AVX512F", "AVX512BW", "AVX512VNNI"]}
ARM = {"architecture": "arm64", "cpu": "emulated", "features": []}


def qdq_conv(weights: np.ndarray, name: str = "conv") -> onnx.ModelProto:
    """x (float) -> QuantizeLinear u8 -> DequantizeLinear -> Conv 1x1 with int8 weight codes ``weights`` (O, I)."""
    out_ch, in_ch = weights.shape
    inits = [numpy_helper.from_array(np.float32(1 / 255), "xs"), numpy_helper.from_array(np.uint8(0), "xz"),
             numpy_helper.from_array(weights.astype(np.int8).reshape(out_ch, in_ch, 1, 1), "wq"),
             numpy_helper.from_array(np.full(out_ch, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(out_ch, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="wdq", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name=name)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_ch, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_ch, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("codes,overflows", [
    ([127, 2, 0, 0], True),          # 255 * 129 = 32895 > 32767
    ([127, 1, 0, 0], False),         # 255 * 128 = 32640: just fits
    ([64, 64, 64, 64], False),       # 7-bit weights can never overflow
    ([-127, -2, 5, 5], True),        # -255 * 129 < -32768
    ([-127, -1, 127, 1], False),     # each sign's pair just fits
    ([100, -100, 100, 0], True),     # the pair need not be neighbours: any two weights of the channel
])
def test_audit_bounds_every_pair_of_a_channel(codes, overflows):
    weights = np.array([codes, [1, 1, 1, 1]])
    audit = audit_model(qdq_conv(weights))
    assert len(audit.layers) == 1
    layer = audit.layers[0]
    assert layer.overflows is overflows and audit.overflows is overflows
    assert layer.at_risk == (1 if overflows else 0) and layer.channels == 2
    summary = audit.summary()
    assert summary["overflow_possible"] is overflows and summary["limit"] == INT16_MAX
    assert [r["node"] for r in summary["layers_at_risk"]] == (["conv"] if overflows else [])


def test_audit_skips_float_layers():
    model = qdq_conv(np.array([[127, 127]]))
    conv = model.graph.node[-1]
    conv.input[0] = "x"                     # the activation is float: no integer kernel runs this layer
    assert audit_model(model).layers == []


@pytest.mark.parametrize("host,label", [(AVX2, "x86-64 AVX2"), (AVX512, "x86-64 AVX-512"),
                                        (VNNI, "x86-64 AVX-512 VNNI"), (ARM, "arm64")])
def test_encodings_are_exact_where_recorded(host, label):
    from ulsam_deploy.export.quantize import ENCODINGS

    assert isa.isa_label(host) == label
    assert isa.safe_here(ENCODINGS["ort"].isa, host)                  # the default: every CPU
    assert isa.safe_here(ENCODINGS["tensorrt"].isa, host)
    assert isa.safe_here(ENCODINGS["ort-vnni"].isa, host) is (host in (VNNI, ARM))
    entry = {"encoding": ENCODINGS["ort-vnni"].label, "isa": ENCODINGS["ort-vnni"].isa}
    reason = isa.refusal("onnx-int8-vnni", entry, host)
    assert (reason is None) is (host in (VNNI, ARM))
    if reason:
        assert label in reason and "AVX512VNNI" in reason and "\n" not in reason


def test_this_host_is_described():
    here = isa.host()
    assert here["architecture"] in ("x86_64", "arm64") and here["cpu"]
    assert set(here["features"]) <= set(isa.X86_FEATURES)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    tmp = tmp_path_factory.mktemp("isa")
    out = tmp / "exp"
    result = CliRunner().invoke(app, ["export", "--model", str(model_file(tmp)), "--formats",
                                      "onnx,onnx-int8,onnx-int8-vnni,onnx-int8-trt", "--calib", "digits", "--calib-samples", "32",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    return out


def test_manifest_records_encoding_isa_and_audit(int8_export):
    entries = Manifest.load(int8_export).artifacts
    default, vnni = entries["onnx-int8"], entries["onnx-int8-vnni"]
    assert default["weight_bits"] == 7 and default["isa"] == {"x86_64": "any", "arm64": "any"}
    assert default["saturation"]["overflow_possible"] is False and default["saturation"]["worst_pair"] <= INT16_MAX
    assert default["saturation"]["weight_bits"] == 7
    assert vnni["weight_bits"] == 8 and vnni["isa"]["x86_64"] == ["AVX512VNNI"]
    assert vnni["saturation"]["overflow_possible"] is True and vnni["saturation"]["layers_at_risk"]


def test_tensorrt_input_is_checked_as_its_qdq_graph(int8_export):
    """ONNX Runtime's fused S8S8 kernels saturate on AVX2 too; TensorRT's arithmetic is the graph's."""
    import onnxruntime as ort

    from ulsam_deploy.runtime import open_entry

    manifest = Manifest.load(int8_export)
    trt, default = manifest.artifacts["onnx-int8-trt"], manifest.artifacts["onnx-int8"]
    assert trt["ort_graph"] == "qdq" and "ort_graph" not in default
    levels = {}
    for name, entry in (("trt", trt), ("default", default)):
        runner = open_entry(int8_export / entry["file"], entry)
        levels[name] = runner.session.get_session_options().graph_optimization_level
        runner.close()
    assert levels == {"trt": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                      "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def test_check_refuses_an_encoding_this_cpu_saturates(int8_export, cli, monkeypatch):
    monkeypatch.setattr(isa, "features", lambda: {"AVX2": True, "AVX512VNNI": False})
    monkeypatch.setattr(isa, "architecture", lambda: "x86_64")
    before = (int8_export / "manifest.json").read_bytes()
    code, stdout, err = cli("check", "--export", int8_export, "--formats", "onnx-int8-vnni", "--data", "digits")
    assert code == 2 and err.startswith("error: onnx-int8-vnni") and err.count("\n") == 1, err
    assert "x86-64 AVX2" in err and "--force" in err and stdout == ""
    assert (int8_export / "manifest.json").read_bytes() == before
    code, stdout, err = cli("check", "--export", int8_export, "--formats", "onnx-int8,onnx-int8-vnni", "--data",
                            "digits", "--force", "--json")
    assert code in (0, 1) and "warning: onnx-int8-vnni" in err, err
    assert {r["artifact"] for r in json.loads(stdout)} >= {"onnx-int8", "onnx-int8-vnni"}
    code, _, err = cli("check", "--export", int8_export, "--formats", "onnx-int8", "--data", "digits")
    assert code == 0 and "warning" not in err, err      # the default encoding runs everywhere


def test_bench_leaves_out_an_encoding_this_cpu_saturates(int8_export, cli, monkeypatch):
    monkeypatch.setattr(isa, "features", lambda: {"AVX2": True})
    code, stdout, err = cli("bench", "--export", int8_export, "--backend", "onnxruntime", "--precision", "int8",
                            "--runs", "3", "--warmup", "1", "--no-parity", "--json")
    assert code == 0, err
    assert [row["artifact"] for row in json.loads(stdout)] == ["onnx-int8"]
