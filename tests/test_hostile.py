"""Hostile checkpoints, file names and signals.

A downloaded checkpoint is untrusted input: its metadata is validated by one schema before any work, its
tensors by rank, its layout by completeness; what it says it was trained on never chooses a folder to read.
A gate never passes a NaN. Non-UTF-8 file names work and read back readably. Ctrl-C and SIGTERM are one
line and exit 130 in every command. Counting never allocates; building refuses a network over the limit
unless asked. Options that would change nothing are refused. Folder-level cases: tests/data/test_hostile_folders.py;
.pth files, partial loads, file names, signals, size limits and options: tests/test_hostile_files.py.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets import build_model, save_checkpoint
from ulsam_deploy.nets.build import sha256_file
from ulsam_deploy.store.manifest import REFERENCE, Manifest
from tests.hostile_helpers import (  # noqa: F401  (world is a fixture)
    SPEC, PREP, META, LATIN1, _invoke, _model, _one_line, _strict, world, _copy_export, _snapshot)


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


@settings(max_examples=12, **METADATA_RUN)
@given(data=st.data(), command=st.sampled_from(["evaluate", "build", "export"]))
def test_mutated_metadata_never_crashes_and_refusals_write_nothing(world, tmp_path_factory, data, command):
    _mutated_metadata_run(world, tmp_path_factory, data, command)


@pytest.mark.slow
@settings(max_examples=100, **METADATA_RUN)
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
