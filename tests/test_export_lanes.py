"""Formats that share no work are exported side by side, one process per lane; the manifest is the same."""

import json

import pytest

from ulsam_deploy.export.pipeline import lane_workers, lanes
from ulsam_deploy.formats import parse_formats
from ulsam_deploy.store.manifest import Manifest

from small_models import model_file


def test_lanes_keep_each_format_after_what_it_is_built_from():
    groups = lanes(list(parse_formats("onnx-int8,tflite-int8,executorch-int8,executorch-fp32,trt-int8")))
    assert groups == [["tflite-int8"], ["executorch-int8"], ["executorch-fp32"], ["onnx", "onnx-int8", "onnx-int8-trt", "trt-int8"]]
    assert lanes(["onnx", "onnx-int8"]) == [["onnx", "onnx-int8"]]


def test_workers_are_bounded_by_lanes_cores_and_the_override(monkeypatch):
    monkeypatch.delenv("ULSAM_EXPORT_WORKERS", raising=False)
    assert lane_workers([["onnx"]]) == 1
    monkeypatch.setenv("ULSAM_EXPORT_WORKERS", "1")
    assert lane_workers([["a"], ["b"], ["c"]]) == 1
    monkeypatch.setenv("ULSAM_EXPORT_WORKERS", "3")
    assert lane_workers([["a"], ["b"]]) == 2


@pytest.mark.slow
def test_lanes_in_processes_give_the_serial_export(tmp_path, cli, monkeypatch):
    pytest.importorskip("executorch", reason="ExecuTorch extra not installed: pip install 'ulsam-deploy[executorch]'")
    ckpt = model_file(tmp_path)
    formats = "onnx,onnx-int8,executorch-fp32"
    entries = {}
    for workers in ("2", "1"):
        monkeypatch.setenv("ULSAM_EXPORT_WORKERS", workers)
        out = tmp_path / f"w{workers}"
        code, stdout, err = cli("export", "--model", ckpt, "--formats", formats, "--calib", "digits",
                                "--calib-samples", "32", "--out", out, "--json")
        assert code == 0, err
        assert [a["format"] for a in json.loads(stdout)["artifacts"]] == formats.split(",")
        entries[workers] = Manifest.load(out).artifacts
        code, _, err = cli("check", "--export", out, "--data", "digits", "--images", "64")
        assert code == 0, err
    for name in formats.split(","):
        parallel, serial = entries["2"][name], entries["1"][name]
        assert {k for k in parallel if k not in ("seconds",)} == {k for k in serial if k not in ("seconds",)}
        assert parallel["io"] == serial["io"] and parallel["recipe"] == serial["recipe"]
    assert entries["2"]["onnx"]["sha256"] == entries["1"]["onnx"]["sha256"]   # the same bytes


@pytest.mark.slow
def test_a_failing_lane_stops_the_others_and_says_which(tmp_path):
    """A lane that fails (here: an INT8 format handed no calibration set) ends the export with its traceback,
    and the other lane's process is stopped, not left running."""
    import multiprocessing

    from ulsam_deploy.data.preprocess import Preprocessing
    from ulsam_deploy.export.parallel import run_lanes
    from ulsam_deploy.export.pipeline import ExportRequest, _start_manifest
    from ulsam_deploy.store.manifest import weights_sha256

    from small_models import realistic_model

    model = realistic_model()
    request = ExportRequest(model, "m", {"random_init_seed": 0}, None, Preprocessing(size=64).to_dict(),
                            ("onnx-int8", "onnx"))
    _start_manifest(tmp_path, request, weights_sha256(model))
    recorded = []
    with pytest.raises(RuntimeError, match="exporting onnx-int8 failed in its process"):
        run_lanes([["onnx-int8"], ["onnx"]], 2, (request, str(tmp_path), None),
                  lambda name, details, seconds: recorded.append(name), lambda what: None)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("export-")]
    assert not list(tmp_path.glob("*.tmp*"))
