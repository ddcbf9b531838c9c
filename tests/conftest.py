import os
import shutil
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ulsam_deploy.cli import app
from ulsam_deploy.store import onnxcache


def pytest_configure(config):
    """One ONNX export cache for the whole run (its worker processes and the CLIs they start inherit it), not
    the user's: a network exported by one test is copied by the next. ULSAM_DEPLOY_CACHE=off runs without."""
    if hasattr(config, "workerinput") or os.environ.get(onnxcache.ENV, "").lower() == "off":
        return
    config._onnx_cache = tempfile.mkdtemp(prefix="ulsam-test-onnx-cache-")
    os.environ[onnxcache.ENV] = config._onnx_cache


def pytest_unconfigure(config):
    folder = getattr(config, "_onnx_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def no_onnx_cache(monkeypatch):
    """For tests that time or interrupt the exporter itself: every export runs it."""
    monkeypatch.setenv(onnxcache.ENV, "off")


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture(scope="session")
def tflite_export(tmp_path_factory):
    """Every TFLite format of the shipped digits model (one conversion for the session's TFLite tests)."""
    pytest.importorskip("onnx2tf", reason="TFLite extra not installed: pip install 'ulsam-deploy[tflite]'")
    model = Path(__file__).resolve().parents[1] / "models" / "mv2-ulsam-13-14-16-17-g4-digits"
    out = tmp_path_factory.mktemp("tfl") / "exp"
    # built in this process (one lane): tests compare the shipped files with the converter's own output
    result = CliRunner().invoke(app, ["export", "--model", str(model), "--formats",
                                      "tflite-fp32,tflite-fp16,tflite-int8,tflite-int8-plain", "--out", str(out), "--json"],
                                env={"ULSAM_EXPORT_WORKERS": "1"})
    assert result.exit_code == 0, result.stderr
    return out
