import json
from pathlib import Path

import pytest


MODELS = sorted(p for p in (Path(__file__).resolve().parents[1] / "models").iterdir() if (p / "model.safetensors").is_file())


# a 112 px model evaluates 10,000 images at 112 px (about 40 s on 2 cores): end-to-end, with the slow tests
CARDS = [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name.endswith("-112") else []) for p in MODELS]


@pytest.mark.parametrize("folder", CARDS)
def test_shipped_model_reproduces_its_card(folder, cli):
    code, out, err = cli("evaluate", "--model", folder, "--json")
    assert code == 0, err
    result = json.loads(out)
    dataset = next(name for name in ("digits", "fashion") if f"-{name}" in folder.name)
    expected = {"digits": (360, "digits:test"), "fashion": (10_000, "fashion:test")}[dataset]
    assert (result["count"], result["data"]) == expected
    assert abs(result["top1"] - result["card_top1"]) <= 0.5
    assert f"{result['card_top1']:.2f} %" in (folder / "README.md").read_text()
    assert (folder / "model.safetensors").stat().st_size < 12e6


def test_every_required_reference_model_ships():
    names = {p.name for p in MODELS}
    assert {"mv2-ulsam-13-14-16-17-g4-digits", "mv2-digits", "mv1-ulsam-8x1-9x1-11-g4-digits",
            "mv2-ulsam-13-14-16-17-g4-fashion", "mv2-fashion", "mv2-ulsam-13-14-16-17-g4-fashion-112",
            "mv2-fashion-112"} <= names
