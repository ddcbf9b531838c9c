import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.test_spec import MALFORMED
from ulsam_deploy.nets import load_checkpoint, load_model
from ulsam_deploy.nets.build import read_safetensors
from ulsam_deploy.model.spec import ModelSpec


def test_profile_json_keys(cli):
    code, out, _ = cli("profile", "--arch", "mv2", "--positions", "13,14,16,17", "--groups", "4", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("arch", "width", "positions", "groups", "params", "macs", "paper_params", "paper_macs", "layers"):
        assert key in data
    assert isinstance(data["paper_macs"], float) and abs(data["paper_macs"] - 223.77e6) < 0.2e6
    assert data["layers"][0]["layer"] == "1"


def test_profile_paper_table(cli):
    code, out, _ = cli("profile", "--paper")
    assert code == 0 and "40 of 42 within 1 %" in out


@pytest.mark.parametrize("arch,positions,groups,needle", MALFORMED[:-5])
def test_malformed_specs_one_line_exit_2(cli, arch, positions, groups, needle):
    code, out, err = cli("profile", "--arch", arch, "--positions", positions, "--groups", groups)
    assert code == 2, out
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("args", [["--groups", "abc"], ["--width", "wide"], ["--bogus"], ["--input-size", "1e6"],
                                  ["--model", "/no/such/file"], ["--width", "inf"]])
def test_bad_option_values_one_line(cli, args):
    code, out, err = cli("profile", *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")


def test_build_writes_checkpoint_and_refuses_bad_out(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    code, stdout, err = cli("build", "--arch", "mv1", "--positions", "13:1", "--num-classes", "10", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["name"] == "mv1-ulsam-13x1-g4-c10"
    code, _, _ = cli("profile", "--model", out, "--json")
    assert code == 0
    code, _, err = cli("profile", "--model", out, "--groups", "8")
    assert code == 2 and "drop the spec options" in err
    code, _, err = cli("build", "--out", tmp_path / "m.bin")
    assert code == 2 and not (tmp_path / "m.bin").exists()


# --- bring your own model ------------------------------------------------------------------------
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TV = FIXTURES / "torchvision_mv2_050_c10.pth"
TIMM_MV1 = FIXTURES / "timm_mv1_100_c10_ddp.pth"


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURES / "expected.safetensors"))


def _assert_logits(path, expected, key):
    with torch.no_grad():
        logits = load_model(path)(expected["input"])
    reference = expected[f"logits.{key}"]
    assert float((logits - reference).abs().max()) <= 1e-5 * float(reference.max() - reference.min())


@pytest.mark.slow
def test_torchvision_checkpoint_builds_exports_and_checks(cli, tmp_path, expected):
    out = tmp_path / "m.safetensors"
    code, stdout, err = cli("build", "--from", TV, "--arch", "mv2", "--width", "0.5", "--num-classes", "10",
                            "--input-size", "96", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["name"] == "mv2-w0.5-c10-s96" and summary["spec"]["activation"] == "relu6"
    assert [summary["transplant"][k] for k in ("loaded", "dropped", "new")] == [314, 0, 0]
    assert "torchvision mobilenet_v2 layout" in summary["origin"]
    assert summary["preprocessing"]["crop_fraction"] == 0.875 and summary["preprocessing"]["interpolation"] == "bilinear"
    _assert_logits(out, expected, "torchvision_mv2_050_c10")   # the logits are those of the input size they see
    code, _, err = cli("export", "--model", out, "--formats", "onnx", "--out", tmp_path / "export")
    assert code == 0, err
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["spec"]["activation"] == "relu6" and manifest["preprocessing"]["size"] == 96
    code, stdout, err = cli("check", "--export", tmp_path / "export", "--json")
    assert code == 0, err
    code, _, err = cli("export", "--model", out, "--preprocess", "timm", "--formats", "onnx", "--out", tmp_path / "e2")
    assert code == 2 and "records its preprocessing" in err and not (tmp_path / "e2").exists()


def test_timm_mv1_in_a_ddp_container_needs_relu6(cli, tmp_path, expected):
    out = tmp_path / "t.safetensors"
    code, stdout, err = cli("build", "--from", TIMM_MV1, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "uses ReLU6" in err and "--activation relu6" in err
    assert not out.exists() and stdout == ""
    code, stdout, err = cli("build", "--from", TIMM_MV1, "--activation", "relu6", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["name"] == "mv1-relu6-c10"
    assert summary["preprocessing"]["interpolation"] == "bicubic" and summary["preprocessing"]["mean"] == [0.5] * 3
    _assert_logits(out, expected, "timm_mv1_100_c10_ddp")


def test_timm_mv2_safetensors(cli, tmp_path, expected):
    out = tmp_path / "t2.safetensors"
    code, stdout, err = cli("build", "--from", FIXTURES / "timm_mv2_035_c10.safetensors", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["name"] == "mv2-w0.35-c10"
    _assert_logits(out, expected, "timm_mv2_035_c10")


def test_surgery_reports_dropped_and_new_tensors(cli, tmp_path):
    code, stdout, err = cli("build", "--from", TV, "--positions", "13,14,16,17", "--groups", "4",
                            "--num-classes", "10", "--out", tmp_path / "s.safetensors", "--json")
    assert code == 0, err
    result = json.loads(stdout)["transplant"]
    assert (result["loaded"], result["dropped"], result["new"]) == (242, 72, 56)
    changed = {row["layer"]: (len(row["dropped"]), len(row["new"])) for row in result["layers"] if row["dropped"] or row["new"]}
    assert changed == {"13": (18, 14), "14": (18, 14), "16": (18, 14), "17": (18, 14)}
    code, stdout, err = cli("build", "--from", TV, "--positions", "13,14,16,17", "--out", tmp_path / "s2.safetensors")
    assert code == 0, err
    assert "242 loaded, 72 dropped, 56 new" in stdout and "ULSAM g=4" in stdout


@pytest.mark.parametrize("args,needle", [
    (["--arch", "mv1"], "pass --arch mv2"),
    (["--width", "0.75"], "has width 0.5 (16 channels at layer 1)"),
    (["--activation", "relu"], "pass --activation relu6"),
    (["--preprocess", "keras"], "preset 'keras' is unknown"),
])
def test_build_from_refusals(cli, tmp_path, args, needle):
    out = tmp_path / "never.safetensors"
    code, stdout, err = cli("build", "--from", TV, *args, "--out", out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists() and stdout == ""


def test_class_count_and_corrupt_container_refusals(cli, tmp_path):
    code, _, err = cli("export", "--model", TV, "--num-classes", "11", "--formats", "onnx", "--out", tmp_path / "e")
    assert code == 2 and "classifier.weight" in err and not (tmp_path / "e").exists()
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "bad.pth")
    code, _, err = cli("build", "--from", tmp_path / "bad.pth", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "does not hold a state dict of tensors" in err and err.count("\n") == 1


def _image_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((40, 40, 3), np.uint8) + np.uint8(60 + 120 * c)
            Image.fromarray(base + rng.integers(0, 40, base.shape, dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_fine_tune_after_surgery_with_a_frozen_backbone(cli, tmp_path):
    start = tmp_path / "s.safetensors"
    code, _, err = cli("build", "--from", TV, "--positions", "13,14,16,17", "--num-classes", "2", "--input-size", "64",
                       "--out", start)
    assert code == 0, err
    folder = _image_folder(tmp_path / "images")
    code, stdout, err = cli("train", "--start-from", start, "--data", folder, "--epochs", "1", "--batch-size", "4",
                            "--freeze-backbone-epochs", "1", "--lr", "0.01", "--out", tmp_path / "tuned", "--json")
    assert code == 0, err
    before, after = load_checkpoint(start)[0], load_checkpoint(tmp_path / "tuned")[0]
    ulsam = [k for k in before if re.match(r"features\.layer(13|14|16|17)\.", k)]
    backbone = [k for k in before if k.startswith("features.") and k not in ulsam]
    assert len(backbone) == 314 - 2 - 4 * 18
    assert all(torch.equal(before[k], after[k]) for k in backbone)   # weights and BN statistics held
    assert any(not torch.equal(before[k], after[k]) for k in ulsam)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert f"{start} (sha256 " in card and "itself from" in card and "torchvision mobilenet_v2 layout" in card
    assert "backbone frozen for the first 1 epoch" in card
    meta = read_safetensors(tmp_path / "tuned" / "model.safetensors", tensors=False)[1]
    assert json.loads(meta["preprocessing"])["size"] == 64
    code, _, err = cli("train", "--model", start, "--data", folder, "--epochs", "1", "--batch-size", "4",
                       "--out", tmp_path / "tuned2")                        # --model still names the start
    assert code == 0, err
    moved = load_checkpoint(tmp_path / "tuned2")[0]
    assert not torch.equal(before["features.layer5.conv.1.0.weight"], moved["features.layer5.conv.1.0.weight"])


def test_start_from_with_another_class_count_says_what_to_do(cli, tmp_path):
    start = tmp_path / "c3.safetensors"
    assert cli("build", "--from", TV, "--num-classes", "3", "--out", start)[0] == 0
    code, _, err = cli("train", "--start-from", start, "--data", "digits", "--epochs", "1", "--out", tmp_path / "x")
    assert code == 2 and "digits has 10 classes, the model 3" in err and "--num-classes 10 first" in err
    assert not (tmp_path / "x").exists()


def test_model_options_override_a_base_field_by_field():
    from ulsam_deploy.commands.options import ModelOptions

    base = {"arch": "mv1", "width": 0.5, "num_classes": 10, "positions": "", "activation": "relu6"}
    assert ModelOptions(positions="8:1").spec(base) == ModelSpec.parse("mv1", "8:1", width=0.5, num_classes=10,
                                                                       activation="relu6")
    assert ModelOptions(arch="mv2").spec(base).activation == "relu6"           # mv2's own default
    assert ModelOptions(arch="mv1", activation="relu").spec(base).activation == "relu"
    assert ModelOptions().with_defaults(num_classes=3, arch="mv2") == ModelOptions(arch="mv2", num_classes=3)
    assert ModelOptions(num_classes=5).with_defaults(num_classes=3).num_classes == 5
