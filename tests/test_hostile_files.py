"""Hostile .pth files, partial loads, non-UTF-8 names, folders a checkpoint names, signals, size limits and
options that change nothing (the rest of the hostile-input cases: tests/test_hostile.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets import build_model, save_checkpoint
from ulsam_deploy.store.manifest import MANIFEST, Manifest
from tests.hostile_helpers import (  # noqa: F401  (world is a fixture)
    SPEC, LATIN1, TV, _invoke, _one_line, _strict, _png, world, _copy_export, _snapshot)


# --- 3. garbage and malformed .pth -------------------------------------------------------------------
def _tv_state() -> dict:
    return torch.load(TV, weights_only=True)


GARBAGE = {
    "text": b"this is not a checkpoint\n",
    "empty": b"",
    "one byte": b"\x80",
    "zip header": b"PK\x03\x04" + b"\x00" * 40,
    "pickle protocol": b"\x80\x02}q\x00.",
    "legacy magic": b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.",
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
@pytest.mark.parametrize("command", ["build", "evaluate", "export", "profile"])
def test_garbage_pth_is_one_line(tmp_path, monkeypatch, case, command):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "garbage.pth"
    path.write_bytes(GARBAGE[case])
    args = {"build": ["build", "--from", path, "--out", tmp_path / "o.safetensors"],
            "evaluate": ["evaluate", "--model", path],
            "export": ["export", "--model", path, "--formats", "onnx", "--out", tmp_path / "exp"],
            "profile": ["profile", "--model", path]}[command]
    _one_line(*_invoke(*args)[::2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pth"]


def _bad_rank(state: dict, case: str) -> dict:
    if case == "0-dim classifier":
        state["classifier.1.weight"] = torch.tensor(0.5)
    elif case == "1-D classifier":
        state["classifier.1.weight"] = state["classifier.1.weight"].flatten()
    elif case == "2-D conv":
        state["features.0.0.weight"] = state["features.0.0.weight"].flatten(1)
    elif case == "0-dim BatchNorm":
        state["features.0.1.running_var"] = torch.tensor(1.0)
    elif case == "sparse conv":
        state["features.0.0.weight"] = state["features.0.0.weight"].to_sparse()
    elif case == "bool bias":
        state["classifier.1.bias"] = state["classifier.1.bias"] > 0
    return state


@pytest.mark.parametrize("case", ["0-dim classifier", "1-D classifier", "2-D conv", "0-dim BatchNorm",
                                  "sparse conv", "bool bias"])
def test_a_tensor_of_the_wrong_kind_is_one_line(tmp_path, case):
    path = tmp_path / "bad.pth"
    torch.save(_bad_rank(_tv_state(), case), path)
    for args in (["build", "--from", path, "--out", tmp_path / "o.safetensors"], ["profile", "--model", path]):
        code, _, err = _invoke(*args)
        _one_line(code, err)
    assert not (tmp_path / "o.safetensors").exists()


def test_an_official_layout_with_a_0_dim_subspace_is_one_line(tmp_path):
    from ulsam_deploy.nets.layouts import BY_NAME

    spec = ModelSpec.parse("mv2", "13", groups=2, width=0.35, num_classes=10)
    state = BY_NAME["official"].from_ours(build_model(spec).state_dict(), spec)
    key = next(k for k in state if k.endswith("subspaces.1.conv_dws.weight"))
    state[key] = torch.tensor(1.0)
    torch.save(state, tmp_path / "official.pth")
    _one_line(*_invoke("build", "--from", tmp_path / "official.pth", "--out", tmp_path / "o.safetensors")[::2])


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_mutated_pth_bytes_never_crash(tmp_path_factory, data):
    original = TV.read_bytes()
    kind = data.draw(st.sampled_from(["random", "truncate", "flip"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=200))
    elif kind == "truncate":
        blob = original[:data.draw(st.integers(0, len(original) - 1))]
    else:
        blob = bytearray(original)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    work = tmp_path_factory.mktemp("pth")
    (work / "m.pth").write_bytes(blob)
    code, _, err = _invoke("build", "--from", work / "m.pth", "--out", work / "o.safetensors")
    assert code in (0, 2), err
    if code == 2:
        _one_line(code, err)
        assert not (work / "o.safetensors").exists()


# --- 8. silent partial loads ---------------------------------------------------------------------------
@pytest.mark.parametrize("case,extra,expected", [
    ("one backbone tensor missing", [], "lacks 1 backbone tensor"),
    ("classifier missing", [], "has no classifier"),
    ("classifier missing", ["--num-classes", "10"], None),
    ("classifier bias missing", [], "classifier only in part"),
    ("num_batches_tracked missing", [], None),
])
def test_build_from_loads_every_backbone_tensor_or_refuses(tmp_path, case, extra, expected):
    state = _tv_state()
    drop = {"one backbone tensor missing": ["features.5.conv.1.0.weight"],
            "classifier missing": ["classifier.1.weight", "classifier.1.bias"],
            "classifier bias missing": ["classifier.1.bias"],
            "num_batches_tracked missing": [k for k in state if k.endswith("num_batches_tracked")]}[case]
    for key in drop:
        del state[key]
    torch.save(state, tmp_path / "tv.pth")
    code, out, err = _invoke("build", "--from", tmp_path / "tv.pth", "--out", tmp_path / "o.safetensors",
                             "--json", *extra)
    if expected is not None:
        _one_line(code, err)
        assert expected in err and not (tmp_path / "o.safetensors").exists()
        return
    assert code == 0, err
    summary = json.loads(out)
    assert summary["spec"]["num_classes"] == 10
    new = [k for row in summary["transplant"]["layers"] for k in row["new"]]
    assert all(k.startswith("classifier.") or k.endswith("num_batches_tracked") for k in new), new


def test_a_ulsam_loaded_in_part_is_refused(tmp_path):
    spec = ModelSpec.parse("mv2", "13", groups=4, width=0.35, num_classes=10)
    state = build_model(spec).state_dict()
    del state["features.layer13.pw_bn.running_var"]
    torch.save(state, tmp_path / "ours.pth")
    code, _, err = _invoke("build", "--from", tmp_path / "ours.pth", "--out", tmp_path / "o.safetensors")
    _one_line(code, err)
    assert "features.layer13 only in part" in err


# --- 4. file names that are not UTF-8 ----------------------------------------------------------------
def test_export_records_a_non_utf8_calibration_folder_readably(world):
    text = (world["export"] / MANIFEST).read_bytes().decode("utf-8")
    calibration = _strict(text)["calibration"]
    assert calibration["source"].endswith("calib-caf\\xe9") and calibration["skipped"] == 1
    assert "\\udce9" not in text      # no lone surrogate escapes, which strict readers refuse


@pytest.mark.parametrize("command", ["parity", "check"])
def test_parity_and_check_on_non_utf8_file_names(world, command):
    code, out, err = _invoke(command, "--export", world["export"], "--data", world["calib"], "--json")
    assert code in (0, 1), err
    rows = _strict(out)
    assert rows[0]["data"].endswith("calib-caf\\xe9") and "caf\\xe9-broken.png" in rows[0]["skipped_reasons"][0]
    code, out, err = _invoke(command, "--export", world["export"], "--data", world["calib"])   # the table
    assert code in (0, 1) and "caf\\xe9" in out, err


def test_evaluate_on_an_image_folder_with_non_utf8_names(world, tmp_path):
    root = tmp_path / f"labelled-{LATIN1}"
    for label in range(10):
        (root / f"{label}-{LATIN1}").mkdir(parents=True)
        _png(root / f"{label}-{LATIN1}" / f"{LATIN1}.png", label)
    (root / f"0-{LATIN1}" / f"{LATIN1}-bad.png").write_bytes(b"x")
    code, out, err = _invoke("evaluate", "--model", world["model"], "--data", root, "--json")
    assert code == 0, err
    result = _strict(out)
    assert result["count"] == 10 and result["skipped"] == 1 and "\\xe9" in result["skipped_reasons"][0]


# --- 5. a checkpoint does not choose which folder is read --------------------------------------------
class _Opens:
    """Files opened while active (an audit hook: installed once, recording only while a list is set)."""

    seen = None

    @classmethod
    def watch(cls):
        if not getattr(sys, "_ulsam_hostile_hook", False):
            sys._ulsam_hostile_hook = True
            sys.addaudithook(lambda event, args: cls.seen.append(str(args[0]))
                             if event in ("open", "os.listdir", "os.scandir") and cls.seen is not None
                             and isinstance(args[0], (str, Path)) else None)
        cls.seen = []
        return cls


@pytest.fixture
def bait(tmp_path):
    folder = tmp_path / "bait"
    for label in range(10):
        (folder / str(label)).mkdir(parents=True)
        _png(folder / str(label) / "a.png", label)
    return folder


@pytest.mark.parametrize("dataset", ["bait", "/etc", "../bait", "photos"])
def test_evaluate_never_reads_a_folder_a_checkpoint_names(tmp_path, bait, dataset):
    named = str(bait) if dataset == "bait" else dataset
    model = save_checkpoint(build_model(SPEC), tmp_path / "m.safetensors", extra={"dataset": named})
    watch = _Opens.watch()
    try:
        code, _, err = _invoke("evaluate", "--model", model)
    finally:
        opened, watch.seen = watch.seen, None
    _one_line(code, err)
    assert "records no reference data set" in err and "--data" in err
    assert not [p for p in opened if p.startswith(("/etc", str(bait)))], opened


def test_export_never_calibrates_from_a_folder_a_checkpoint_names(tmp_path, bait, monkeypatch):
    from ulsam_deploy.export.options import ExportOptions
    from ulsam_deploy.model.options import ModelOptions
    from ulsam_deploy.workflow import export_for

    model = save_checkpoint(build_model(SPEC), tmp_path / "m.safetensors", extra={"dataset": str(bait)})
    requests = []

    def capture(request, out, on_step=None):
        requests.append(request)
        raise KeyboardInterrupt

    import importlib

    monkeypatch.setattr(importlib.import_module("ulsam_deploy.export.pipeline"), "run_export", capture)
    with pytest.raises(KeyboardInterrupt):
        export_for(model, ModelOptions(), ExportOptions(("onnx", "onnx-int8"), tmp_path / "exp"))
    assert requests[0].calib_source == "photos" and requests[0].dataset is None
    digits = save_checkpoint(build_model(SPEC), tmp_path / "d.safetensors", extra={"dataset": "digits"})
    with pytest.raises(KeyboardInterrupt):
        export_for(digits, ModelOptions(), ExportOptions(("onnx", "onnx-int8"), tmp_path / "exp"))
    assert requests[1].calib_source == "digits" and requests[1].dataset == "digits"   # our own sets still serve


def test_parity_never_reads_a_folder_a_manifest_names(world, tmp_path, bait):
    from ulsam_deploy.verify.run import data_source

    copy = _copy_export(world, tmp_path)
    manifest = Manifest.load(copy)
    manifest.data["dataset"] = str(bait)
    manifest.save()
    assert data_source(Manifest.load(copy), None).name == "photos"


# --- 6. signals in every command ----------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["check", "--export", "{export}", "--formats", "onnx"],
    ["parity", "--export", "{export}"],
    ["inspect", "--export", "{export}", "--formats", "onnx-int8", "--images", "8"],
    ["bench", "--export", "{export}", "--backend", "onnxruntime", "--runs", "1", "--warmup", "0"],
    ["evaluate", "--model", "{model}"],
])
def test_sigterm_while_streaming_is_one_line_and_exit_130(world, monkeypatch, command):
    from ulsam_deploy.data import stream

    load, sent = stream._load_batch, []

    def load_then_terminate(source, indices):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)   # the CLI's handler unwinds the main thread like Ctrl-C
            time.sleep(0.5)
        return load(source, indices)

    monkeypatch.setattr(stream, "_load_batch", load_then_terminate)
    args = [a.format(export=world["export"], model=world["model"]) for a in command]
    code, out, err = _invoke(*args)
    assert sent and code == 130, (code, err)
    assert err.startswith("error: interrupted") and err.count("\n") == 1, err


def test_ctrl_c_in_a_real_process_is_one_line_and_exit_130(world, tmp_path):
    started = tmp_path / "started"
    code = ("import sys, time\n"
            "import ulsam_deploy.data.stream as stream\n"
            "load, marker = stream._load_batch, sys.argv[1]\n"
            "def slow(*args):\n"
            "    open(marker, 'w').close()\n"
            "    time.sleep(1.0)\n"
            "    return load(*args)\n"
            "stream._load_batch = slow\n"
            "from ulsam_deploy.cli import main\n"
            "sys.argv = ['ulsam-deploy'] + sys.argv[2:]\n"
            "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(started), "evaluate", "--model", str(world["model"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err


# --- 7. counting never allocates; building refuses beyond the limit ---------------------------------
HUGE = ["--arch", "mv2", "--width", "4", "--num-classes", "100000", "--input-size", "2048"]


def _never_build(*args, **kwargs):
    raise AssertionError("a network was built")


def test_profile_counts_a_huge_network_without_building_it(monkeypatch):
    import resource

    monkeypatch.setattr("ulsam_deploy.nets.build.build_model", _never_build)
    monkeypatch.setattr("ulsam_deploy.nets.build_model", _never_build)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, err = _invoke("profile", *HUGE, "--json")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert code == 0, err
    assert json.loads(out)["params"] > 500_000_000 and grown_kib < 1 << 20   # < 1 GiB more (it took 6.2 GB)


@pytest.mark.parametrize("command", [["build", "--out", "{tmp}/big.safetensors"],
                                     ["export", "--formats", "onnx", "--out", "{tmp}/exp"],
                                     ["bench", "--runs", "1"]])
def test_building_a_huge_network_is_refused_unless_asked(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ULSAM_ALLOW_LARGE", raising=False)
    monkeypatch.setattr("ulsam_deploy.nets.build.build_model", _never_build)
    monkeypatch.setattr("ulsam_deploy.workflow.build_model", _never_build)
    args = [a.format(tmp=tmp_path) for a in command] + HUGE
    code, _, err = _invoke(*args)
    _one_line(code, err)
    assert "GiB" in err and "--allow-large" in err and "ULSAM_ALLOW_LARGE=1" in err
    assert list(tmp_path.iterdir()) == []


def test_the_size_limit_is_lifted_when_asked(monkeypatch):
    from ulsam_deploy.errors import SpecError
    from ulsam_deploy.nets.build import MAX_BUILD_BYTES, check_model_size, estimate_size

    huge = ModelSpec.parse("mv2", "", width=4, num_classes=100_000, input_size=2048)
    monkeypatch.delenv("ULSAM_ALLOW_LARGE", raising=False)
    with pytest.raises(SpecError):
        check_model_size(huge)
    assert check_model_size(huge, allow_large=True).total_bytes > MAX_BUILD_BYTES
    monkeypatch.setenv("ULSAM_ALLOW_LARGE", "1")
    check_model_size(huge)
    assert check_model_size(SPEC, batch=64).params == sum(t.numel() for t in build_model(SPEC).state_dict().values())
    assert estimate_size(SPEC, batch=2).activation_bytes == 2 * estimate_size(SPEC).activation_bytes


def test_allow_large_reaches_the_builder(tmp_path, monkeypatch):
    from ulsam_deploy.errors import UlsamError

    def reached(*args, **kwargs):
        raise UlsamError("reached the builder")

    monkeypatch.setattr("ulsam_deploy.nets.build.build_model", reached)
    code, _, err = _invoke("build", "--out", tmp_path / "big.safetensors", "--allow-large", *HUGE)
    assert code == 2 and "reached the builder" in err


# --- 10. options that would change nothing are refused -------------------------------------------------
@pytest.mark.parametrize("args,flag", [
    (["parity", "--export", "{export}", "--calib-samples", "16"], "--calib-samples"),
    (["check", "--export", "{export}", "--calib", "photos"], "--calib"),
    (["inspect", "--export", "{export}", "--calib-method", "entropy"], "--calib-method"),
    (["check", "--export", "{export}", "--arch", "mv1"], "--arch"),
    (["parity", "--export", "{export}", "--preprocess", "timm"], "--preprocess"),
    (["export", "--model", "{model}", "--float-budget", "10", "--out", "{tmp}/x"], "--float-budget"),
    (["export", "--model", "{model}", "--keep-float", "1", "--formats", "onnx", "--out", "{tmp}/x"], "--keep-float"),
    (["export", "--model", "{model}", "--keep-float", "auto", "--formats", "onnx,tflite-int8-plain",
      "--out", "{tmp}/x"], "--keep-float"),
    (["export", "--model", "{model}", "--formats", "onnx", "--calib", "digits", "--out", "{tmp}/x"], "--calib"),
    (["check", "--model", "{model}", "--formats", "onnx", "--calib-samples", "8"], "--calib-samples"),
])
def test_options_that_change_nothing_are_refused(world, tmp_path, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(world["export"])
    code, out, err = _invoke(*[a.format(export=world["export"], model=world["model"], tmp=tmp_path) for a in args])
    _one_line(code, err)
    assert f"{flag} has no effect" in err and out == ""
    assert list(tmp_path.iterdir()) == [] and _snapshot(world["export"]) == before
