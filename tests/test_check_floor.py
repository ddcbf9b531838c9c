"""The gate costs little more than its inference: check against the bare runs of the same runners.

The floor is the eager reference and every artifact's runner called on the same images, already decoded,
with nothing else around them; ``check`` adds decoding, hashing, the metrics and the reference cache. It must
stay within 1.5x of the floor measured beside it (before and after, the mean of the two: the machine's load
drifts), a regression test of the pass's overhead, not a timing of the machine."""

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

MODEL = Path(__file__).resolve().parents[1] / "models" / "mv2-ulsam-13-14-16-17-g4-fashion-112"
IMAGES = 640
FACTOR = 1.5


def _floor(directory: Path, threads: int) -> float:
    """Seconds of bare inference: the reference and each artifact over the first IMAGES images, batch 32."""
    from ulsam_deploy.data.stream import batches
    from ulsam_deploy.runtime import open_entry, reference_runner
    from ulsam_deploy.store.manifest import Manifest
    from ulsam_deploy.verify.run import checked_reference, data_source

    manifest = Manifest.load(directory)
    reference, _ = checked_reference(manifest)
    images = [b.images for b in batches(data_source(manifest, None, IMAGES), 32)]
    runners = [reference_runner(reference, threads)] + [open_entry(directory / e["file"], e, threads)
                                                        for e in manifest.artifacts.values()]
    try:
        for runner in runners:
            runner(images[0])                      # each runner's first call, as in the check's first batch
        start = time.perf_counter()
        for batch in images:
            for runner in runners:
                runner(np.ascontiguousarray(batch))
        return time.perf_counter() - start
    finally:
        for runner in runners:
            runner.close()


@pytest.mark.slow
@pytest.mark.serial
def test_check_stays_near_its_floor(tmp_path):
    from ulsam_deploy import api
    from ulsam_deploy.store.refcache import FOLDER

    out = tmp_path / "exp"
    api.export(MODEL, ["onnx", "onnx-int8"], out=out)
    before = _floor(out, 2)
    shutil.rmtree(out / FOLDER, ignore_errors=True)      # the reference is computed, not read back
    start = time.perf_counter()
    run = api.check(out, images=IMAGES, threads=2)
    wall = time.perf_counter() - start
    after = _floor(out, 2)
    assert run.passed and run.results[0].count == IMAGES
    floor = (before + after) / 2
    assert wall <= FACTOR * floor, f"check {wall:.1f} s against a floor of {floor:.1f} s ({before:.1f}, {after:.1f})"
