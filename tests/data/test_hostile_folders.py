"""Data folders as users really have them: file names that are not UTF-8 (Latin-1 from old archives and
network shares), symlinks (data sets link images into class folders), and things that are not files at
all (FIFOs, sockets, links into /proc, loops). Names are shown readably; only regular files are opened."""

import json
import os
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from ulsam_deploy.data.images import scan_images, sub_folders
from ulsam_deploy.data.preprocess import Preprocessing
from ulsam_deploy.data.sets import SCHEDULE, calibration_set, evaluation_source
from ulsam_deploy.data.stream import StreamStats, batches, files_fingerprint
from ulsam_deploy.errors import printable

LATIN1 = os.fsdecode(b"caf\xe9")          # 'caf\udce9': what Python makes of the byte 0xE9 in a file name


def _png(path, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def _strict_json(obj) -> str:
    """What a strict consumer accepts: no NaN, and UTF-8 that encodes (no lone surrogates)."""
    text = json.dumps(obj, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    return text


# --- 4. file names that are not UTF-8 -------------------------------------------------------------
@pytest.fixture
def latin1_folder(tmp_path):
    folder = tmp_path / f"photos-{LATIN1}"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"{LATIN1}-{i}.png", seed=i)
    (folder / f"{LATIN1}-broken.png").write_bytes(b"not a png")
    return folder


def test_printable_shows_the_odd_byte():
    assert printable(LATIN1 + ".png") == "caf\\xe9.png"
    assert printable("ok é ü") == "ok é ü"
    assert printable("\ud800") == "\\ud800"     # a lone surrogate that is no escaped byte


def test_the_fingerprint_hashes_non_utf8_names(latin1_folder):
    paths = sorted(latin1_folder.iterdir())
    before = files_fingerprint(paths)                                       # UnicodeEncodeError before
    assert before == files_fingerprint(paths)
    paths[0].rename(latin1_folder / "plain.png")
    assert files_fingerprint(sorted(latin1_folder.iterdir())) != before


def test_calibration_from_a_non_utf8_folder_is_described_readably(latin1_folder):
    calib = calibration_set(str(latin1_folder), 32, 16)
    assert calib.count == 16 and calib.skipped == 1
    description = _strict_json(calib.describe())             # what goes into manifest.json
    assert "photos-caf\\\\xe9" in description


@pytest.mark.parametrize("labelled", [False, True])
def test_streaming_a_non_utf8_folder_names_skipped_files_readably(tmp_path, latin1_folder, labelled):
    root = latin1_folder
    if labelled:
        root = tmp_path / "classes"
        (root / LATIN1).mkdir(parents=True)
        (root / "plain").mkdir()
        for path in latin1_folder.iterdir():
            os.rename(path, root / LATIN1 / path.name)
        _png(root / "plain" / "a.png")
    source = evaluation_source(str(root), 32, Preprocessing(size=32))
    stats = StreamStats()
    count = sum(len(b.images) for b in batches(source, 8, 1, stats))
    assert count == (4 if labelled else 3 * len(SCHEDULE)) and stats.skipped == 1
    assert "caf\\xe9" in stats.skipped_reasons[0] and "\udce9" not in stats.skipped_reasons[0]
    _strict_json({"data": source.name, "skipped": stats.skipped_reasons})
    assert source.labelled is labelled


# --- 11. symlinks and special files ---------------------------------------------------------------
@pytest.fixture
def linked(tmp_path):
    """data/ with a real image, a symlinked image from outside, and everything that is not a file."""
    outside = tmp_path / "pool"
    outside.mkdir()
    _png(outside / "shared.png", seed=1)
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "real.png")
    (data / "linked.png").symlink_to(outside / "shared.png")         # followed: data sets do this
    (data / "broken.png").symlink_to(tmp_path / "gone.png")
    (data / "environ.png").symlink_to("/proc/self/environ")          # a regular-looking kernel file
    (data / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(data / "fifo.png")                                      # opening it would block forever
    (data / "empty.png").write_bytes(b"")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(data / "socket.png"))
    except OSError:          # a file system without sockets: the rest still counts
        pass
    yield data
    server.close()


def test_only_regular_files_are_opened_and_the_rest_say_why(linked):
    scan = _in_thread(lambda: scan_images(linked))
    assert [p.name for p in scan.paths] == ["linked.png", "real.png"]
    reasons = {p.name: why for p, why in scan.skipped}
    assert "FIFO" in reasons["fifo.png"] and "character device" in reasons["zero.png"]
    assert "pseudo-file system" in reasons["environ.png"] and "broken symlink" in reasons["broken.png"]
    assert "empty" in reasons["empty.png"]
    if (linked / "socket.png").exists():
        assert "socket" in reasons["socket.png"]


def test_a_stream_over_special_files_never_blocks(linked):
    source = _in_thread(lambda: evaluation_source(str(linked), 32, Preprocessing(size=32)))
    stats = StreamStats()
    assert _in_thread(lambda: sum(len(b.images) for b in batches(source, 8, 1, stats))) == 2 * len(SCHEDULE)
    assert stats.skipped >= 5


def test_symlinked_class_folders_stay_inside_the_tree(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _png(outside / "secret.png")
    root = tmp_path / "classes"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        _png(root / name / "a.png")
    (root / "kitten").symlink_to(root / "cat")             # inside the tree: a class like any other
    (root / "escape").symlink_to(outside)                  # out of the tree: not followed
    (root / "loop").symlink_to(root)                       # back to the root: not followed
    (root / "cat" / "up").symlink_to(root)                 # inside a class: folders are never scanned
    (root / "notes").write_text("x")
    assert sub_folders(root) == ["cat", "dog", "kitten"]
    source = evaluation_source(str(root), 32, Preprocessing(size=32))
    assert source.num_classes == 3 and source.count == 3


def test_a_folder_of_only_escaping_links_is_not_labelled(tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "x").mkdir(parents=True)
    root = tmp_path / "flat"
    root.mkdir()
    _png(root / "a.png")
    (root / "escape").symlink_to(outside / "x")
    source = evaluation_source(str(root), 32, Preprocessing(size=32))
    assert not source.labelled and source.count == len(SCHEDULE)   # one image, every crop of the schedule


def _in_thread(work, timeout=30):
    """Run ``work`` with a deadline: opening a FIFO would block, and the test must say so, not hang."""
    result, error = [], []

    def run():
        try:
            result.append(work())
        except BaseException as exc:   # noqa: BLE001 - re-raised below
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked on a special file"
    if error:
        raise error[0]
    return result[0]
