"""The Arm Ethos-U format: ULSAM's `npu` form in a full-integer TFLite file, compiled by Vela, gated by check."""

import importlib.util
import json
from pathlib import Path

import pytest

from ulsam_deploy.store.manifest import Manifest

DIGITS = Path(__file__).resolve().parents[1] / "models" / "mv2-ulsam-13-14-16-17-g4-digits"
SMALL = ("--arch", "mv2", "--width", "0.5", "--input-size", "64", "--num-classes", "10")


@pytest.mark.parametrize("args,words", [
    (("--formats", "onnx", "--npu", "ethos-u65-256"), ("--npu has no effect", "tflite-int8-npu")),
    (("--formats", "tflite-int8-npu", "--npu", "ethos-u99"), ("ethos-u99", "ethos-u55-128, ethos-u65-256")),
])
def test_npu_option_refusals_write_nothing(cli, tmp_path, args, words):
    code, _, err = cli("export", *SMALL, *args, "--out", tmp_path / "exp")
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "exp").exists()


def test_missing_vela_names_the_extra(cli, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] == "ethosu" else real(name, *a, **k))
    code, _, err = cli("export", *SMALL, "--formats", "tflite-int8-npu", "--out", tmp_path / "exp")
    assert code == 2 and "pip install 'ulsam-deploy[npu]'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_bench_ethos_u_without_an_npu_file_says_how_to_export_it(cli, tmp_path):
    out = tmp_path / "exp"
    assert cli("export", *SMALL, "--formats", "onnx", "--out", out)[0] == 0
    code, _, err = cli("bench", "--backend", "ethos-u", "--export", out, "--no-parity")
    assert code == 2 and err.count("\n") == 1 and "no tflite-int8-npu" in err and "--formats tflite-int8-npu" in err, err
    code, _, err = cli("bench", "--backend", "onnxruntime", "--export", out, "--npu", "ethos-u65-256")
    assert code == 2 and "--npu has no effect" in err, err


def test_api_refuses_an_unknown_npu(tmp_path):
    import ulsam_deploy as ud

    with pytest.raises(ud.UlsamError, match="ethos-u99"):
        ud.export(DIGITS, "tflite-int8-npu", out=tmp_path / "exp", npu="ethos-u99")
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_npu_export_runs_every_op_on_the_npu_and_passes_the_gate(cli, tmp_path, monkeypatch):
    """Vela places every operator of MV2 + ULSAM on Ethos-U55 (one command stream, no CPU operator), the
    manifest records the compiled file and Vela's estimate, check gates the uncompiled file with LiteRT, and
    another --npu recompiles while the same one keeps what is there."""
    pytest.importorskip("onnx2tf")
    pytest.importorskip("ethosu")
    from ulsam_deploy.export.vela import operators

    monkeypatch.setenv("ULSAM_EXPORT_WORKERS", "1")      # one process: the second export reuses the conversion
    out = tmp_path / "exp"
    code, _, err = cli("export", "--model", DIGITS, "--formats", "tflite-int8-npu", "--out", out)
    assert code == 0, err
    entry = Manifest.load(out).artifacts["tflite-int8-npu"]
    vela = entry["vela"]
    assert vela["npu"] == "ethos-u55-128" and vela["accelerator"] == "Ethos_U55_128"
    assert vela["operators"]["cpu"] == 0 and vela["operators"]["segments"] == 1 and vela["operators"]["npu"] > 100
    assert operators(out / vela["file"]) == ["ethos-u"]
    assert {"LOG", "EXP"} <= set(entry["xnnpack"]["ops"]) and "DIV" not in entry["xnnpack"]["ops"]
    estimate = vela["estimate"]
    assert estimate["clock_mhz"] == 500 and estimate["cycles"] > 0 and estimate["sram_kib"] > 0
    assert abs(estimate["inference_ms"] - estimate["cycles"] / estimate["clock_mhz"] / 1e3) < 1e-3
    assert entry["io"]["inputs"][0]["dtype"] == "int8"

    code, stdout, err = cli("check", "--export", out, "--json")
    assert code == 0, err
    rows = {row["artifact"]: row for row in json.loads(stdout)}
    assert rows["tflite-int8-npu"]["passed"] and rows["tflite-int8-npu"]["top1_agreement"] >= 99.0

    code, stdout, err = cli("export", "--model", DIGITS, "--formats", "tflite-int8-npu", "--out", out, "--json")
    kept = {a["format"]: a["status"] for a in json.loads(stdout)["artifacts"]}
    assert code == 0 and kept["tflite-int8-npu"] == "kept", stdout
    code, _, err = cli("export", "--model", DIGITS, "--formats", "tflite-int8-npu", "--npu", "ethos-u65-256",
                       "--out", out)
    assert code == 0, err
    u65 = Manifest.load(out).artifacts["tflite-int8-npu"]["vela"]
    assert u65["accelerator"] == "Ethos_U65_256" and u65["operators"]["cpu"] == 0
    assert u65["estimate"]["clock_mhz"] == 1000 and u65["sha256"] != vela["sha256"]

    code, stdout, err = cli("bench", "--backend", "ethos-u", "--export", out, "--no-parity", "--json")
    assert code == 0, err
    shown = json.loads(stdout)["estimates"][0]
    assert shown["npu"] == "ethos-u65-256" and shown["cycles"] == u65["estimate"]["cycles"] and shown["cpu_ops"] == 0
    code, _, err = cli("bench", "--backend", "ethos-u", "--export", out, "--npu", "ethos-u55-128", "--no-parity")
    assert code == 2 and "compiled for ethos-u65-256" in err, err


@pytest.mark.slow
def test_mcu_file_runs_on_tflite_micro_as_on_litert(cli, tmp_path, monkeypatch):
    """The microcontroller file passes the gate on TFLite Micro, which computes what LiteRT's reference kernels
    compute on it (LiteRT's optimised kernels round differently, a few steps apart); TFLite Micro refuses the NPU
    file's INT8 EXP in one line."""
    pytest.importorskip("onnx2tf")
    pytest.importorskip("tflite_micro")
    import numpy as np
    from ai_edge_litert.interpreter import OpResolverType

    from ulsam_deploy.errors import InputFileError
    from ulsam_deploy.runtime import open_artifact

    monkeypatch.setenv("ULSAM_EXPORT_WORKERS", "1")      # one process: the NPU file reuses the test above's conversion
    out = tmp_path / "exp"
    code, _, err = cli("export", "--model", DIGITS, "--formats", "tflite-int8-mcu,tflite-int8-npu", "--out", out)
    assert code == 0, err
    manifest = Manifest.load(out)
    assert manifest.artifacts["tflite-int8-mcu"]["backend"] == "tflm"
    code, stdout, err = cli("check", "--export", out, "--formats", "tflite-int8-mcu", "--json")
    rows = {row["artifact"]: row for row in json.loads(stdout)}
    assert code == 0 and rows["tflite-int8-mcu"]["passed"] and rows["tflite-int8-mcu"]["backend"] == "tflm", err

    size = manifest.spec.input_size
    x = np.random.default_rng(0).normal(size=(16, 3, size, size)).astype(np.float32)
    path = out / "model_int8_mcu.tflite"
    micro = open_artifact(path, "tflm", "int8")
    reference = open_artifact(path, "litert", "int8", experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    try:
        got, want = micro(x), np.concatenate([reference(x[i:i + 1]) for i in range(len(x))])
    finally:
        micro.close()
        reference.close()
    step = float(manifest.artifacts["tflite-int8-mcu"]["io"]["outputs"][0]["quantization"]["scale"])
    identical = (np.abs(got - want) < step / 2).all(axis=1)
    # measured on 1,000 Fashion images at 112 px: 999 identical, one a single step apart
    assert identical.sum() >= len(x) - 1 and np.abs(got - want).max() <= step * 1.001
    with pytest.raises(InputFileError, match="TFLite Micro cannot load model_int8_npu.tflite"):
        open_artifact(out / "model_int8_npu.tflite", "tflm", "int8")
