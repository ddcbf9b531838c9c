"""TensorRT: the ONNX files the engines are built from meet TensorRT's rules (CPU, run everywhere), the
CLI refuses a TensorRT export cleanly where TensorRT or a GPU is missing, and - on an NVIDIA GPU with
TensorRT (``gpu`` marker) - both engines build, run with any batch and pass the parity gate."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from ulsam_deploy.errors import BackendUnavailable, StaleArtifactError, UlsamError
from ulsam_deploy.export import FORMATS
from ulsam_deploy.export.fp16 import to_fp16_onnx
from ulsam_deploy.export.quantize import attention_nodes
from ulsam_deploy.export.tensorrt import MAX_BATCH, TIMING_CACHE
from ulsam_deploy.runtime.engines import engine_mismatch, gpu_info
from ulsam_deploy.store.manifest import Manifest

MODEL = Path(__file__).resolve().parents[1] / "models" / "mv2-ulsam-13-14-16-17-g4-digits"
CALIB = ("--calib", "digits", "--calib-samples", "32")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = gpu_info() is not None
NO_GPU_REASON = ("TensorRT is not installed (pip install 'ulsam-deploy[tensorrt]' --extra-index-url "
                 "https://pypi.nvidia.com)" if not HAS_TRT else "no CUDA GPU is visible")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """The pipeline's model.onnx and the calibrated symmetric Q/DQ ONNX TensorRT builds INT8 from."""
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    out = tmp_path_factory.mktemp("trt") / "exp"
    result = CliRunner().invoke(app, ["export", "--model", str(MODEL), "--formats", "onnx-int8-trt", *CALIB,
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def fp16(export_dir):
    source = export_dir / "model.onnx"
    target = export_dir.parent / "model.fp16.onnx"
    details = to_fp16_onnx(source, target, attention_nodes(onnx.load(str(source))))
    return target, details


def _graph_maps(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return inits, producers, consumers


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)    # ONNX default axis is 1


# --- (a) the INT8 source: TensorRT explicit quantization ---------------------------------------------

def test_int8_qdq_meets_tensorrt_explicit_quantization_rules(export_dir):
    model = onnx.load(str(export_dir / FORMATS["onnx-int8-trt"].filename))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13   # per-axis Q/DQ
    inits, producers, consumers = _graph_maps(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        scale, zero = inits[node.input[1]], inits.get(node.input[2]) if len(node.input) > 2 else None
        assert zero is not None and zero.dtype == np.int8 and not zero.any(), node.name   # symmetric INT8
        assert scale.dtype == np.float32 and (scale > 0).all(), node.name
        if scale.ndim:                                   # per-channel: weights only, output channels
            assert node.op_type == "DequantizeLinear" and node.input[0] in inits and _axis(node) == 0, node.name
        if node.op_type == "QuantizeLinear":             # TensorRT fuses Q -> DQ pairs
            assert all(c.op_type == "DequantizeLinear" for c in consumers[node.output[0]]), node.name
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 53       # 49 of the network, and the convolution spreading 1 + A of each ULSAM
    for node in layers:
        activation, weight = producers[node.input[0]], producers[node.input[1]]
        assert activation.op_type == "DequantizeLinear" and inits[activation.input[1]].ndim == 0, node.name
        assert weight.op_type == "DequantizeLinear" and _axis(weight) == 0, node.name
        weights, scale = inits[weight.input[0]], inits[weight.input[1]]
        assert weights.dtype == np.int8 and scale.shape == (weights.shape[0],), node.name
        if node.op_type == "Gemm":                       # axis 0 is the output axis only with transB
            assert any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if len(node.input) > 2:                          # a float bias, which TensorRT fuses
            assert inits[node.input[2]].dtype == np.float32, node.name
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 4
    for node in softmaxes:
        assert producers[node.input[0]].op_type != "DequantizeLinear", node.name
        assert all(c.op_type != "QuantizeLinear" for c in consumers[node.output[0]]), node.name


# --- (b) the FP16 source ------------------------------------------------------------------------------

def test_fp16_onnx_has_float32_io_float16_weights_and_float32_attention(fp16):
    path, details = fp16
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert details["initializers_fp16"] == sum(t == TensorProto.FLOAT16 for t in types.values()) > 0
    kept = set(details["float_nodes"])
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):   # float32 weights only where the node stays float32 (1 + A)
            assert types[node.input[1]] == (TensorProto.FLOAT if node.name in kept else TensorProto.FLOAT16), node.name
    float32 = {name for name, kind in types.items() if kind == TensorProto.FLOAT}
    assert all(n.name in kept for n in model.graph.node if float32 & set(n.input))
    assert {n.name for n in model.graph.node if n.op_type == "Softmax"} <= kept and len(kept) == 16
    value_types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for node in model.graph.node:
        if node.name in kept:
            assert all(value_types.get(o) == TensorProto.FLOAT for o in node.output), node.name
    assert details["values_saturated"] == 0 and details["casts"] > 2


def test_fp16_onnx_matches_eager_model_on_onnxruntime_cpu(fp16):
    from ulsam_deploy.data import digits
    from ulsam_deploy.nets import load_model
    from ulsam_deploy.verify.parity import compare
    from ulsam_deploy.runtime import run_batched, torch_runner
    from ulsam_deploy.runtime.onnxruntime import OnnxRuntimeRunner

    images, labels = digits.load("test", 112)
    reference = run_batched(torch_runner(load_model(MODEL), threads=1), images, 60)
    runner = OnnxRuntimeRunner(fp16[0], precision="fp16", threads=1)
    stats = compare(run_batched(runner, images, 60), reference, labels)
    runner.close()
    assert stats["cosine_min"] >= 0.999 and stats["top1_agreement"] >= 99.0, stats


def test_fp16_conversion_without_kept_nodes_and_unknown_names(export_dir, tmp_path):
    source = export_dir / "model.onnx"
    details = to_fp16_onnx(source, tmp_path / "all.onnx", [])
    assert details["casts"] == 2 and details["float_nodes"] == []    # only the graph input and output
    with pytest.raises(UlsamError, match="not in model.onnx"):
        to_fp16_onnx(source, tmp_path / "bad.onnx", ["no_such_node"])
    assert not (tmp_path / "bad.onnx").exists()


# --- (c) without TensorRT or a GPU ----------------------------------------------------------------------

@pytest.mark.skipif(HAS_TRT and HAS_GPU, reason="TensorRT and a GPU are here: the gpu tests build the engines")
def test_trt_export_without_tensorrt_exits_2_and_writes_no_engine(export_dir, tmp_path, cli):
    out = tmp_path / "exp"
    shutil.copytree(export_dir, out)
    code, stdout, err = cli("export", "--model", MODEL, "--formats", "trt-fp16", "--out", out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    if not HAS_TRT:
        assert "pip install 'ulsam-deploy[tensorrt]'" in err and "https://pypi.nvidia.com" in err
    else:
        assert "GPU" in err
    leftovers = [p.name for p in out.iterdir()
                 if p.name.endswith(".part") or p.name in ("model_fp16.engine", TIMING_CACHE)]
    assert leftovers == [] and "trt-fp16" not in Manifest.load(out).artifacts


@pytest.mark.skipif(HAS_TRT and HAS_GPU, reason="TensorRT and a GPU are here")
def test_trt_runner_without_tensorrt_is_unavailable(tmp_path):
    from ulsam_deploy.runtime import open_artifact

    (tmp_path / "model_fp16.engine").write_bytes(b"\0" * 16)
    with pytest.raises(BackendUnavailable):
        open_artifact(tmp_path / "model_fp16.engine", "tensorrt", "fp16")


def test_engine_mismatch_names_version_and_architecture():
    built = {"tensorrt_version": "10.8.0.43", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    assert engine_mismatch(built, dict(built)) is None
    assert engine_mismatch(built, built | {"gpu": "NVIDIA A100-PCIE-40GB"}) is None     # same architecture
    here = {"tensorrt_version": "10.9.0.34", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    reason = engine_mismatch(built, here)
    assert "TensorRT 10.8.0.43 (here 10.9.0.34)" in reason and "compute capability 8.0 (here 9.0)" in reason
    assert "A100" in reason


# --- (d) on an NVIDIA GPU with TensorRT -----------------------------------------------------------------

def gpu_test(fn):
    """Marked ``gpu``; skipped, saying what is missing, where TensorRT or a CUDA GPU is absent."""
    return pytest.mark.gpu(pytest.mark.skipif(not (HAS_TRT and HAS_GPU), reason=NO_GPU_REASON)(fn))


@pytest.fixture(scope="module")
def engines(export_dir, tmp_path_factory):
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    out = tmp_path_factory.mktemp("engines") / "exp"
    shutil.copytree(export_dir, out)
    result = CliRunner().invoke(app, ["export", "--model", str(MODEL), "--formats", "trt-fp16,trt-int8", *CALIB,
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    return out


@gpu_test
@pytest.mark.parametrize("key", ["trt-fp16", "trt-int8"])
def test_engines_record_where_they_were_built(engines, key):
    entry = Manifest.load(engines).artifacts[key]
    for field in ("tensorrt_version", "gpu", "compute_capability", "profile", "source", "strongly_typed"):
        assert field in entry, field
    assert entry["profile"]["max"][0] == MAX_BATCH and (engines / TIMING_CACHE).is_file()
    assert entry["source"] == FORMATS[FORMATS[key].needs[0]].filename


@gpu_test
def test_runner_takes_any_batch_and_reports_gpu_time(engines):
    from ulsam_deploy.runtime import open_artifact

    x = np.random.default_rng(0).normal(size=(MAX_BATCH + 3, 3, 112, 112)).astype(np.float32)
    for key in ("trt-fp16", "trt-int8"):
        entry = Manifest.load(engines).artifacts[key]
        runner = open_artifact(engines / entry["file"], "tensorrt", entry["precision"])
        assert runner(x[:1]).shape == (1, 10) and runner(x[:3]).shape == (3, 10)
        assert runner.last_gpu_ms > 0
        full = runner(x)                                  # more than the profile's maximum: chunked
        assert full.shape == (len(x), 10) and full.dtype == np.float32
        np.testing.assert_allclose(full[:3], runner(x[:3]), rtol=1e-2, atol=1e-2)
        runner.close()


@gpu_test
def test_check_passes_both_engines(engines, cli):
    code, out, err = cli("check", "--export", engines, "--formats", "trt-fp16,trt-int8", "--json")
    assert code == 0, err
    rows = {r["artifact"]: r for r in json.loads(out)}
    assert rows["trt-fp16"]["cosine_min"] >= 0.999 and rows["trt-fp16"]["top1_agreement"] >= 99.5
    assert rows["trt-int8"]["top1_agreement"] >= 99.0 and rows["trt-int8"]["accuracy_delta"] >= -1.0


@gpu_test
def test_engine_from_another_tensorrt_is_refused(engines, tmp_path):
    from ulsam_deploy.runtime import open_artifact

    copy = tmp_path / "copy"
    shutil.copytree(engines, copy)
    manifest = Manifest.load(copy)
    manifest.artifacts["trt-fp16"]["tensorrt_version"] = "9.0.0"
    manifest.save()
    with pytest.raises(StaleArtifactError, match="TensorRT 9.0.0"):
        open_artifact(copy / "model_fp16.engine", "tensorrt", "fp16")


@gpu_test
def test_rebuild_reuses_the_timing_cache(engines, cli):
    (engines / "model_fp16.engine").unlink()
    code, out, err = cli("export", "--model", MODEL, "--formats", "trt-fp16", "--out", engines, "--json")
    assert code == 0, err
    assert Manifest.load(engines).artifacts["trt-fp16"]["timing_cache_reused"] is True
