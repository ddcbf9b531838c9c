"""AVX2 behaviour seen from any x86 machine: QEMU user mode runs our Python as a Haswell (AVX2, no AVX-512,
no VNNI), where ONNX Runtime's u8 x s8 kernels add two products in a 16-bit lane.

* a planted convolution whose weight pairs overflow int16 saturates there, and one that just fits does not,
  as the saturation audit says of both;
* the shipped model's default INT8 (7-bit weights) computes its Q/DQ meaning there within the gate.
"""

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ulsam_deploy.export.saturation import audit_model

ROOT = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-x86_64")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                       reason="QEMU user mode emulates an x86 CPU model only on an x86 host here"),
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed: `apt-get install qemu-user` "
                                            "(make test installs it where it runs as root with apt-get)"),
]


def planted(codes: int, in_ch: int = 32, out_ch: int = 8) -> onnx.ModelProto:
    """Q/DQ 1x1 convolution, every weight code ``codes``, output quantised, true output 32/255 everywhere
    for an input of ones (activation code 255)."""
    inits = [numpy_helper.from_array(np.float32(1 / 255), "xs"), numpy_helper.from_array(np.uint8(0), "xz"),
             numpy_helper.from_array(np.full((out_ch, in_ch, 1, 1), codes, np.int8), "wq"),
             numpy_helper.from_array(np.full(out_ch, 1 / (255 * codes), np.float32), "ws"),
             numpy_helper.from_array(np.zeros(out_ch, np.int8), "wz"),
             numpy_helper.from_array(np.float32(0.001), "ys"), numpy_helper.from_array(np.uint8(0), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_ch, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_ch, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def meaning(path: Path, images: np.ndarray) -> np.ndarray:
    """The file's Q/DQ meaning: ONNX Runtime with its graph optimisations (the kernel fusions) off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 16]})[0] for i in range(0, len(images), 16)])


def on_haswell(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The fused kernels' outputs for every ONNX in ``folder`` on an emulated Haswell, and the CPU it saw."""
    out = folder / "haswell"
    out.mkdir()
    run = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(ROOT / "scripts/int8-kernels.py"),
                          str(folder), str(out)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    return (json.loads((out / "host.json").read_text()),
            {p.stem: np.load(p) for p in out.glob("*.npy")})


def test_planted_overflow_saturates_on_avx2_and_the_audit_says_so(tmp_path):
    for name, codes in (("over", 127), ("fits", 64)):
        onnx.save(planted(codes), str(tmp_path / f"{name}.onnx"))
    images = np.ones((2, 32, 4, 4), np.float32)
    np.save(tmp_path / "images.npy", images)
    audits = {name: audit_model(onnx.load(str(tmp_path / f"{name}.onnx"))) for name in ("over", "fits")}
    assert audits["over"].overflows and not audits["fits"].overflows
    host, fused = on_haswell(tmp_path)
    assert host["features"] == ["AVX2"] and host["label"] == "x86-64 AVX2"
    exact = {name: meaning(tmp_path / f"{name}.onnx", images) for name in ("over", "fits")}
    assert np.allclose(exact["over"], 32 / 255, atol=0.001) and np.allclose(exact["fits"], 32 / 255, atol=0.001)
    assert np.array_equal(fused["fits"], exact["fits"])                  # 255 * (64 + 64) fits in int16
    assert np.abs(fused["over"] - exact["over"]).max() > 0.03            # 255 * (127 + 127) does not


def test_shipped_model_default_int8_is_its_meaning_on_avx2(cli, tmp_path):
    out = tmp_path / "exp"
    code, _, err = cli("export", "--model", ROOT / "models/mv2-ulsam-13-14-16-17-g4-digits",
                       "--formats", "onnx,onnx-int8,onnx-int8-vnni", "--out", out, "--json")
    assert code == 0, err
    from ulsam_deploy.data import digits

    images, _ = digits.load("test", 112)
    folder = tmp_path / "run"
    folder.mkdir()
    np.save(folder / "images.npy", np.ascontiguousarray(images[:64], np.float32))
    shutil.copy(out / "model.int8.onnx", folder / "int8.onnx")
    shutil.copy(out / "model.int8.vnni.onnx", folder / "vnni.onnx")
    host, fused = on_haswell(folder)
    assert "AVX512VNNI" not in host["features"]
    error = {}
    for name in ("int8", "vnni"):
        exact = meaning(folder / f"{name}.onnx", np.load(folder / "images.npy"))
        error[name] = (100 * (fused[name].argmax(1) == exact.argmax(1)).mean(),
                       float(np.abs(fused[name] - exact).max() / np.abs(exact).max()))
    assert error["int8"][0] >= 99.0 and error["int8"][1] < 0.1, error        # the default: its meaning
    assert error["vnni"][1] > 2 * error["int8"][1], error                     # 8-bit weights saturate here
