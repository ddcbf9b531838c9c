import os
import shutil
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ulsam_deploy.cli import app
from ulsam_deploy.store import onnxcache


SHARED = "ULSAM_TEST_SHARED"   # a folder the run's worker processes share (and the CLIs they start)


def pytest_configure(config):
    """One scratch folder for the whole run, shared by its worker processes: the ONNX export cache (not the
    user's: a network exported by one test is copied by the next; ULSAM_DEPLOY_CACHE=off runs without it) and
    what the session fixtures build once for every worker (see ``shared_once``)."""
    if hasattr(config, "workerinput"):
        return
    config._shared = tempfile.mkdtemp(prefix="ulsam-test-run-")
    os.environ[SHARED] = config._shared
    if os.environ.get(onnxcache.ENV, "").lower() != "off":
        os.environ[onnxcache.ENV] = str(Path(config._shared) / "onnx-cache")


def pytest_unconfigure(config):
    folder = getattr(config, "_shared", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def shared_once(name: str, build) -> Path:
    """``build(folder)`` once per run across worker processes (the others wait for it); the folder."""
    from filelock import FileLock

    root = Path(os.environ.get(SHARED) or tempfile.gettempdir())
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


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
def tflite_export():
    """Every TFLite format of the shipped digits model (one conversion for the run's TFLite tests, whichever
    worker process asks first), and beside it in ``raw/`` the converter's own fp32 and fp16 files."""
    pytest.importorskip("onnx2tf", reason="TFLite extra not installed: pip install 'ulsam-deploy[tflite]'")
    from ulsam_deploy.export import tflite
    from ulsam_deploy.nets.build import sha256_file

    model = Path(__file__).resolve().parents[1] / "models" / "mv2-ulsam-13-14-16-17-g4-digits"

    def build(folder: Path) -> None:
        out = folder / "exp"
        # built in this process (one lane): tests compare the shipped files with the converter's own output
        result = CliRunner().invoke(app, ["export", "--model", str(model), "--formats",
                                          "tflite-fp32,tflite-fp16,tflite-int8,tflite-int8-plain", "--out", str(out),
                                          "--json"], env={"ULSAM_EXPORT_WORKERS": "1"})
        assert result.exit_code == 0, result.stderr
        digest = sha256_file(out / "reference.safetensors") + "-spatial"     # tflite's key: reference and form
        converted = Path(tflite._SAVED[digest].name) / "out"
        (folder / "raw").mkdir()
        for name in ("model_float32.tflite", "model_float16.tflite"):
            shutil.copyfile(converted / name, folder / "raw" / name)

    return shared_once("tflite-export", build) / "exp"
