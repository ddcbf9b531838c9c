"""inspect: layer taps located in every artifact, probes that reproduce the artifact's logits bit for bit,
a planted outlier named where it hurts, and the picture."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.outliers import planted_file, plant_outlier, trained  # noqa: F401  (trained is a fixture)
from ulsam_deploy.verify.inspect import TapStats, mark_jump
from ulsam_deploy.nets import load_model
from ulsam_deploy.model.spec import ModelSpec

MV2 = ModelSpec.parse("mv2", "13,14,16,17", groups=4, width=0.5, num_classes=10, input_size=64)
MV1 = ModelSpec.parse("mv1", "8:1,9:1,11", groups=4, width=0.5, num_classes=10, input_size=64)


def export(cli, checkpoint, out, formats="onnx,onnx-int8", *extra):
    code, stdout, err = cli("export", "--model", checkpoint, "--formats", formats, "--calib", "digits",
                            "--calib-samples", "64", "--out", out, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


def inspect(cli, out, formats, *extra):
    code, stdout, err = cli("inspect", "--export", out, "--formats", formats, "--data", "digits", "--images", "96",
                            "--json", *extra)
    assert code == 0, err
    return {a["artifact"]: a for a in json.loads(stdout)["artifacts"]}


@pytest.mark.slow   # trains a small model first (the session's `trained` fixture)
@pytest.mark.parametrize("spec,layer", [(MV2, 3), (MV2, 4), (MV2, 13), (MV2, 19), (MV1, 2), (MV1, 4), (MV1, 11)])
def test_planted_model_computes_the_same_function(trained, spec, layer):
    import torch

    from ulsam_deploy.data import digits

    base = load_model(trained(spec))
    planted = plant_outlier(load_model(trained(spec)), layer)
    x = torch.from_numpy(np.array(digits.load("test", 64)[0][:64]))
    with torch.no_grad():
        a, b = base(x), planted(x)
    assert torch.allclose(a, b, atol=1e-3 * float(a.abs().max()))
    with pytest.raises(AssertionError):
        # the image; a residual sum (MV2 layer 5 reads layer 4's); a ULSAM's output (MV1 layer 10 reads 9:1's)
        plant_outlier(load_model(trained(spec)), 1 if spec.arch == "mv2" else 10)
    if spec.arch == "mv2":
        with pytest.raises(AssertionError):
            plant_outlier(load_model(trained(spec)), 5)


def test_jump_is_the_first_large_drop():
    def row(label, sqnr):
        return TapStats(label, f"layer{label}", int(label), "output", False, "post-quantisation", 1.0, 1.0, 0.0, sqnr)

    rows = [row("1", 47), row("2", 37), row("3", 34), row("4", 33), row("5", 12), row("6", 11)]
    assert mark_jump(rows) == (5, "5")          # the ~10 dB every INT8 MV2 loses at layer 2 is not the jump
    assert rows[4].drop_db == pytest.approx(21)
    assert mark_jump([row("1", 130), row("2", 120)]) == (None, None)   # float-exact: no jump
    # a 13 dB fall from 48 dB adds far less error than a 21 dB fall from 29 dB (a late planted outlier)
    late = [row(str(k), db) for k, db in enumerate([48.0, 34.6, 31.7, 30.7, 30.4, 29.2, 29.0, 8.0], 1)]
    assert mark_jump(late) == (8, "8")


@pytest.fixture(scope="module")
def mv2_export(trained, tmp_path_factory):
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    out = tmp_path_factory.mktemp("inspect") / "exp"
    result = CliRunner().invoke(app, ["export", "--model", str(trained(MV2)), "--formats",
                                      "onnx,onnx-int8,onnx-int8-trt", "--calib", "digits", "--calib-samples", "64",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def test_attention_spread_is_zero_for_uniform_maps():
    from ulsam_deploy.export.layermap import Tap
    from ulsam_deploy.verify.inspect import _TapAccumulator

    acc = _TapAccumulator(Tap("layer16.attention", "16 attn", 16, "attention", True))
    uniform = np.full((2, 4, 2, 2), 0.25, np.float32)          # 2 images, g = 4, 2x2 maps: 8 maps
    peaked = uniform.copy()
    peaked[0, 0] = [[0.7, 0.1], [0.1, 0.1]]                      # one map: (0.7 - 0.1) x 4 = 2.4
    acc.update(peaked, uniform)
    row = acc.result("output")
    assert row.eager_spread_mean == 0 and row.eager_spread_min == 0
    assert row.spread_mean == pytest.approx(2.4 / 8)


def test_inspect_rows_probe_and_picture(mv2_export, cli, tmp_path):
    picture = tmp_path / "inspect.png"
    found = inspect(cli, mv2_export, "onnx,onnx-int8,onnx-int8-trt", "--plot", picture)
    assert list(found) == ["onnx", "onnx-int8", "onnx-int8-trt"]
    for name, artifact in found.items():
        assert artifact["logits_identical"] and artifact["logits_max_diff"] == 0.0, name   # the probe is the artifact
        labels = [r["label"] for r in artifact["rows"]]
        assert labels[:3] == ["1", "2", "3"] and labels[-1] == "logits"
        assert labels.index("12") < labels.index("13 attn") < labels.index("13") < labels.index("14 attn")
        attention = [r for r in artifact["rows"] if r["kind"] == "attention"]
        assert len(attention) == 4 and all(r["ulsam"] and r["argmax_agreement"] is not None for r in attention)
        assert all(r["eager_spread_min"] >= 0 and r["spread_mean"] is not None for r in attention)
    assert found["onnx"]["first_jump_layer"] is None
    assert all(r["sqnr_db"] > 90 for r in found["onnx"]["rows"])
    int8 = found["onnx-int8"]
    assert int8["first_jump_layer"] is not None
    assert 15 < min(r["sqnr_db"] for r in int8["rows"] if r["sqnr_db"] is not None) < 60
    assert picture.stat().st_size > 20_000 and picture.read_bytes()[:4] == b"\x89PNG"


def test_inspect_table_and_refusals(mv2_export, cli, tmp_path):
    code, stdout, err = cli("inspect", "--export", mv2_export, "--formats", "onnx-int8", "--images", "32")
    assert code == 0, err
    assert "first jump" in stdout and "13 ULSAM" in stdout and "identical" in stdout
    for args in (("--plot", tmp_path / "x.jpg"), ("--formats", "onnx-int9"), ("--images", "0")):
        code, _, err = cli("inspect", "--export", mv2_export, *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
    code, _, err = cli("inspect", "--export", tmp_path / "nowhere")
    assert code == 2 and err.startswith("error: ")


# Where the error jumps: at the layer that first reads the planted channel, or the next one. A channel that
# two ULSAMs pass on untouched (MV2 13 and 14) shows its damage only where layer 15 divides it out.
@pytest.mark.parametrize("spec,layer,jump", [(MV2, 4, (4, 5)), (MV1, 11, (11, 12)),
                                             pytest.param(MV2, 3, (3, 4), marks=pytest.mark.slow),
                                             pytest.param(MV2, 19, (19,), marks=pytest.mark.slow),
                                             pytest.param(MV2, 13, (15,), marks=pytest.mark.slow),
                                             pytest.param(MV1, 4, (4, 5), marks=pytest.mark.slow)],
                         ids=["mv2-4", "mv1-11", "mv2-3", "mv2-19", "mv2-13", "mv1-4"])
@pytest.mark.slow   # trains a small model first (the session's `trained` fixture)
def test_planted_outlier_fails_check_and_is_named(trained, cli, tmp_path, spec, layer, jump):
    out = tmp_path / "exp"
    export(cli, planted_file(trained(spec), tmp_path, layer), out)
    code, _, err = cli("check", "--export", out, "--formats", "onnx-int8", "--data", "digits")
    assert code == 1 and "FAIL onnx-int8" in err
    found = inspect(cli, out, "onnx-int8")["onnx-int8"]
    assert found["logits_identical"]
    assert found["first_jump_layer"] in jump, [(r["label"], r["sqnr_db"]) for r in found["rows"]]


@pytest.mark.slow
def test_probe_stays_the_artifact_over_a_whole_test_set(cli, tmp_path):
    """The probes settle on the first 128 images; on the reference model's symmetric INT8 ONNX an exposed
    tensor changed ONNX Runtime's kernels for 2 of the 360 test images here. Whatever the CPU, the probe's
    logits must equal the artifact's on every image (a reading that breaks that is dropped)."""
    out = tmp_path / "exp"
    model = Path(__file__).resolve().parents[1] / "models" / "mv2-ulsam-13-14-16-17-g4-digits"
    code, _, err = cli("export", "--model", model, "--formats",
                       "onnx,onnx-int8,onnx-int8-trt", "--out", out)
    assert code == 0, err
    found = inspect(cli, out, "onnx-int8,onnx-int8-trt", "--images", "360")
    for name, artifact in found.items():
        assert artifact["count"] == 360 and artifact["logits_identical"], name
        assert sum(r["observed"] != "not observable" for r in artifact["rows"]) >= 20, name
