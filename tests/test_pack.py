"""Verification where it runs: `pack` (same bytes twice), the pack's verify.py (one line and exit 2 on any bad
input, never a traceback) and `check --device-result` (every verdict recomputed; forged or foreign results
refused, nothing recorded)."""

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from small_models import model_file
from ulsam_deploy.store.manifest import Manifest
from ulsam_deploy.verify import arm64_env, device_verify
from ulsam_deploy.verify.parity import ParityAccumulator, Thresholds, judge, ParityResult

IMAGES = "48"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    root = tmp_path_factory.mktemp("pack")
    out = root / "exp"
    result = CliRunner().invoke(app, ["export", "--model", str(model_file(root)), "--formats",
                                      "onnx,onnx-int8,onnx-int8-trt", "--calib", "digits", "--calib-samples", "64",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def packed(export, tmp_path_factory):
    """A folder pack of the export (48 labelled digits) and the result of its verify.py on this machine."""
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    folder = tmp_path_factory.mktemp("packed")
    result = CliRunner().invoke(app, ["pack", "--export", str(export), "--out", str(folder / "pack"), "--data",
                                      "digits", "--images", IMAGES, "--json"])
    assert result.exit_code == 0, result.stderr
    run = verify(folder / "pack", "--out", folder / "result.json")
    assert run.returncode == 0, run.stderr
    return folder / "pack", folder / "result.json", json.loads(result.stdout)


def verify(pack: Path, *args, python=(sys.executable, "-I")) -> subprocess.CompletedProcess:
    return subprocess.run([*python, str(pack / "verify.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_line_exit_2(run, *words):
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, run.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_pack_is_byte_identical_twice_and_zip_holds_the_folder(export, packed, tmp_path, cli):
    pack, _, summary = packed
    for name in ("a.zip", "b.zip"):
        code, _, err = cli("pack", "--export", export, "--out", tmp_path / name, "--data", "digits", "--images", IMAGES)
        assert code == 0, err
    a, b = (tmp_path / "a.zip").read_bytes(), (tmp_path / "b.zip").read_bytes()
    assert a == b
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        names = archive.namelist()
        assert names == sorted(names) == sorted(p.name for p in pack.iterdir())
        assert all(archive.read(n) == (pack / n).read_bytes() for n in names)
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    meta = json.loads((pack / "pack.json").read_text())
    assert meta["pack_id"] == summary["pack_id"] == device_verify.pack_id_of(meta)
    assert set(meta["artifacts"]) == {"onnx", "onnx-int8", "onnx-int8-trt"}
    assert meta["artifacts"]["onnx-int8-trt"]["graph"] == "qdq" and meta["artifacts"]["onnx"]["graph"] == "fused"
    assert meta["artifacts"]["onnx"]["thresholds"]["max_abs_rel"] == 1e-5
    assert np.load(pack / "inputs.npy").shape == (48, 3, 64, 64) and np.load(pack / "labels.npy").shape == (48,)
    assert (export / "packs" / meta["pack_id"] / "reference.npy").read_bytes() == (pack / "reference.npy").read_bytes()


def test_result_holds_identity_probe_logits_and_latency(packed):
    pack, result_path, _ = packed
    result = json.loads(result_path.read_text())
    assert result["pack_id"] == json.loads((pack / "pack.json").read_text())["pack_id"]
    assert result["device"]["cpu"] and result["device"]["cores"] >= 1 and result["device"]["python"]
    assert result["probe"]["expected"] == 64 * 255 * 127 and isinstance(result["probe"]["saturates"], bool)
    reference = np.load(pack / "reference.npy")
    for name, artifact in result["artifacts"].items():
        raw = base64.b64decode(artifact["outputs"]["base64"])
        assert hashlib.sha256(raw).hexdigest() == artifact["outputs"]["sha256"]
        logits = np.frombuffer(raw, "<f4").reshape(artifact["outputs"]["shape"])
        assert logits.shape == reference.shape
        assert artifact["latency_ms"]["runs"] == 48 and artifact["latency_ms"]["p90"] >= artifact["latency_ms"]["p50"] > 0
    assert np.abs(logits - reference).max() < 1.0       # the last one (INT8) is near the eager model


def test_device_result_is_recomputed_and_recorded(export, packed, cli):
    _, result_path, _ = packed
    code, stdout, err = cli("check", "--export", export, "--device-result", result_path, "--json")
    assert code == 0, err
    run = json.loads(stdout)
    assert run["emulated"] is False and [r["artifact"] for r in run["results"]] == ["onnx", "onnx-int8", "onnx-int8-trt"]
    assert all(r["count"] == 48 and r["accuracy"] is not None for r in run["results"])
    entries = Manifest.load(export).data["verified_on"]
    assert len(entries) == 1 and entries[0]["emulated"] is False and set(entries[0]["artifacts"]) == {
        "onnx", "onnx-int8", "onnx-int8-trt"}
    code, _, _ = cli("check", "--export", export, "--device-result", result_path)    # the same run: replaced
    assert code == 0 and len(Manifest.load(export).data["verified_on"]) == 1
    code, stdout, err = cli("check", "--export", export, "--formats", "onnx", "--data", "digits", "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["verified_on"] == [entries[0]["device"]["label"] + ": pass"]
    # a tighter threshold at home gives check's verdict, not the device's
    code, _, err = cli("check", "--export", export, "--device-result", result_path, "--min-top1", "100.01")
    assert code == 1 and "FAIL onnx" in err


def _forge(result_path: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(result_path.read_text())
    edit(data)
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(data))
    return path


def _set_logits(data, name, transform):
    outputs = data["artifacts"][name]["outputs"]
    logits = np.frombuffer(base64.b64decode(outputs["base64"]), "<f4").reshape(outputs["shape"])
    raw = np.ascontiguousarray(transform(logits.copy()), "<f4").tobytes()
    outputs["base64"], outputs["sha256"] = base64.b64encode(raw).decode(), hashlib.sha256(raw).hexdigest()


FORGERIES = {
    "statistics": (lambda d: d["artifacts"]["onnx-int8"]["statistics"].update(top1_agreement=100.0, cosine_min=1.0),
                   "do not add up"),
    "logits, hash kept": (lambda d: d["artifacts"]["onnx"]["outputs"].update(
        base64=base64.b64encode(b"\0" * (48 * 10 * 4)).decode()), "sha256"),
    "logits and hash": (lambda d: _set_logits(d, "onnx", lambda x: x[::-1]), "do not add up"),
    "verdict": (lambda d: d["artifacts"]["onnx"].update(passed=False), "says FAIL"),
    "fewer logits": (lambda d: _set_logits(d, "onnx", lambda x: x[:40]), "float32"),
    "another pack": (lambda d: d.update(pack_id="ab" * 32), "not made from"),
    "artifact swapped": (lambda d: d["artifacts"]["onnx"].update(sha256="cd" * 32), "not the pack's"),
    "not a result": (lambda d: d.update(format="something/1"), "not a result"),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_or_foreign_results_are_refused_and_nothing_recorded(export, packed, tmp_path, cli, forgery):
    _, result_path, _ = packed
    edit, words = FORGERIES[forgery]
    before = (export / "manifest.json").read_bytes()
    code, _, err = cli("check", "--export", export, "--device-result", _forge(result_path, tmp_path, edit))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert (export / "manifest.json").read_bytes() == before


def test_result_of_another_export_or_rebuilt_artifact_is_refused(export, packed, tmp_path, cli):
    _, result_path, _ = packed
    other = tmp_path / "other"
    shutil.copytree(export, other, ignore=shutil.ignore_patterns("packs"))
    code, _, err = cli("check", "--export", other, "--device-result", result_path)
    assert code == 2 and "not made from" in err and err.count("\n") == 1
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(export, rebuilt)
    manifest = Manifest.load(rebuilt)
    (rebuilt / "model.int8.onnx").write_bytes((rebuilt / "model.onnx").read_bytes())
    manifest.record("onnx-int8", "model.int8.onnx", "int8", "onnxruntime", 0.0)
    code, _, err = cli("check", "--export", rebuilt, "--device-result", result_path)
    assert code == 2 and "rebuilt" in err and err.count("\n") == 1


def test_emulation_is_recognised_from_the_cpu_the_process_saw(export, packed, tmp_path, cli):
    """/proc/cpuinfo shows the host under QEMU user mode; CPUID shows the emulated CPU: disagreement is emulation."""
    _, result_path, _ = packed

    def edit(data):
        data["device"].update(machine="x86_64", cpu_flags=["avx2", "avx512f", "avx512bw"], cpu_features=["AVX2"])

    code, stdout, err = cli("check", "--export", export, "--device-result", _forge(result_path, tmp_path, edit), "--json")
    assert code == 0, err
    assert json.loads(stdout)["emulated"] is True
    assert Manifest.load(export).data["verified_on"][-1]["emulated"] is True


def _copy(pack: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(pack, copy)
    return copy


@pytest.mark.parametrize("damage,named", [
    (lambda p: (p / "model.int8.onnx").write_bytes((p / "model.int8.onnx").read_bytes()[:1000]), "model.int8.onnx"),
    (lambda p: shutil.copyfile(p / "model.int8.onnx", p / "model.onnx"), "model.onnx"),
    (lambda p: (p / "reference.npy").unlink(), "reference.npy"),
    (lambda p: (p / "pack.json").write_text((p / "pack.json").read_text().replace('"fp32"', '"fp16"', 1)), "pack.json"),
])
def test_damaged_pack_is_one_line_exit_2_naming_the_file(packed, tmp_path, damage, named):
    copy = _copy(packed[0], tmp_path)
    damage(copy)
    run = verify(copy, "--out", tmp_path / "r.json")
    one_line_exit_2(run, named)
    assert not (tmp_path / "r.json").exists()


BLOCK = ("import sys, runpy\n"
         "class Block:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in {blocked!r}:\n"
         "            raise ImportError('blocked: ' + name)\n"
         "sys.meta_path.insert(0, Block())\n"
         "sys.argv = sys.argv[1:]\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def blocking(*modules) -> tuple:
    """A Python that cannot import ``modules``: runs the script named next as verify.py would be run."""
    return sys.executable, "-I", "-c", BLOCK.format(blocked=set(modules))


@pytest.mark.parametrize("args,words", [
    (("--formats", "tflite-int8"), ("tflite-int8", "not in this pack")),
    (("--formats", "onnx", "--images", "4000"), ("--images 4000",)),
    (("--threads", "-1"), ("--threads",)),
    (("--bogus",), ("unrecognized",)),
    (("--out", "{tmp}/file.txt/result.json"), ("cannot be written",)),
    (("--out", "{tmp}"), ("is a folder",)),
])
def test_verifier_bad_options_are_one_line(packed, tmp_path, args, words):
    (tmp_path / "file.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "r.json")]
    one_line_exit_2(verify(packed[0], *args), *words)
    assert not (tmp_path / "r.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_missing_runtime_names_the_package(packed, tmp_path):
    run = verify(packed[0], "--out", tmp_path / "r.json", python=blocking("onnxruntime"))
    one_line_exit_2(run, "onnxruntime", "pip install onnxruntime")
    assert not (tmp_path / "r.json").exists()


def test_device_statistics_are_checks(rng=np.random.default_rng(0)):
    """The verifier's standalone statistics and breaches are check's (ParityAccumulator, judge), NaN included."""
    reference = rng.normal(size=(64, 10)).astype(np.float32)
    logits = reference + rng.normal(scale=0.3, size=reference.shape).astype(np.float32)
    logits[3, 2] = np.nan
    labels = rng.integers(0, 10, 64)
    device = device_verify.statistics(logits, reference, labels)
    accumulator = ParityAccumulator()
    for start in range(0, 64, 32):
        accumulator.update(logits[start:start + 32], reference[start:start + 32], labels[start:start + 32])
    home = accumulator.result()
    assert device.pop("count") == 64 and set(device) == set(home)
    for key, value in home.items():
        assert np.isclose(device[key], value, rtol=1e-9, equal_nan=True), key
    for limits in (Thresholds(max_abs=1e-4, min_top1_agreement=100.0), Thresholds(max_abs_rel=0.5),
                   Thresholds(min_top1_agreement=50.0, min_cosine=0.5, min_accuracy_delta=-1.0)):
        verdict = judge(ParityResult("x", "b", "p", 64, "d", **home), limits)
        assert device_verify.breaches(device | {"count": 64}, vars(limits)) == verdict.breaches


@pytest.mark.parametrize("args,words", [
    (("--device-result", "r.json"), ("needs --export",)),
    (("--export", "{exp}", "--emulate", "pentium"), ("pentium", "haswell")),
    (("--export", "{exp}", "--device-result", "{tmp}/none.json"), ("cannot be read",)),
    (("--export", "{exp}", "--device-result", "{tmp}/r.json", "--emulate", "haswell"), ("--emulate has no effect",)),
])
def test_check_device_options_are_refused_in_one_line(export, tmp_path, cli, args, words):
    args = [a.replace("{exp}", str(export)).replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = cli("check", *args)
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err


def test_emulate_without_qemu_names_how_to_install_it(export, cli, monkeypatch):
    import platform

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    code, _, err = cli("check", "--export", export, "--emulate", "haswell")
    assert code == 2 and "make emulator" in err and "apt-get install qemu-user" in err and err.count("\n") == 1


@pytest.mark.parametrize("args,words", [
    (("--formats", "trt-fp16"), ("TensorRT",)),
    (("--formats", "tflite-fp32"), ("no artifact 'tflite-fp32'",)),
    (("--out", "{tmp}/taken"), ("already exists",)),
])
def test_pack_refusals_write_nothing(export, tmp_path, cli, args, words):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new.zip")]
    kept = sorted((export / "packs").iterdir()) if (export / "packs").exists() else []
    code, _, err = cli("pack", "--export", export, *args)
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (sorted((export / "packs").iterdir()) if (export / "packs").exists() else []) == kept


@pytest.mark.slow
def test_verifier_runs_where_torch_and_this_package_cannot_be_imported(packed, tmp_path):
    pack, result_path, _ = packed
    run = verify(pack, "--out", tmp_path / "r.json", "--threads", "1", python=blocking("torch", "ulsam_deploy"))
    assert run.returncode == 0, run.stderr
    assert "onnx-int8-trt" in run.stdout and "int8 probe" in run.stdout
    mine, home = json.loads((tmp_path / "r.json").read_text()), json.loads(result_path.read_text())
    assert mine["pack_id"] == home["pack_id"] and mine["threads"] == 1
    for name, artifact in mine["artifacts"].items():     # the same kernels give the same logits
        assert artifact["statistics"]["top1_agreement"] == home["artifacts"][name]["statistics"]["top1_agreement"]


QEMU = shutil.which("qemu-x86_64")
X86 = __import__("platform").machine().lower() in ("x86_64", "amd64")


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None or not X86,
                    reason="qemu-x86_64 is not installed on an x86 host: `make emulator` or `apt-get install qemu-user`")
@pytest.mark.parametrize("cpu,probe", [("haswell", "saturates"), ("nehalem", "exact")])
def test_emulated_run_is_recorded_as_emulated(export, cli, cpu, probe):
    code, stdout, err = cli("check", "--export", export, "--emulate", cpu, "--formats", "onnx-int8,onnx-int8-trt",
                            "--data", "digits", "--images", "8", "--json")
    assert code == 0, err
    run = json.loads(stdout)
    assert run["emulated"] is True and run["device"] == f"{cpu.capitalize()} (emulated)" and run["probe"] == probe
    entry = Manifest.load(export).data["verified_on"][-1]
    assert entry["emulated"] is True and entry["emulated_cpu"] == cpu.capitalize() and entry["int8_probe"] == probe
    assert entry["images"] == 8 and entry["threads"] == 1 and set(entry["artifacts"]) == {"onnx-int8", "onnx-int8-trt"}
    assert all(a["passed"] for a in entry["artifacts"].values())


@pytest.mark.slow
@pytest.mark.skipif(not (X86 and arm64_env.is_built()), reason="the ARM64 emulation environment is not built here "
                                                             "(or this is no x86-64 host): `make emulator-arm64`")
@pytest.mark.parametrize("cpu,label", [("cortex-a76", "Cortex-A76"), ("neoverse-n2", "Neoverse-N2")])
def test_emulated_arm64_run_is_recorded_as_emulated(export, cli, cpu, label):
    code, stdout, err = cli("check", "--export", export, "--emulate", cpu, "--data", "digits", "--images", "8",
                            "--json")
    assert code == 0, err
    run = json.loads(stdout)
    assert run["emulated"] is True and run["device"] == f"{label} (emulated)" and run["probe"] == "exact"
    assert run["identity"]["machine"] == "aarch64"
    entry = Manifest.load(export).data["verified_on"][-1]
    assert entry["emulated"] is True and entry["emulated_cpu"] == label and entry["device"]["machine"] == "aarch64"
    assert entry["images"] == 8 and entry["threads"] == 1 and set(entry["artifacts"]) == {"onnx-int8", "onnx-int8-trt"}
    assert all(a["passed"] for a in entry["artifacts"].values())
    assert entry["device"]["runtimes"]["onnxruntime"].startswith("onnxruntime ")


def test_emulation_defaults_to_the_int8_artifacts(export):
    from ulsam_deploy.verify.emulate import _int8_formats

    assert _int8_formats(export) == ["onnx-int8", "onnx-int8-trt"]
