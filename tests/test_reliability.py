"""Malformed input never crashes (fuzzed CLI), corrupt files are refused in one line, and an export
killed at any point leaves nothing incomplete under a final name."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

BAD_POSITIONS = ["0", "20:1", "-3", "1e9", "13,,14", "13:2", "١٣", ",".join(str(i % 19 + 1) for i in range(10_000)),
                 "13;14", "x", "13:1:1", "99999", "13,13", "13,13:1", "2", "19", " , ", "13.5", "０", "13:"]
BAD_VALUES = {
    "--positions": BAD_POSITIONS,
    "--groups": ["5", "0", "-4", "abc", "7", "1e3", "3.5"],
    "--width": ["0", "-1", "1e9", "nan", "inf", "wide", "0.0001"],
    "--num-classes": ["0", "-1", "1000001", "ten"],
    "--input-size": ["1", "1000000", "0", "31", "big"],
    "--arch": ["mv3", "resnet", "", "MV9"],
}
COMMANDS = ["profile", "build", "export", "parity", "check", "bench"]


def _bad_paths(root: Path) -> dict[str, list[str]]:
    (root / "empty_dir").mkdir(exist_ok=True)
    (root / "garbage.safetensors").write_bytes(b"\x00garbage" * 10)
    (root / "notes.txt").write_text("hello")
    return {"--model": [str(root / "missing"), str(root / "empty_dir"), str(root / "garbage.safetensors"),
                        str(root / "notes.txt")],
            "--export": [str(root / "missing"), str(root / "notes.txt"), str(root / "empty_dir")],
            "--calib": [str(root / "missing"), str(root / "empty_dir"), str(root / "notes.txt")]}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return root, _bad_paths(root)


def _assert_one_line_exit_2(code, out, err, value, option=None):
    assert code == 2, (value, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert out == ""
    if option is not None and len(value) < 40:   # the line names the bad value, or at least its option
        assert value.strip() in err or option.lstrip("-").rstrip("s").replace("-", " ") in err.replace("-", " "), (option, err)


@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(COMMANDS), option=st.sampled_from(sorted(BAD_VALUES)), data=st.data())
def test_fuzzed_spec_options(cli, sandbox, monkeypatch, command, option, data):
    root, _ = sandbox
    monkeypatch.chdir(root)
    value = data.draw(st.sampled_from(BAD_VALUES[option]))
    args = [command, "--arch", "mv2", "--positions", "13", "--groups", "4", "--input-size", "64", option, value]
    if command == "build":
        args += ["--out", str(root / "never.safetensors")]
    code, out, err = cli(*args)
    _assert_one_line_exit_2(code, out, err, value, option)
    assert not (root / "never.safetensors").exists() and not (root / "runs").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["profile", "export", "parity", "check", "bench", "evaluate"]),
       option=st.sampled_from(["--model", "--export", "--calib"]), data=st.data())
def test_fuzzed_paths(cli, sandbox, monkeypatch, command, option, data):
    root, paths = sandbox
    monkeypatch.chdir(root)
    if command in ("profile", "evaluate", "bench") and option != "--model":
        option = "--model"
    value = data.draw(st.sampled_from(paths[option]))
    args = [command, option, value]
    if option == "--calib":
        args += ["--arch", "mv2", "--input-size", "64", "--formats", "onnx-int8", "--out", str(root / "out")]
    code, out, err = cli(*args)
    _assert_one_line_exit_2(code, out, err, value)
    assert Path(value).name in err or "runs" not in err, err
    assert not list(root.rglob("*.part"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=30))
def test_fuzzed_free_text_positions(cli, sandbox, monkeypatch, text):
    root, _ = sandbox
    monkeypatch.chdir(root)
    code, out, err = cli("profile", "--positions", text, "--groups", "1", "--json")
    if code == 0:
        assert json.loads(out)["arch"] == "mv2"
    else:
        _assert_one_line_exit_2(code, out, err, text)


@pytest.mark.slow
def test_sigkill_during_export_leaves_nothing_incomplete(tmp_path, no_onnx_cache):   # kills the exporter itself
    import onnx

    from ulsam_deploy.store.manifest import Manifest
    from ulsam_deploy.nets.build import sha256_file

    out = tmp_path / "exp"
    command = [sys.executable, "-m", "ulsam_deploy.cli", "export", "--arch", "mv2", "--positions", "13,14",
               "--width", "0.5", "--num-classes", "10", "--input-size", "64", "--formats", "onnx,onnx-int8",
               "--calib", "digits", "--calib-samples", "32", "--out", str(out)]
    kills = 0
    for delay in (0.5, 2.0, 3.5, 5.0, 6.5, 8.0):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if not out.exists():
            continue
        manifest = Manifest.load(out) if (out / "manifest.json").exists() else None
        if manifest is not None:
            for key, entry in manifest.artifacts.items():
                assert sha256_file(out / entry["file"]) == entry["sha256"], key
        for name in ("model.onnx", "model.int8.onnx"):
            if (out / name).exists():
                onnx.checker.check_model(onnx.load(str(out / name)))
    assert kills >= 3
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = Manifest.load(out)
    assert set(manifest.artifacts) == {"onnx", "onnx-int8"}
    for entry in manifest.artifacts.values():
        assert sha256_file(out / entry["file"]) == entry["sha256"]
