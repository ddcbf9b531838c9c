"""ARM64 seen from an x86 machine: a pack's verify.py run by the arm64 sysroot's Python under qemu-aarch64
(``check --emulate cortex-a76``; the run recorded as emulated is in test_pack.py, on its export). Refused in one
line, naming how to build it, when its environment is not built; formats it has no runtime for are named and
left out."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ulsam_deploy.store.manifest import Manifest
from ulsam_deploy.verify import arm64_env
from ulsam_deploy.verify.emulate import EMULATED_CPUS, Emulator, _split, not_run_line

X86 = platform.machine().lower() in ("x86_64", "amd64")


needs_env = pytest.mark.skipif(
    not (X86 and arm64_env.is_built()), reason=f"the ARM64 emulation environment is not built in {arm64_env.env_dir()} (or this "
                                   "is no x86-64 host): `make emulator-arm64`, which make test runs")


def test_not_built_names_the_command_that_builds_it(tmp_path, cli, monkeypatch):
    monkeypatch.setenv(arm64_env.ENV_VAR, str(tmp_path / "empty"))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    code, _, err = cli("check", "--export", tmp_path / "exp", "--emulate", "cortex-a76")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "not built" in err and str(tmp_path / "empty") in err and "make emulator-arm64" in err, err
    assert list(tmp_path.iterdir()) == []                      # refused before the export is read or a pack made


def test_half_built_environment_is_not_built(tmp_path):
    (tmp_path / "env" / "sysroot" / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "env" / arm64_env.QEMU_BINARY).write_text("")             # no ready.json: a build that stopped
    with pytest.raises(arm64_env.BackendUnavailable, match="not built"):
        arm64_env.locate(tmp_path)


def test_build_without_apt_get_is_one_line_and_builds_nothing(tmp_path):
    (tmp_path / "bin").mkdir()
    script = Path(__file__).resolve().parents[1] / "scripts" / "emulator-arm64.py"
    run = subprocess.run([sys.executable, str(script), "--dir", str(tmp_path / "env")], capture_output=True, text=True,
                         env={"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)}, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert ("needs apt-get" in run.stderr or "x86-64 host" in run.stderr) and not (tmp_path / "env").exists()


def test_formats_without_a_runtime_are_named_and_left_out():
    artifacts = {"onnx": {"backend": "onnxruntime", "precision": "fp32"},
                 "onnx-int8": {"backend": "onnxruntime", "precision": "int8"},
                 "tflite-int8": {"backend": "litert", "precision": "int8"},
                 "executorch-fp32": {"backend": "executorch", "precision": "fp32"},
                 "executorch-int8": {"backend": "executorch", "precision": "int8"},
                 "trt-int8": {"backend": "tensorrt", "precision": "int8"}}
    arm = Emulator(EMULATED_CPUS["cortex-a76"], [], {"executorch": arm64_env.not_run_reason("executorch")})
    run, skipped = _split(artifacts, arm, None)            # the INT8 default, TensorRT never packed
    assert run == ["onnx-int8", "tflite-int8"] and list(skipped) == ["executorch-int8"]
    assert "torch" in skipped["executorch-int8"]
    why = skipped["executorch-int8"]
    assert _split(artifacts, arm, ["onnx", "executorch-fp32"]) == (["onnx"], {"executorch-fp32": why})
    assert not_run_line(_split(artifacts, arm, ["onnx", "executorch-fp32", "executorch-int8"])[1]).startswith(
        "executorch-fp32, executorch-int8 (ExecuTorch")
    with pytest.raises(arm64_env.BackendUnavailable, match="cannot run executorch-int8"):
        _split(artifacts, arm, ["executorch-int8"])
    assert _split(artifacts, Emulator(EMULATED_CPUS["haswell"], []), None) == (["onnx-int8", "tflite-int8",
                                                                                "executorch-int8"], {})


@pytest.mark.slow
@needs_env
def test_litert_int8_runs_on_an_emulated_cortex_a72(tflite_export, cli):
    code, stdout, err = cli("check", "--export", tflite_export, "--emulate", "cortex-a72", "--formats", "tflite-int8",
                            "--images", "8", "--json")
    assert code == 0, err
    run = json.loads(stdout)
    assert run["device"] == "Cortex-A72 (emulated)" and [r["artifact"] for r in run["results"]] == ["tflite-int8"]
    assert run["results"][0]["passed"] and run["results"][0]["top1_agreement"] == 100.0
    assert Manifest.load(tflite_export).data["verified_on"][-1]["device"]["runtimes"]["litert"].startswith("ai_edge")
