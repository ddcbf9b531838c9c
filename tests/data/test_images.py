import numpy as np
import pytest
from PIL import Image

from ulsam_deploy.data import Preprocessing, calibration_set
from ulsam_deploy.data.images import open_rgb, scan_images
from ulsam_deploy.data.sets import SCHEDULE, folder_samples
from ulsam_deploy.errors import InputFileError


def _photo(path, mode="RGB", size=(64, 48)):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(path)
    elif mode == "P":
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert("P").save(path)
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
        shape = size[::-1] if channels is None else (*size[::-1], channels)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def odd_folder(tmp_path):
    _photo(tmp_path / "rgb.jpg")
    _photo(tmp_path / "grey.png", "L")
    _photo(tmp_path / "rgba.png", "RGBA")
    _photo(tmp_path / "palette.png", "P")
    _photo(tmp_path / "deep.png", "I;16")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.png").write_bytes(b"this is not a png at all")
    full = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 3])
    _photo(tmp_path / "tiny.png", size=(1, 1))
    return tmp_path


def test_odd_files_are_converted_or_skipped_with_reasons(odd_folder):
    scan = scan_images(odd_folder)
    assert sorted(p.name for p in scan.paths) == ["deep.png", "grey.png", "palette.png", "rgb.jpg", "rgba.png"]
    reasons = {p.name: why for p, why in scan.skipped}
    assert set(reasons) == {"empty.jpg", "notes.txt", "fake.png", "truncated.jpg", "tiny.png"}
    assert "too small" in reasons["tiny.png"] and "not an image" in reasons["notes.txt"]
    assert "could not be decoded" in reasons["truncated.jpg"] and "identify" in reasons["fake.png"]
    for path in scan.paths:
        assert open_rgb(path).mode == "RGB"


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (20_000, 20_000)).save(path, optimize=False)   # small file, 400 MP when decoded
    with pytest.raises(InputFileError, match="decompression-bomb guard"):
        open_rgb(path)


def test_folder_samples_are_deterministic_and_counted(odd_folder):
    prep = Preprocessing(size=32)
    a = folder_samples(odd_folder, prep, 20, "odd")
    b = folder_samples(odd_folder, prep, 20, "odd")
    assert a.images.shape == (20, 3, 32, 32) and a.images.dtype == np.float32
    assert a.sha256 == b.sha256 and a.skipped == 5
    with pytest.raises(InputFileError, match="outside 1..80"):
        folder_samples(odd_folder, prep, 5 * len(SCHEDULE) + 1, "odd")


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"")
    with pytest.raises(InputFileError, match="no usable images.*1 skipped"):
        calibration_set(str(tmp_path), 32, 4)
    with pytest.raises(InputFileError, match="does not exist"):
        calibration_set(str(tmp_path / "nope"), 32, 4)
    with pytest.raises(InputFileError, match="not a folder"):
        calibration_set(str(tmp_path / "junk.jpg"), 32, 4)


def test_shipped_photos_give_128_samples_at_224():
    calib = calibration_set("photos", 224, 128)
    again = calibration_set("photos", 224, 128)
    assert calib.images.shape == (128, 3, 224, 224)
    assert calib.sha256 == again.sha256 and calib.skipped == 0
    assert len(scan_images(calib_dir := __import__("ulsam_deploy.data.sets", fromlist=["x"]).photos_dir()).paths) >= 8, calib_dir


def test_preprocessing_round_trip():
    prep = Preprocessing(size=16)
    img = Image.fromarray(np.full((20, 30, 3), 128, np.uint8))
    x = prep(img)
    assert x.shape == (3, 16, 16)
    back = prep.denormalise(x[None])
    assert np.allclose(back, 128 / 255, atol=1e-6)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
