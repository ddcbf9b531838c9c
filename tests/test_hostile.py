"""Hostile checkpoints, file names and signals (issue 19).

A downloaded checkpoint is untrusted input: its metadata is validated by one schema before any work, its
tensors by rank, its layout by completeness; what it says it was trained on never chooses a folder to read.
A gate never passes a NaN. Non-UTF-8 file names work and read back readably. Ctrl-C and SIGTERM are one
line and exit 130 in every command. Counting never allocates; building refuses a network over the limit
unless asked. Options that would change nothing are refused. Folder-level cases: tests/data/test_hostile_folders.py.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ulsam_deploy.cli import app
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets import build_model, save_checkpoint
from ulsam_deploy.nets.build import sha256_file
from ulsam_deploy.store.manifest import MANIFEST, REFERENCE, Manifest

SPEC = ModelSpec.parse("mv2", "13", width=0.35, num_classes=10, input_size=32)
PREP = {"size": 32, "crop_fraction": 1.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "channel_order": "RGB", "layout": "NCHW", "interpolation": "bilinear"}
META = {"dataset": "digits", "preprocessing": json.dumps(PREP), "test_top1": "91.25", "test_top5": "99.00",
        "test_count": "360", "train_config": json.dumps({"epochs": 1, "lr": 0.05, "schedule": "cosine"}),
        "train_recipe": json.dumps({"kind": "shift-flip", "max_shift": 2, "hflip": False}),
        "origin": "random (seed 0)", "teacher": "none"}
LATIN1 = os.fsdecode(b"caf\xe9")
TV = Path(__file__).resolve().parent / "fixtures" / "torchvision_mv2_050_c10.pth"


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert "Traceback" not in result.stderr, result.stderr
    return result.exit_code, result.stdout, result.stderr


@functools.lru_cache(maxsize=1)
def _model():
    from small_models import realistic_model   # O(1) logits: a random init sinks into slow denormals

    return realistic_model(SPEC)


def _one_line(code, err, expected=2):
    assert code == expected, err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def _strict(text: str):
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in JSON"))


def _png(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path, "PNG")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model with every metadata key, exported to onnx,onnx-int8 calibrated on a Latin-1 folder."""
    root = tmp_path_factory.mktemp("hostile")
    model = save_checkpoint(_model(), root / "model" / "m.safetensors", extra=META)
    calib = root / f"calib-{LATIN1}"
    calib.mkdir()
    for i in range(3):
        _png(calib / f"{LATIN1}-{i}.png", i)
    (calib / f"{LATIN1}-broken.png").write_bytes(b"not a png")
    export = root / "exp"
    code, _, err = _invoke("export", "--model", model, "--formats", "onnx,onnx-int8", "--calib", calib,
                           "--calib-samples", "16", "--out", export)
    assert code == 0, err
    return {"root": root, "model": model, "calib": calib, "export": export}


def _copy_export(world, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(world["export"], target, ignore=shutil.ignore_patterns("reference-logits", ".manifest.lock"))
    return target


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# --- 1. the gate and non-finite logits --------------------------------------------------------------
@pytest.mark.parametrize("where,value", [("artifact", np.nan), ("artifact", np.inf), ("reference", np.nan),
                                         ("both", np.nan), ("artifact", -np.inf)])
def test_no_statistic_hides_a_non_finite_logit(where, value):
    from ulsam_deploy.verify.parity import ParityResult, Thresholds, compare, judge

    reference = np.random.default_rng(0).normal(0, 3, (8, 10))
    logits = reference.copy()
    if where in ("artifact", "both"):
        logits[3, 2] = value
    if where in ("reference", "both"):
        reference[5] = value
    stats = compare(logits, reference, np.zeros(8, np.int64))
    assert stats["nonfinite"] == (0 if where == "reference" else 1)
    assert stats["reference_nonfinite"] == (1 if where in ("reference", "both") else 0)
    assert not np.isfinite(stats["max_abs"]) and not np.isfinite(stats["mean_abs"])
    assert np.isnan(stats["cosine_min"]) and np.isnan(stats["cosine_mean"])        # never a perfect 1.0
    assert stats["top1_agreement"] < 100 and stats["top5_agreement"] < 100
    result = judge(ParityResult("onnx", "onnxruntime", "fp32", 8, "x", **stats), Thresholds())   # no limits at all
    assert not result.passed and "non-finite" in result.breaches[0]


def test_zero_logits_are_not_a_perfect_cosine():
    from ulsam_deploy.verify.parity import row_cosine

    a = np.array([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [1.0, np.nan]])
    b = np.array([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0], [1.0, 2.0]])
    cosine = row_cosine(a, b)
    assert cosine[0] == 0.0 and cosine[1] == pytest.approx(1.0) and cosine[2] == 1.0 and np.isnan(cosine[3])


def test_inspect_names_the_first_layer_that_is_not_finite():
    from ulsam_deploy.export.layermap import Tap
    from ulsam_deploy.verify.inspect import _TapAccumulator, mark_jump

    rows = []
    for layer, value in ((1, 1.0), (2, np.nan), (3, np.nan)):
        acc = _TapAccumulator(Tap(f"layer{layer}", str(layer), layer, "output", False))
        eager = np.ones((2, 4, 3, 3))
        acc.update(eager * value + 1e-3 * (layer == 1), eager)
        rows.append(acc.result("output"))
    assert rows[0].sqnr_db > 50 and np.isnan(rows[1].sqnr_db) and np.isnan(rows[1].cosine_min)
    assert mark_jump(rows) == (2, "2")


def test_json_output_is_strict():
    from ulsam_deploy.render.report import to_jsonable

    text = json.dumps(to_jsonable({"a": float("nan"), "b": [np.float32("inf"), -np.inf], "c": LATIN1}),
                      allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    assert _strict(text) == {"a": "NaN", "b": ["Infinity", "-Infinity"], "c": "caf\\xe9"}


def _plant_nan_artifact(directory: Path) -> None:
    import onnx
    from onnx import numpy_helper

    manifest = Manifest.load(directory)
    path = directory / manifest.artifacts["onnx"]["file"]
    model = onnx.load(str(path))
    head = next(n for n in model.graph.node if n.op_type == "Gemm")
    producers = {o: n for n in model.graph.node for o in n.output}
    name = head.input[1] if head.input[1] not in producers else producers[head.input[1]].input[0]
    init = next(i for i in model.graph.initializer if i.name == name)             # the classifier's weight
    init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))
    onnx.save(model, str(path))
    manifest.artifacts["onnx"]["sha256"] = sha256_file(path)
    manifest.artifacts["onnx"]["size_bytes"] = path.stat().st_size
    manifest.save()


def test_check_fails_a_nan_artifact_with_its_own_reason_and_strict_json(world, tmp_path):
    planted = _copy_export(world, tmp_path)
    _plant_nan_artifact(planted)
    code, out, err = _invoke("check", "--export", planted, "--formats", "onnx")
    assert code == 1 and "FAIL onnx: non-finite logits" in err, err
    code, out, _ = _invoke("check", "--export", planted, "--formats", "onnx", "--json")
    row = _strict(out)[0]
    assert code == 1 and row["passed"] is False and row["nonfinite"] == row["count"]
    assert row["max_abs"] == "NaN" and row["cosine_min"] == "NaN"


def test_check_fails_when_the_eager_reference_is_not_finite(world, tmp_path):
    from ulsam_deploy.nets import load_model
    from ulsam_deploy.store.manifest import weights_sha256

    planted = _copy_export(world, tmp_path)
    reference = load_model(planted / REFERENCE)
    with torch.no_grad():
        reference.classifier.bias.fill_(float("inf"))
    save_checkpoint(reference, planted / REFERENCE)
    manifest = Manifest.load(planted)
    manifest.data["weights_sha256"] = weights_sha256(reference)
    manifest.data["reference_sha256"] = sha256_file(planted / REFERENCE)
    manifest.save()
    code, _, err = _invoke("check", "--export", planted, "--formats", "onnx")
    assert code == 1 and "the eager reference gives non-finite logits" in err, err


@pytest.mark.slow
def test_an_all_nan_model_exported_fails_check(tmp_path):
    model = build_model(SPEC)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    path = save_checkpoint(model, tmp_path / "nan.safetensors", extra={"dataset": "digits"})
    assert _invoke("export", "--model", path, "--formats", "onnx", "--out", tmp_path / "exp")[0] == 0
    code, out, err = _invoke("check", "--export", tmp_path / "exp", "--formats", "onnx", "--json")
    assert code == 1 and _strict(out)[0]["breaches"][0].startswith("non-finite logits"), err


# --- 2. checkpoint metadata ---------------------------------------------------------------------------
def _write(path: Path, metadata: dict) -> Path:
    """The pristine model's tensors under ``metadata`` as given (bypassing save_checkpoint's own check)."""
    state = {k: v.contiguous() for k, v in _model().state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def _spec_with(**changes) -> str:
    return json.dumps(SPEC.to_dict() | changes)


HOSTILE_METADATA = {
    "spec width NaN": {"spec": _spec_with(width=float("nan"))},
    "spec groups Infinity": {"spec": _spec_with().replace('"groups": 4', '"groups": Infinity')},
    "spec classes 1e999": {"spec": _spec_with().replace('"num_classes": 10', '"num_classes": 1e999')},
    "spec classes huge": {"spec": _spec_with(num_classes=10 ** 40)},
    "spec groups negative": {"spec": _spec_with(groups=-4)},
    "spec width a string": {"spec": _spec_with(width="0.35")},
    "spec nested": {"spec": "[" * 100_000 + "]" * 100_000},
    "spec a list": {"spec": "[1, 2]"},
    "spec unknown field": {"spec": _spec_with(depth=3)},
    "preprocessing not JSON": {"preprocessing": "{size: 32"},
    "preprocessing nested": {"preprocessing": '{"a":' * 5000 + "1" + "}" * 5000},
    "preprocessing NaN mean": {"preprocessing": json.dumps(PREP | {"mean": [float("nan"), 0.5, 0.5]})},
    "preprocessing zero std": {"preprocessing": json.dumps(PREP | {"std": [0.0, 0.5, 0.5]})},
    "preprocessing other size": {"preprocessing": json.dumps(PREP | {"size": 224})},
    "accuracy not a number": {"test_top1": "ninety"},
    "accuracy NaN": {"test_top1": "nan"},
    "accuracy negative": {"test_top5": "-3"},
    "count huge": {"test_count": "1" + "0" * 40},
    "config with Infinity": {"train_config": '{"lr": Infinity}'},
    "config nested": {"train_config": '{"a":' * 3000 + "1" + "}" * 3000},
    "unknown key": {"payload": "x"},
    "value over 64 KiB": {"origin": "x" * 70_000},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_METADATA))
@pytest.mark.parametrize("command", ["evaluate", "build", "export", "profile"])
def test_hostile_metadata_is_refused_in_one_line_before_any_work(world, tmp_path, monkeypatch, case, command):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "bad.safetensors", META | {"format": "ulsam-deploy/1", "spec": SPEC.to_json()}
                  | HOSTILE_METADATA[case])
    args = {"evaluate": ["evaluate", "--model", path], "build": ["build", "--from", path, "--out", tmp_path / "o.safetensors"],
            "export": ["export", "--model", path, "--formats", "onnx", "--out", tmp_path / "exp"],
            "profile": ["profile", "--model", path]}[command]
    monkeypatch.setattr("ulsam_deploy.data.stream.batches", _no_work)   # refused before a batch is decoded
    code, out, err = _invoke(*args)
    _one_line(code, err)
    assert "metadata" in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


@pytest.mark.parametrize("fields", [{"groups": float("inf")}, {"num_classes": float("-inf")}, {"positions": []},
                                    {"positions": None}, {"width": float("nan")}, {"input_size": 10 ** 40}])
def test_a_stored_spec_of_hostile_values_is_a_spec_error(fields):
    """The manifest's spec is read by ModelSpec.from_dict too: int(inf) and [].strip() were tracebacks."""
    from ulsam_deploy.errors import SpecError

    with pytest.raises(SpecError):
        ModelSpec.from_dict(SPEC.to_dict() | fields)


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the metadata was validated")


def test_other_libraries_metadata_is_not_read(tmp_path):
    """timm's hub files carry {"format": "pt"}: nothing of theirs is parsed, the tensors say what they are."""
    path = _write(tmp_path / "hub.safetensors", {"format": "pt", "spec": "[[[[", "dataset": "/etc"})
    code, out, err = _invoke("build", "--from", path, "--out", tmp_path / "o.safetensors", "--json")
    assert code == 0, err
    spec = json.loads(out)["spec"]
    assert (spec["arch"], spec["width"], spec["positions"], spec["num_classes"]) == ("mv2", 0.35, "13", 10)


def _json_variant(text: str, draw) -> str:
    data = json.loads(text)
    key = draw(st.sampled_from(sorted(data) + ["__new__"]))
    op = draw(st.sampled_from(["replace", "drop"]))
    if op == "drop" and key in data:
        del data[key]
        return json.dumps(data)
    token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1", "0", "1e30", str(10 ** 40),
                                  "3.5", "true", "null", '"x"', "[]", "{}", '"mv1"', '"relu"', "[1e999, 0, 0]"]))
    data[key] = "@@"
    return json.dumps(data).replace('"@@"', token)


NASTY_TEXT = st.one_of(
    st.sampled_from(["", "{", "not json", "{'arch': 'mv2'}", "[1,2", "NaN", "1e999", "-1", "0", "nan", "inf",
                     "digits", "fashion-x", "/etc", "..", "photos", "ulsam-deploy/1", "pt", "true", "null"]),
    st.integers(1, 4000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 2000).map(lambda n: '{"a":' * n + "0" + "}" * n),
    st.text(max_size=40), st.just("x" * 70_000))
FIELDS = ["format", "spec", "preprocessing", "dataset", "test_top1", "test_top5", "test_count", "train_config",
          "train_recipe", "origin", "teacher"]


METADATA_RUN = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=30, **METADATA_RUN)
@given(data=st.data(), command=st.sampled_from(["evaluate", "build", "export"]))
def test_mutated_metadata_never_crashes_and_refusals_write_nothing(world, tmp_path_factory, data, command):
    _mutated_metadata_run(world, tmp_path_factory, data, command)


@pytest.mark.slow
@settings(max_examples=200, **METADATA_RUN)
@given(data=st.data(), command=st.sampled_from(["evaluate", "build", "export"]))
def test_many_mutated_metadata_never_crash(world, tmp_path_factory, data, command):
    _mutated_metadata_run(world, tmp_path_factory, data, command)


def _mutated_metadata_run(world, tmp_path_factory, data, command):
    """Every key: non-finite numbers, huge or negative values, wrong types, nesting, invalid JSON, unknown
    keys, dropped keys; exit 0, 1 or 2, never a traceback, and a refusal writes nothing."""
    meta = META | {"format": "ulsam-deploy/1", "spec": SPEC.to_json()}
    key = data.draw(st.sampled_from(FIELDS + ["unknown"]))
    op = data.draw(st.sampled_from(["replace", "drop", "inside"] if key in ("spec", "preprocessing", "train_config")
                                   else ["replace", "drop"]))
    if op == "drop":
        meta.pop(key, None)
    elif op == "inside":
        meta[key] = _json_variant(meta[key], data.draw)
    else:
        meta[key] = data.draw(NASTY_TEXT.filter(lambda v: v != "fashion"))   # fashion: a 10,000-image evaluation
    work = tmp_path_factory.mktemp("meta")
    path = _write(work / "m.safetensors", meta)
    export = world["root"] / "hypothesis-export"
    if not export.exists():
        shutil.copytree(world["export"], export)
    before = _snapshot(export)
    args = {"evaluate": ["evaluate", "--model", path], "build": ["build", "--from", path, "--out", work / "o.safetensors"],
            # --input-size: a file whose metadata is ignored (another format) is still the exported network
            "export": ["export", "--model", path, "--formats", "onnx", "--input-size", "32", "--out", export]}[command]
    old = os.getcwd()
    os.chdir(work)
    try:
        code, out, err = _invoke(*args)
    finally:
        os.chdir(old)
    assert code in (0, 1, 2), (key, op, meta.get(key, "")[:80], err)
    if code == 2:
        _one_line(code, err)
        assert sorted(p.name for p in work.iterdir()) == ["m.safetensors"], (key, op, err)
        assert _snapshot(export) == before, (key, op, err)


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

    monkeypatch.setattr("ulsam_deploy.export.pipeline.run_export", capture)
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
