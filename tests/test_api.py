"""The Python API: the public surface, quiet results equal to the CLI's on the same export, and bad arguments
raised as the package's own exceptions (never SystemExit)."""

import json
from pathlib import Path

import pytest
import torch

import ulsam_deploy as ud
from ulsam_deploy.errors import SpecError, UlsamError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "mv2-ulsam-13-14-16-17-g4-digits"

PUBLIC = ["build", "load", "profile", "export", "check", "inspect", "bench", "train", "UlsamError", "SpecError",
          "InputFileError", "BackendUnavailable", "StaleArtifactError", "RunFailed", "Interrupted", "__version__"]


def test_the_public_surface_is_listed_once_and_each_name_is_there():
    assert sorted(ud.__all__) == sorted(PUBLIC)           # a name that disappears (or appears unlisted) fails here
    for name in PUBLIC:
        assert getattr(ud, name) is not None, name
    assert all(issubclass(getattr(ud, n), ud.UlsamError) for n in PUBLIC if n.endswith(("Error", "Failed", "Unavailable"))
               or n == "Interrupted")
    assert (ROOT / "ulsam_deploy" / "py.typed").is_file()
    import ulsam_deploy.bench.suite  # noqa: F401 - the subpackages of the same names leave the functions in place
    import ulsam_deploy.export.pipeline  # noqa: F401
    assert callable(ud.export) and callable(ud.bench)
    for name in ("build", "load", "profile", "export", "check", "inspect", "bench", "train"):
        hints = getattr(ud, name).__annotations__
        assert "return" in hints and getattr(ud, name).__doc__, name


def test_a_model_built_in_code_exports_and_checks_quietly_as_the_cli_does(tmp_path, capfd, cli):
    model = ud.build("mv2", "13,14,16,17", width=0.35, num_classes=10, input_size=32)
    with torch.no_grad():                                       # changed in code: still exports, as ours
        model.classifier.bias.copy_(torch.arange(10.0))
    manifest = ud.export(model, ["onnx"], out=tmp_path / "exp")
    report = ud.check(manifest, data="digits")
    out, err = capfd.readouterr()
    assert out == "" and err == ""                              # nothing printed unless asked
    assert report.passed and [r.artifact for r in report.results] == ["onnx"]
    code, stdout, _ = cli("check", "--export", tmp_path / "exp", "--data", "digits", "--json")
    assert code == 0
    row = json.loads(stdout)[0]
    mine = report.results[0]
    assert row["passed"] and row["top1_agreement"] == mine.top1_agreement and row["max_abs"] == mine.max_abs
    assert manifest.data["checkpoint"] == {"in_memory": "MobileNet"}


@pytest.mark.slow
def test_a_shipped_model_loads_exports_and_checks_from_python(tmp_path):
    model = ud.load(DIGITS)
    assert model.spec.num_classes == 10 and not model.training
    report = ud.check(ud.export(DIGITS, "onnx,onnx-int8", out=tmp_path / "exp"))
    assert report.passed and {r.artifact for r in report.results} == {"onnx", "onnx-int8"}
    assert ud.profile(DIGITS).macs == ud.profile(model).macs > 0 and ud.profile(arch="mv1", positions="8:1").params > 0


@pytest.mark.parametrize("call, says", [
    (lambda tmp: ud.build("mv3"), "mv3"),
    (lambda tmp: ud.build("mv2", "99"), "99"),
    (lambda tmp: ud.export(torch.nn.Linear(2, 2), out=tmp / "x"), "Linear is not a model of ours"),
    (lambda tmp: ud.export(DIGITS, "onnx,bogus", out=tmp / "x"), "bogus"),
    (lambda tmp: ud.export(DIGITS, out=tmp / "x", class_names=["a"]), "class_names"),
    (lambda tmp: ud.export(DIGITS, out=tmp / "x", keep_float="auto"), "keep_float 'auto'"),
    (lambda tmp: ud.check(tmp / "nothing-here"), "nothing-here"),
    (lambda tmp: ud.check(tmp, thresholds={"max_abss": 1.0}), "max_abss"),
    (lambda tmp: ud.check(tmp, threads=-1), "threads"),
    (lambda tmp: ud.load(tmp / "missing.safetensors"), "missing.safetensors"),
    (lambda tmp: ud.train("digits", tmp / "m", epochs=0), "epochs 0"),
    (lambda tmp: ud.train("digits", tmp / "m", schedule="linear"), "linear"),
    (lambda tmp: ud.bench(DIGITS, backends="tpu"), "tpu"),
])
def test_a_bad_argument_raises_the_packages_exception_naming_it(tmp_path, call, says):
    with pytest.raises(UlsamError) as raised:
        call(tmp_path)
    assert says in raised.value.one_line()
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()


def test_spec_errors_are_a_kind_of_the_base():
    with pytest.raises(SpecError):
        ud.build("mv2", "13,14", groups=7)
