"""Streaming data: the online metrics equal the whole-array ones, batches hash like the array, odd files
are skipped with their reasons (and reported by parity), and memory does not grow with the count."""

import json
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from ulsam_deploy.data import fashion
from ulsam_deploy.data.preprocess import Preprocessing
from ulsam_deploy.data.sets import calibration_set, evaluation_source
from ulsam_deploy.data.stream import Source, StreamStats, batches, collect
from ulsam_deploy.verify.parity import ParityAccumulator, compare


@pytest.mark.parametrize("labelled", [True, False])
def test_streaming_metrics_equal_the_in_memory_ones(labelled):
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 3, (1000, 10)).astype(np.float32)
    logits = (reference + rng.normal(0, 0.8, reference.shape)).astype(np.float32)
    labels = rng.integers(0, 10, 1000) if labelled else None
    whole = compare(logits, reference, labels)
    acc = ParityAccumulator()
    for start in range(0, 1000, 37):   # uneven batches
        stop = start + 37
        acc.update(logits[start:stop], reference[start:stop], None if labels is None else labels[start:stop])
    streamed = acc.result()
    assert streamed.keys() == whole.keys()
    for key in ("top1_agreement", "top5_agreement", "accuracy", "reference_accuracy", "accuracy_delta"):
        if key in whole:
            assert streamed[key] == whole[key], key
    for key in ("cosine_mean", "cosine_min", "max_abs", "mean_abs", "logit_range"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-9, abs=0), key
    assert whole["top1_agreement"] < 100   # the test data disagree somewhere, so agreement is exercised


def test_batches_hash_like_the_whole_array_and_are_deterministic():
    calib = calibration_set("photos", 64, 40)
    source = evaluation_source("photos", 64)
    stats = StreamStats()
    images = np.concatenate([b.images for b in batches(source, batch=7, workers=3, stats=stats)])
    assert stats.count == source.count == 160
    assert np.array_equal(images[:40], calib.images) and stats.sha256 == collect(source)[2].sha256
    import hashlib

    assert stats.sha256 == hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def test_fashion_test_split_streams_with_labels():
    source = evaluation_source("fashion", 32)
    assert source.count == 10_000 and source.labelled and source.num_classes == 10
    first = next(batches(source, batch=16))
    raw, labels = fashion.raw("test")
    assert np.array_equal(first.labels, labels[:16]) and first.images.shape == (16, 3, 32, 32)
    assert np.allclose(first.images[0], fashion.preprocessing(32)(fashion.render(raw[0], 32)))


@pytest.fixture
def odd_labelled(tmp_path):
    tmp_path = tmp_path / "data"
    tmp_path.mkdir()
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    good = tmp_path / "b" / "0.png"
    (tmp_path / "b" / "truncated.png").write_bytes(good.read_bytes()[:60])   # header fine, body cut
    return tmp_path


def test_skipped_files_are_counted_with_reasons(odd_labelled):
    source = evaluation_source(str(odd_labelled), 32)
    stats = StreamStats()
    images = [b.images for b in batches(source, batch=3, stats=stats)]
    assert stats.count == sum(len(b) for b in images) == 8
    assert stats.skipped == 4
    text = " | ".join(stats.skipped_reasons)
    for name in ("junk.jpg", "empty.png", "notes.txt", "truncated.png"):
        assert name in text, text


@pytest.mark.slow
def test_parity_and_evaluate_report_skipped_files(odd_labelled, tmp_path, cli):
    from ulsam_deploy.nets import build_model, save_checkpoint
    from ulsam_deploy.model.spec import ModelSpec

    model = save_checkpoint(build_model(ModelSpec.parse("mv2", "", 4, 0.35, 2, 32)), tmp_path / "m.safetensors")
    out = tmp_path / "exp"
    code, _, err = cli("export", "--model", model, "--formats", "onnx", "--out", out)
    assert code == 0, err
    code, out_text, err = cli("parity", "--export", out, "--data", odd_labelled, "--json")
    assert code == 0, err
    result = json.loads(out_text)[0]
    assert result["count"] == 8 and result["skipped"] == 4 and len(result["skipped_reasons"]) == 4
    code, out_text, err = cli("parity", "--export", out, "--data", odd_labelled)
    assert "4 skipped" in out_text and "junk.jpg" in out_text
    code, out_text, err = cli("evaluate", "--model", model, "--data", odd_labelled, "--json")
    assert code == 0, err
    assert json.loads(out_text)["skipped"] == 4


def _peak_bytes(count: int) -> int:
    prep = Preprocessing(size=64, crop_fraction=1.0)
    image = np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32)
    source = Source("synthetic", count, lambda i: (image + i, i % 10), prep, True, f"synthetic:{count}")
    tracemalloc.start()
    try:
        for _ in batches(source, batch=32, workers=2):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_images():
    small, large = _peak_bytes(500), _peak_bytes(5000)
    assert large < 1.3 * small + (1 << 20), (small, large)
