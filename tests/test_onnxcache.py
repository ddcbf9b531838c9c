"""The ONNX export cache: the same network is exported once, anything that changes the graph is a new entry,
a damaged entry is exported again, and the cache never decides what the file holds."""

import json

import pytest

from ulsam_deploy.export import onnx as onnx_export
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets import ULSAM, build_model
from ulsam_deploy.nets.ulsam import export_form
from ulsam_deploy.store import onnxcache

SPEC = ModelSpec.parse("mv2", "13", groups=4, width=0.35, num_classes=10, input_size=32)


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A fresh cache folder, and the number of times torch's exporter really ran."""
    calls = []
    real = onnx_export._export

    def export(model, size, path):
        calls.append(size)
        return real(model, size, path)

    monkeypatch.setattr(onnx_export, "_export", export)
    monkeypatch.setenv(onnxcache.ENV, str(tmp_path / "cache"))
    return calls


def test_the_same_network_is_exported_once_and_copied_after(counted, tmp_path):
    first = onnx_export.export_onnx(build_model(SPEC, seed=0), 32, tmp_path / "a.onnx")
    again = onnx_export.export_onnx(build_model(SPEC, seed=0), 32, tmp_path / "b.onnx")   # another instance
    assert counted == [32]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() and first == again
    other = build_model(SPEC, seed=1)                                                      # other weights
    onnx_export.export_onnx(other, 32, tmp_path / "c.onnx")
    assert counted == [32, 32] and (tmp_path / "c.onnx").read_bytes() != (tmp_path / "a.onnx").read_bytes()

    entry = next((tmp_path / "cache").glob("*.onnx"))                 # damaged: exported again, then replaced
    entry.write_bytes(entry.read_bytes()[:-10])
    for seed in (0, 1):
        onnx_export.export_onnx(build_model(SPEC, seed=seed), 32, tmp_path / f"d{seed}.onnx")
    assert counted == [32, 32, 32]
    assert {(tmp_path / "d0.onnx").read_bytes(), (tmp_path / "d1.onnx").read_bytes()} == \
        {(tmp_path / "a.onnx").read_bytes(), (tmp_path / "c.onnx").read_bytes()}
    meta = json.loads(entry.with_suffix(".json").read_text())
    assert meta["details"] == first


def test_what_changes_the_graph_changes_the_key(monkeypatch):
    model = build_model(SPEC, seed=0).eval()
    key = onnxcache.network_key(model, 32, 18)
    assert key == onnxcache.network_key(build_model(SPEC, seed=0).eval(), 32, 18)
    assert onnxcache.network_key(model, 48, 18) != key                      # input size
    assert onnxcache.network_key(model, 32, 17) != key                      # opset
    with export_form(model, "npu"):                                         # ULSAM's export form
        assert onnxcache.network_key(model, 32, 18) != key
    bn = next(m for m in model.modules() if hasattr(m, "running_var"))
    bn.running_var[0] += 1e-6                                               # a buffer
    assert onnxcache.network_key(model, 32, 18) != key
    ulsam = next(m for m in build_model(SPEC, seed=0).eval().modules() if isinstance(m, ULSAM))
    ulsam.forward = lambda x: x                                             # a forward it cannot see
    assert onnxcache.network_key(ulsam, 32, 18) is None
    monkeypatch.setattr(ULSAM, "forward", lambda self, x: x)               # or on its class (a floor model)
    assert onnxcache.network_key(model, 32, 18) is None


def test_off_or_unwritable_exports_without_it(counted, tmp_path, monkeypatch):
    monkeypatch.setenv(onnxcache.ENV, "off")
    assert onnxcache.folder() is None
    model = build_model(SPEC, seed=0)
    onnx_export.export_onnx(model, 32, tmp_path / "a.onnx")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(onnxcache.ENV, str(blocked / "cache"))
    onnx_export.export_onnx(model, 32, tmp_path / "b.onnx")
    assert counted == [32, 32] and not (tmp_path / "cache").exists()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
