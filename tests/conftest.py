from pathlib import Path

import pytest
from typer.testing import CliRunner

from ulsam_deploy.cli import app


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
