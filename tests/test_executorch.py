"""ExecuTorch: both .pte formats of a small model export, load in plain ``executorch.runtime`` and pass ``check``;
the INT8 recipe keeps the attention path, the classifier and ``--keep-float`` layers float; a missing extra
is named."""

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from small_models import model_file, realistic_model
from ulsam_deploy.errors import BackendUnavailable
from ulsam_deploy.store.manifest import Manifest

FORMATS = "executorch-fp32,executorch-int8"


def _needs_executorch():
    pytest.importorskip("executorch", reason="ExecuTorch extra not installed: pip install 'ulsam-deploy[executorch]'")


@pytest.fixture(scope="module")
def et_export(tmp_path_factory):
    _needs_executorch()
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    root = tmp_path_factory.mktemp("et")
    ckpt, out = model_file(root), root / "exp"
    result = CliRunner().invoke(app, ["export", "--model", str(ckpt), "--formats", f"onnx,onnx-int8,{FORMATS}",
                                      "--calib", "digits", "--calib-samples", "64", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    return ckpt, out


@pytest.mark.slow
def test_manifest_entries(et_export):
    _, out = et_export
    artifacts = Manifest.load(out).artifacts
    for key in FORMATS.split(","):
        entry = artifacts[key]
        assert entry["backend"] == "executorch" and entry["recipe"] and entry["batch"] == 1
        assert set(entry["versions"]) == {"executorch", "torchao"}
        assert entry["io"]["inputs"][0] == {"name": "input_0", "shape": [1, 3, 64, 64], "dtype": "float32",
                                            "layout": "NCHW", "quantization": None}
        assert entry["io"]["outputs"][0]["shape"] == [1, 10] and entry["io"]["outputs"][0]["dtype"] == "float32"
        # ULSAM's 4-D export form: the whole network is one XNNPACK subgraph, nothing runs outside it
        assert entry["delegated_subgraphs"] == 1 and entry["outside_delegate"] == {}
    int8 = artifacts["executorch-int8"]
    assert int8["attention_path"] == "float" and int8["logits"] == "float" and int8["keep_float"] == []
    assert int8["calibration_method"] == "minmax" and int8["activation_observer"] == "MinMaxObserver"
    # x * (1 + A) and the spread of 1 + A of every ULSAM, the classifier
    floats = set(int8["float_nodes"])
    assert {"mul", "linear"} <= floats and sum(n.startswith("conv2d") for n in floats) == 4   # SPEC: 13,14,16,17


@pytest.mark.slow
def test_check_passes(et_export, cli):
    _, out = et_export
    code, stdout, err = cli("check", "--export", out, "--formats", FORMATS, "--data", "digits", "--threads", "2",
                            "--json")
    assert code == 0, err
    rows = {r["artifact"]: r for r in json.loads(stdout)}
    assert rows["executorch-fp32"]["max_abs"] <= 1e-4 and rows["executorch-fp32"]["top1_agreement"] == 100.0
    assert rows["executorch-int8"]["top1_agreement"] >= 99.0


@pytest.mark.slow
def test_pte_agrees_with_eager_without_our_runners(et_export, tmp_path):
    """A process that imports nothing of ours loads each .pte with plain executorch.runtime."""
    from ulsam_deploy.nets import load_model
    from ulsam_deploy.runtime import open_artifact

    ckpt, out = et_export
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        from executorch.runtime import Runtime
        x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))
        for name in ("model_fp32.pte", "model_int8.pte"):
            method = Runtime.get().load_program({str(out)!r} + "/" + name).load_method("forward")
            logits = torch.cat([method.execute([x[i:i + 1]])[0] for i in range(len(x))])
            np.save({str(tmp_path)!r} + "/" + name + ".npy", logits.numpy())
        assert not [m for m in sys.modules if m.startswith("ulsam_deploy")]
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.inference_mode():
        eager = load_model(ckpt).eval()(torch.from_numpy(x)).numpy()
    fp32, int8 = (np.load(tmp_path / f"{n}.npy") for n in ("model_fp32.pte", "model_int8.pte"))
    assert np.abs(fp32 - eager).max() <= 1e-4
    assert (int8.argmax(1) == eager.argmax(1)).mean() >= 0.75 and np.abs(int8 - eager).max() < 0.5 * np.ptp(eager)
    runner = open_artifact(out / "model_int8.pte", "executorch", "int8", threads=2)   # our runner: the same numbers
    try:
        assert np.allclose(runner(x), int8, atol=1e-6)
    finally:
        runner.close()


@pytest.mark.slow
def test_thread_count_changes_never_strand_a_program(et_export, tmp_path):
    """ExecuTorch's thread pool is process-wide and replaced on resize: runners resize it before they load, and a
    resize under an open program is refused in one line - that program still runs. (Resizing after the load hung
    or aborted most runs once torch had worked in the process.)"""
    _, out = et_export
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from ulsam_deploy.errors import UlsamError
        from ulsam_deploy.runtime import open_artifact
        torch.nn.Conv2d(3, 64, 3)(torch.randn(8, 3, 64, 64))           # torch's own pools at work first
        x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
        for threads in (1, 2, 1, 2, 1, 2):
            for name in ("model_fp32.pte", "model_int8.pte"):
                runner = open_artifact({str(out)!r} + "/" + name, "executorch", "fp32", threads)
                assert np.isfinite(runner(x)).all()
                runner.close()
        held = open_artifact({str(out)!r} + "/model_fp32.pte", "executorch", "fp32", 1)
        try:
            open_artifact({str(out)!r} + "/model_int8.pte", "executorch", "int8", 2)
            raise SystemExit("a resize under an open program was not refused")
        except UlsamError as exc:
            assert "same --threads" in exc.one_line(), exc.one_line()
        assert np.isfinite(held(x)).all()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-2000:])
    assert "threadpool" not in proc.stderr and "cpuinfo" not in proc.stderr, proc.stderr[-2000:]   # runtime logs


@pytest.mark.slow
def test_inspect_skips_executorch_with_a_note(et_export, cli):
    _, out = et_export
    code, stdout, err = cli("inspect", "--export", out, "--data", "digits", "--images", "32", "--json")
    assert code == 0, err
    found = json.loads(stdout)
    assert [a["artifact"] for a in found["artifacts"]] == ["onnx", "onnx-int8"]
    assert len(found["notes"]) == 2 and all("no paper-layer outputs" in n for n in found["notes"])
    code, _, err = cli("inspect", "--export", out, "--formats", "executorch-int8", "--data", "digits")
    assert code == 2 and err.startswith("error: inspect has nothing to probe") and err.count("\n") == 1, err


def _dequantized_inputs(graph) -> dict[str, list[str]]:
    return {n.name: [a.name for a in n.all_input_nodes if "dequantize" in str(a.target)]
            for n in graph.graph.nodes if n.op == "call_function"}


def test_keep_float_and_attention_path_stay_float():
    """PT2E with the recipe's node filter: the kept layer's convolutions read float inputs and float weights,
    and the op writing its input computes in float; other layers stay INT8; x*A, x*A + x and the classifier
    are never quantised."""
    _needs_executorch()
    from ulsam_deploy.data import calibration_set
    from ulsam_deploy.export.executorch import quantize

    model = realistic_model()
    images = calibration_set("digits", 64, 16).images
    converted, recipe = quantize(model, images, "minmax", keep_float=(5,))
    inputs = _dequantized_inputs(converted)
    stack = {n.name: [p for p, _ in (n.meta.get("nn_module_stack") or {}).values()] for n in converted.graph.nodes}
    convs = [n for n in converted.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    in_layer = lambda n, k: f"features.layer{k}" in stack[n.name]  # noqa: E731
    assert [n for n in convs if in_layer(n, 5)] and not [n.name for n in convs if in_layer(n, 5) and inputs[n.name]]
    assert all(inputs[n.name] for n in convs if in_layer(n, 8))                        # the rest stays INT8
    writer = next(n for n in convs if in_layer(n, 5)).args[0]        # what layer 5 reads: computed in float
    assert writer.name in recipe["float_nodes"] and not [u for u in writer.users if "quantize" in str(u.target)]
    assert "adaptive_avg_pool2d" not in recipe["float_nodes"]                          # only what the recipe names
    node = {n.name: n for n in converted.graph.nodes}
    for name in ("mul", "add_6"):                 # x*A and x*A + x of the first ULSAM read and write float
        assert not inputs[name] and not [u for u in node[name].users if "quantize" in str(u.target)], name
    linear = node["linear"]                       # the classifier: float weights, float logits
    assert "dequantize" not in str(linear.args[1].target)
    assert not [u for u in linear.users if "quantize" in str(u.target)]
    assert recipe["keep_float"] == [5]


def test_missing_extra_names_it(cli, tmp_path, monkeypatch):
    from ulsam_deploy.formats import parse_formats
    from ulsam_deploy.runtime import runner_class

    real = importlib.util.find_spec
    hidden = ("executorch", "torchao")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] in hidden else real(name, *a, **k))
    assert not [f for f in parse_formats("cpu") if f.startswith("executorch")]
    code, _, err = cli("export", "--arch", "mv2", "--width", "0.5", "--input-size", "64", "--num-classes", "10",
                       "--formats", "executorch-fp32", "--out", tmp_path / "exp")
    assert code == 2 and "pip install 'ulsam-deploy[executorch]'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "exp").exists()
    code, _, err = cli("bench", "--arch", "mv2", "--width", "0.5", "--input-size", "64", "--backend", "executorch",
                       "--export", tmp_path / "b")
    assert code == 2 and "pip install 'ulsam-deploy[executorch]'" in err, err
    monkeypatch.delitem(sys.modules, "ulsam_deploy.runtime.executorch", raising=False)
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)     # the import itself fails
    with pytest.raises(BackendUnavailable) as caught:
        runner_class("executorch")
    assert "pip install 'ulsam-deploy[executorch]'" in caught.value.hint, caught.value
