import json

import pytest

from tests.test_spec import MALFORMED


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
