"""The export directory and the gate: check never passes on nothing, refused input writes nothing,
unwritable output is one line, manifests are validated by one schema, interrupts clean up, and the
manifest records what a deployer must feed each artifact."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ulsam_deploy.store.manifest import MANIFEST, REFERENCE, Manifest
from ulsam_deploy.nets.build import sha256_file

SMALL = ["--arch", "mv2", "--positions", "13,14", "--width", "0.5", "--num-classes", "10", "--input-size", "64"]
CALIB = ["--calib", "digits", "--calib-samples", "32"]


def _one_line(code, err, expected_code=2):
    assert code == expected_code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from small_models import SPEC, model_file   # O(1) logits, so INT8 parity is meaningful

    assert SPEC.input_size == 64 and SPEC.num_classes == 10
    return model_file(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    out = tmp_path_factory.mktemp("dir") / "exp"
    result = CliRunner().invoke(app, ["export", "--model", str(model), "--formats", "onnx,onnx-int8", *CALIB,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def copy(exported, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(exported, target, ignore=shutil.ignore_patterns("reference-logits"))
    return target


def _edit(directory: Path, change) -> None:
    data = json.loads((directory / MANIFEST).read_text())
    change(data)
    (directory / MANIFEST).write_text(json.dumps(data))


# --- 1. the gate cannot pass on nothing --------------------------------------------------------------
def test_check_fails_when_the_manifest_lists_no_artifact(copy, cli):
    _edit(copy, lambda d: (d["artifacts"].clear(), d.__setitem__("promised", [])))
    code, out, err = cli("check", "--export", copy, "--data", "digits")
    assert code == 1 and "nothing was checked" in err, err
    code, out, err = cli("check", "--export", copy, "--data", "digits", "--json")
    assert code == 1 and json.loads(out) == []


def test_check_fails_naming_a_missing_format(copy, cli):
    code, out, err = cli("check", "--export", copy, "--data", "digits", "--formats", "onnx,onnx-int8-trt")
    assert code == 1 and "FAIL onnx-int8-trt: missing" in err, err
    _edit(copy, lambda d: d["artifacts"].pop("onnx-int8"))          # promised by the export, not listed
    code, out, err = cli("check", "--export", copy, "--data", "digits")
    assert code == 1 and "FAIL onnx-int8: missing" in err and "promises" in err, err


def test_check_passes_on_the_real_thing(exported, cli):
    code, out, err = cli("check", "--export", exported, "--data", "digits", "--json")
    assert code == 0, err
    assert {r["artifact"] for r in json.loads(out)} == {"onnx", "onnx-int8"}


# --- 3. refused input writes nothing -----------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    ["--calib", "{empty}"], ["--calib", "{missing}"], ["--calib", "{junk}"], ["--calib-samples", "100000"],
    ["--calib-method", "bogus"], ["--formats", "onnx,bogus"],
])
def test_refused_input_leaves_no_directory(cli, tmp_path, extra):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junkdir").mkdir()
    (tmp_path / "junkdir" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "junkdir" / "b.txt").write_text("text")
    names = {"{empty}": tmp_path / "empty", "{missing}": tmp_path / "nope", "{junk}": tmp_path / "junkdir"}
    extra = [str(names.get(value, value)) for value in extra]
    out = tmp_path / "new-out"
    code, _, err = cli("export", *SMALL, "--formats", "onnx,onnx-int8", *extra, "--out", out)
    _one_line(code, err)
    assert not out.exists()


# --- 4. unwritable or full output -------------------------------------------------------------------
def test_out_under_a_file_or_proc_is_one_line(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "exp", Path("/proc/ulsam-exp"), Path("/proc/self/nope/exp")):
        code, _, err = cli("export", *SMALL, "--formats", "onnx", "--out", out)
        _one_line(code, err)


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir()
    options = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_read_only_or_full_filesystem_is_one_line(cli, tmp_path, kind):
    mount = tmp_path / "mnt"
    if os.geteuid() != 0 or not _mount_tmpfs(mount, "1m" if kind == "full" else "16m", readonly=kind == "read-only"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        out = mount / "exp"
        code, _, err = cli("export", *SMALL, "--formats", "onnx", "--out", out)
        _one_line(code, err)
        if out.exists():   # nothing incomplete under a final name
            assert not list(out.glob("*.part")) and not (out / "model.onnx").exists()
            if (out / MANIFEST).exists():
                Manifest.load(out)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --- 5. the manifest schema ---------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (lambda d: d["artifacts"]["onnx"].pop("file"), "artifacts.onnx.file"),
    (lambda d: d.pop("weights_sha256"), "weights_sha256"),
    (lambda d: d["artifacts"].__setitem__("onnx", None), "artifacts.onnx"),
    (lambda d: d["artifacts"]["onnx"].__setitem__("file", "../other/model.onnx"), "inside the export directory"),
    (lambda d: d["artifacts"]["onnx"].__setitem__("file", "/etc/passwd"), "inside the export directory"),
    (lambda d: d["artifacts"]["onnx-int8"].__setitem__("keep_float", [5, "x"]), "artifacts.onnx-int8.keep_float"),
])
def test_a_manifest_that_does_not_fit_the_schema_is_refused_in_one_line(copy, cli, change, words):
    _edit(copy, change)
    for command in ("check", "parity"):
        code, _, err = cli(command, "--export", copy, "--data", "digits")
        _one_line(code, err)
        assert words in err, err


def test_export_repairs_a_manifest_that_does_not_fit_the_schema(copy, cli, model):
    _edit(copy, lambda d: d["artifacts"]["onnx"].__setitem__("file", "../other/model.onnx"))
    code, _, err = cli("check", "--export", copy, "--data", "digits")
    _one_line(code, err)
    reference = copy / REFERENCE
    code, _, err = cli("export", "--model", model, "--formats", "onnx,onnx-int8", *CALIB, "--out", copy)
    assert code == 0, err
    manifest = Manifest.load(copy)
    for entry in manifest.artifacts.values():
        assert sha256_file(copy / entry["file"]) == entry["sha256"]
    assert reference.exists()


# --- 7. what a deployer needs --------------------------------------------------------------------------
def test_manifest_records_io_and_reference_permissions(exported):
    manifest = Manifest.load(exported)
    io = manifest.artifacts["onnx"]["io"]
    assert io["inputs"][0]["shape"] == [None, 3, 64, 64] and io["inputs"][0]["layout"] == "NCHW"
    assert io["inputs"][0]["dtype"] == "float32" and io["outputs"][0]["shape"] == [None, 10]
    assert manifest.artifacts["onnx-int8"]["io"]["inputs"][0]["dtype"] == "float32"   # Q/DQ inside, float I/O
    umask = os.umask(0)
    os.umask(umask)
    for name in (REFERENCE, "model.onnx", MANIFEST):
        assert stat.S_IMODE((exported / name).stat().st_mode) == 0o666 & ~umask, name


# --- 2. concurrent exports -----------------------------------------------------------------------------
def _export_cmd(model: Path, out: Path, formats: str) -> list[str]:
    calib = CALIB if "int8" in formats else []      # calibration options without an INT8 format are refused
    return [sys.executable, "-m", "ulsam_deploy.cli", "export", "--model", str(model), "--formats", formats, *calib,
            "--out", str(out)]


@pytest.mark.slow
def test_concurrent_exports_into_one_directory_keep_every_artifact(tmp_path, cli, model):
    for repeat in range(3):
        out = tmp_path / f"exp{repeat}"
        procs = [subprocess.Popen(_export_cmd(model, out, formats), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for formats in ("onnx,onnx-int8", "onnx,onnx-int8-trt")]
        for proc in procs:
            assert proc.wait() == 0, proc.stderr.read()
        manifest = Manifest.load(out)
        assert set(manifest.artifacts) == {"onnx", "onnx-int8", "onnx-int8-trt"}
        on_disk = {p.name for p in out.glob("model*.onnx")}
        assert on_disk == {e["file"] for e in manifest.artifacts.values()}
        for entry in manifest.artifacts.values():
            assert sha256_file(out / entry["file"]) == entry["sha256"]
        code, _, err = cli("check", "--export", out, "--data", "digits")
        assert code == 0, err


# --- 6. interrupts ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_is_one_line_and_cleans_up(tmp_path, model, sig):
    pytest.importorskip("onnx2tf")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "exp"
    env = os.environ | {"TMPDIR": str(scratch)}
    # a shell starts background jobs with SIGINT ignored, and Python keeps it so: give the export the default
    proc = subprocess.Popen(_export_cmd(model, out, "onnx,tflite-fp32"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    def recorded() -> set[str]:
        try:
            return set(Manifest.load(out).artifacts)
        except Exception:       # not written yet
            return set()

    # the TFLite step has begun and the ONNX file is done (in lanes they run side by side)
    deadline = time.time() + 300
    while time.time() < deadline and not (list(scratch.glob("ulsam-onnx2tf-*")) and "onnx" in recorded()):
        time.sleep(0.2)
    assert list(scratch.glob("ulsam-onnx2tf-*")), "the TFLite step never started"
    assert "onnx" in recorded(), "the ONNX file was never recorded"
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and "onnx" in lines[0], err
    assert "re-run" in lines[0]
    assert not list(scratch.glob("ulsam-*")), list(scratch.iterdir())
    assert set(Manifest.load(out).artifacts) == {"onnx"}


def test_reference_logits_are_cached_per_data_and_reused(copy, cli):
    def parity(*extra):
        code, out, err = cli("parity", "--export", copy, "--data", "digits", "--json", *extra)
        assert code == 0, err
        return json.loads(out)

    first, second = parity(), parity("--formats", "onnx")
    assert not first[0]["reference_cached"] and second[0]["reference_cached"]
    assert second[0]["max_abs"] == first[0]["max_abs"] and second[0]["top1_agreement"] == first[0]["top1_agreement"]
    assert len(list((copy / "reference-logits").glob("*.f32"))) == 1
    code, out, err = cli("parity", "--export", copy, "--data", "photos", "--json")   # other data: another entry
    assert code == 0 and not json.loads(out)[0]["reference_cached"]
    assert len(list((copy / "reference-logits").glob("*.f32"))) == 2
