"""The ONNX export cache: the same network is exported once, anything that changes the graph is a new entry,
a damaged entry is exported again, and the cache never decides what the file holds."""

import json

from ulsam_deploy.export import onnx as onnx_export
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets import ULSAM, build_model
from ulsam_deploy.nets.ulsam import export_form
from ulsam_deploy.store import onnxcache

SPEC = ModelSpec.parse("mv2", "13", groups=4, width=0.35, num_classes=10, input_size=32)


def test_the_same_network_is_exported_once_and_copied_after(monkeypatch, tmp_path):
    calls = []
    real = onnx_export._export

    def export(model, size, path):          # torch's exporter, counted
        calls.append(size)
        return real(model, size, path)

    monkeypatch.setattr(onnx_export, "_export", export)
    monkeypatch.setenv(onnxcache.ENV, str(tmp_path / "cache"))
    first = onnx_export.export_onnx(build_model(SPEC, seed=0), 32, tmp_path / "a.onnx")
    again = onnx_export.export_onnx(build_model(SPEC, seed=0), 32, tmp_path / "b.onnx")   # another instance
    assert calls == [32]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() and first == again
    onnx_export.export_onnx(build_model(SPEC, seed=1), 32, tmp_path / "c.onnx")           # other weights
    assert calls == [32, 32] and (tmp_path / "c.onnx").read_bytes() != (tmp_path / "a.onnx").read_bytes()
    entries = sorted((tmp_path / "cache").glob("*.onnx"))
    assert len(entries) == 2 and {json.loads(e.with_suffix(".json").read_text())["details"]["opset"]
                                  for e in entries} == {onnx_export.OPSET}


def _writer(calls, payload=b"exported"):
    def export(target):
        calls.append(target)
        target.write_bytes(payload)
        return {"nodes": 1}
    return export


def test_a_damaged_entry_is_exported_again_and_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv(onnxcache.ENV, str(tmp_path / "cache"))
    calls = []
    assert onnxcache.cached_export("k", tmp_path / "a.onnx", _writer(calls)) == {"nodes": 1}
    assert onnxcache.cached_export("k", tmp_path / "b.onnx", _writer(calls, b"other")) == {"nodes": 1}
    assert len(calls) == 1 and (tmp_path / "b.onnx").read_bytes() == b"exported"       # the entry, not a re-export
    (tmp_path / "cache" / "k.onnx").write_bytes(b"exporteX")                            # damaged: same size
    onnxcache.cached_export("k", tmp_path / "c.onnx", _writer(calls, b"fresh"))
    assert len(calls) == 2 and (tmp_path / "c.onnx").read_bytes() == b"fresh"
    onnxcache.cached_export("k", tmp_path / "d.onnx", _writer(calls))
    assert len(calls) == 2 and (tmp_path / "d.onnx").read_bytes() == b"fresh"          # replaced by the new one


def test_off_unwritable_or_uncacheable_exports_without_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv(onnxcache.ENV, "off")
    assert onnxcache.folder() is None
    onnxcache.cached_export("k", tmp_path / "a.onnx", _writer(calls))
    onnxcache.cached_export("k", tmp_path / "a.onnx", _writer(calls))
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(onnxcache.ENV, str(blocked / "cache"))
    onnxcache.cached_export("k", tmp_path / "b.onnx", _writer(calls))
    monkeypatch.setenv(onnxcache.ENV, str(tmp_path / "cache"))
    onnxcache.cached_export(None, tmp_path / "c.onnx", _writer(calls))                 # a network it cannot key
    assert len(calls) == 4 and not (tmp_path / "cache").exists()


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
