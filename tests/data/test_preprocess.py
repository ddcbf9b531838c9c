"""Preprocessing presets reproduce torchvision's and timm's own pixels (fixture written by those libraries)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from ulsam_deploy.data.preprocess import PRESETS, Preprocessing, preset
from ulsam_deploy.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]
# fixture crop name -> (our preset, arch)
CROPS = {"torchvision": ("torchvision", "mv2"), "torchvision-v2": ("torchvision-v2", "mv2"),
         "timm-mv2": ("timm", "mv2"), "timm-mv1": ("timm", "mv1")}


@pytest.fixture(scope="module")
def fixture():
    with safe_open(str(ROOT / "tests" / "fixtures" / "expected.safetensors"), framework="np") as handle:
        meta = handle.metadata()
        crops = {k.removeprefix("crop."): handle.get_tensor(k) for k in handle.keys() if k.startswith("crop.")}
    return crops, json.loads(meta["preprocessing"]), ROOT / "tests" / "fixtures" / meta["photo"]


@pytest.mark.parametrize("name", sorted(CROPS))
def test_presets_reproduce_the_library_pixels(fixture, name):
    crops, configs, photo = fixture
    ours = preset(*CROPS[name][:1], 224, CROPS[name][1])
    with Image.open(photo) as image:
        pixels = np.asarray(ours.resize_crop(image))
    assert pixels.shape == crops[name].shape == (224, 224, 3)
    # identical with the fixture's Pillow; one level of slack for another Pillow's rounding, while a pixel
    # of shift or the other filter differs by tens of levels
    assert np.abs(pixels.astype(int) - crops[name]).max() <= 1
    config = configs[name]
    assert ours.interpolation == config["interpolation"]
    assert np.allclose(ours.mean, config["mean"]) and np.allclose(ours.std, config["std"])
    assert round(224 / ours.crop_fraction) == config.get("resize", int(224 / config.get("crop_pct", 1)))


def test_presets_differ_where_the_libraries_do(fixture):
    crops = fixture[0]
    assert not np.array_equal(crops["torchvision"], crops["timm-mv2"])       # bicubic vs bilinear
    assert not np.array_equal(crops["torchvision"], crops["torchvision-v2"])  # resize 256 vs 232


def test_preset_scales_with_the_input_size():
    small = preset("torchvision-v2", 112, "mv2")
    assert small.size == 112 and small.crop_fraction == pytest.approx(224 / 232)
    assert preset("timm", 96, "mv1").mean == (0.5, 0.5, 0.5)
    assert set(PRESETS) == {"ours", "torchvision", "torchvision-v2", "timm"}


@pytest.mark.parametrize("kwargs,needle", [({"interpolation": "lanczos"}, "interpolation"),
                                           ({"crop_fraction": 1.5}, "crop fraction")])
def test_bad_preprocessing_is_refused(kwargs, needle):
    with pytest.raises(SpecError, match=needle):
        Preprocessing(**kwargs)
    with pytest.raises(SpecError, match="preset 'keras' is unknown"):
        preset("keras", 224)


def test_renormalise_keeps_the_pixels():
    imagenet, half = Preprocessing(size=8, crop_fraction=1.0), preset("timm", 8, "mv1")
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    batch = imagenet.normalise(rgb)[None]
    moved = half.renormalise(batch, imagenet)
    assert np.allclose(moved, half.normalise(rgb)[None], atol=1e-5)
    assert half.renormalise(moved, half) is moved
