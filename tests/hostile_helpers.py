"""Shared by the hostile-input tests (tests/test_hostile*.py): a tiny model with every metadata key, exported
once per module, and the one-line / strict-JSON assertions."""

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ulsam_deploy.cli import app
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets import save_checkpoint

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
