"""Training data that goes bad: an image unreadable mid-run is replaced and reported, too many stop the run in
one line, and a folder's own problems (empty classes, labels that collide, metadata the model could not carry)
are refused before the first epoch."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ulsam_deploy.data.preprocess import Preprocessing
from ulsam_deploy.errors import InputFileError, UlsamError
from ulsam_deploy.training.data import folder_data

TRAIN = ["train", "--arch", "mv2", "--width", "0.35", "--input-size", "32", "--epochs", "1", "--batch-size", "8"]


def _folder(root: Path, per_class: int = 20, classes=("cat", "dog"), side: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def _truncate(path: Path) -> None:
    """Keep the PNG header (the scan reads only that), cut the pixel data."""
    path.write_bytes(path.read_bytes()[:120])


def test_an_unreadable_image_is_replaced_by_its_readable_neighbour(tmp_path):
    root = _folder(tmp_path / "imgs")
    data = folder_data(root, None, Preprocessing(size=32), False, 0)
    paths = sorted(root.glob("*/*.png"))
    names = [f"{p.parent.name}/{p.name}" for p in paths]
    good = {}
    for index in range(data.train.count):
        x, y, skipped = data.train[index]
        assert skipped == ""
        good[index] = (x, y)
    # the training set's own order: find two neighbours of one class, break the first one
    index = next(i for i in range(data.train.count - 1) if data.train.labels[i] == data.train.labels[i + 1])
    broken = next(p for p in paths if data.train._describe(index) == f"{p.parent.name}/{p.name}")
    _truncate(broken)
    x, y, skipped = data.train[index]
    assert skipped.startswith(data.train._describe(index) + ": ") and "could not be decoded" in skipped
    assert y == good[index + 1][1] and x.equal(data.train._sample(index + 1, data.train._image_of(index + 1))[0])
    broken.unlink()                                              # deleted while training runs
    x, y, skipped = data.train[index]
    assert "No such file" in skipped and names  # the reason names what happened


@pytest.mark.slow
def test_a_corrupt_image_mid_run_is_skipped_counted_and_listed_in_the_card(cli, tmp_path):
    root = _folder(tmp_path / "imgs", per_class=60)
    _truncate(root / "dog" / "007.png")                          # passes the header-only scan
    out = tmp_path / "m"
    code, stdout, err = cli(*TRAIN, "--num-classes", "2", "--data", root, "--workers", "2", "--batch-size", "16",
                            "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["unreadable_reads"] == 1 and summary["history"][0]["skipped"] == 1
    card = (out / "README.md").read_text()
    assert "Unreadable while training: 1 read(s)" in card and "`dog/007.png`: 007.png could not be decoded" in card


@pytest.mark.slow
def test_two_processes_skip_the_same_way_and_the_card_gathers_both(tmp_path):
    """Under --nproc 2 each process reads its share: a bad image in either is replaced, the batches stay
    equal (the run ends), and the count and names come from both processes."""
    import subprocess
    import sys

    root = _folder(tmp_path / "imgs", per_class=60)
    for path in (root / "cat" / "003.png", root / "dog" / "011.png"):
        _truncate(path)
    out = tmp_path / "m"
    done = subprocess.run([sys.executable, "-m", "ulsam_deploy", *TRAIN, "--num-classes", "2", "--data", str(root),
                           "--workers", "1", "--batch-size", "16", "--nproc", "2", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["unreadable_reads"] == 2
    card = (out / "README.md").read_text()
    assert "`cat/003.png`" in card and "`dog/011.png`" in card


def test_too_many_unreadable_images_stop_the_run_in_one_line(cli, tmp_path):
    root = _folder(tmp_path / "imgs", per_class=40)
    for path in sorted(root.glob("cat/*.png"))[:6]:
        _truncate(path)
    out = tmp_path / "m"
    code, _, err = cli(*TRAIN, "--num-classes", "2", "--data", root, "--workers", "2", "--out", out)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "could not be read (more than 1%" in lines[0] and "no epoch had finished" in lines[0]
    assert "fix or remove the unreadable images" in err and "Traceback" not in err


def test_scan_skips_are_counted_with_their_reasons_in_the_card(cli, tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "zero.jpg").write_bytes(b"")
    out = tmp_path / "m"
    code, stdout, err = cli(*TRAIN, "--num-classes", "2", "--data", root, "--workers", "0", "--max-steps", "1",
                            "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["skipped_at_scan"] == 3
    assert "Skipped by the scan: 3 file(s) - 2 an empty file, 1 not an image file name." in (out / "README.md").read_text()


@pytest.mark.parametrize("make, says", [
    (lambda root: (root / "bird").mkdir(), "the class folder 'bird' has no usable images"),
    (lambda root: ((root / "bird").mkdir(), (root / "bird" / "a.png").write_bytes(b"")),
     "the class folder 'bird' has no usable images (1 file(s) skipped, e.g. an empty file)"),
    (lambda root: _folder(root, 5, classes=("cat\x01", "cat\x02")), "both become the label 'cat'"),
])
def test_a_folder_whose_classes_cannot_be_trained_is_refused_before_anything_is_written(cli, tmp_path, make, says):
    root = _folder(tmp_path / "imgs")
    make(root)
    out = tmp_path / "m"
    code, _, err = cli(*TRAIN, "--num-classes", "3", "--data", root, "--workers", "0", "--out", out)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert not out.exists()
    with pytest.raises(InputFileError, match=says.split(" (")[0]):
        folder_data(root, None, Preprocessing(size=32), False, 0)


def _facts(names, build: bool = False):
    from ulsam_deploy.model.spec import ModelSpec
    from ulsam_deploy.nets.build import build_model
    from ulsam_deploy.training.data import Recipe
    from ulsam_deploy.training.train import TrainConfig

    spec = ModelSpec.parse("mv2", "", 4, width=0.35, num_classes=len(names), input_size=32)
    data = SimpleNamespace(name="folder", preprocessing=Preprocessing(size=32), recipe=Recipe("random-resized-crop"),
                           class_names=tuple(names), evaluation=SimpleNamespace(count=10))
    return build_model(spec) if build else SimpleNamespace(spec=spec), data, TrainConfig()


def test_real_label_sets_fit_in_the_checkpoint_and_read_back(tmp_path):
    """300 classes of 250 characters and 135 of 80 CJK characters were past the old 64 KiB metadata value;
    ImageNet-21k's 21,841 classes of ~64 characters must fit as well."""
    from ulsam_deploy.nets.build import read_metadata, save_checkpoint
    from ulsam_deploy.training import card

    for names in ([f"{i:03d}" + "x" * 247 for i in range(300)], [f"{i:03d}" + "\u732b" * 77 for i in range(135)]):
        model, data, config = _facts(names, build=True)
        card.check_writable(model, data, config)
        path = save_checkpoint(model, tmp_path / "m.safetensors", extra=card.checkpoint_extra(
            data, config, card.Accuracy(50.0, 90.0, 10)))
        assert list(read_metadata(path).class_names) == names
    card.check_writable(*_facts([f"n{i:08d} " + "a" * 54 for i in range(21_841)]))


def test_a_label_set_the_model_could_not_carry_is_refused_before_training():
    from ulsam_deploy.training import card

    model, data, config = _facts(["a", "b", "c"])
    data.class_names = tuple(f"c{i}" for i in range(100_001))
    with pytest.raises(UlsamError, match="could not be read back: its metadata class_names"):
        card.check_writable(model, data, config)
