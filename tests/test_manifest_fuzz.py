"""Hostile manifests: a valid manifest.json mutated at random (keys dropped, retyped, nulled; paths with
'..' or absolute; huge numbers; wrong hashes). check, parity and export must end with exit 0, 1 or 2,
never a traceback, and never read or write outside the export directory."""

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from ulsam_deploy.store.manifest import MANIFEST

SMALL = ["--arch", "mv2", "--positions", "13", "--width", "0.35", "--num-classes", "10", "--input-size", "32"]
EXPORT = ["export", *SMALL, "--formats", "onnx,onnx-int8", "--calib", "digits", "--calib-samples", "16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    root = tmp_path_factory.mktemp("fuzz-manifest")
    pristine = root / "pristine"
    assert CliRunner().invoke(app, [*EXPORT, "--out", str(pristine)]).exit_code == 0
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    other = root / "other"            # what a '../other/...' path would reach
    shutil.copytree(pristine, other)
    return root, pristine, images, other, json.loads((pristine / MANIFEST).read_text())


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-(10 ** 30), 10 ** 30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["../other/model.onnx", "/etc/passwd", "..", ".", "model.onnx/..",
                                           "../" * 5 + "etc/hosts", "0" * 64, "f" * 64, "", "manifest.json"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _mutate(data, path, op, value):
    data = copy.deepcopy(data)
    if not path:
        return value if op == "replace" else {}
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "drop":
        del parent[key]
    else:
        parent[key] = value
    return data


class _Opens:
    """Records every file opened (audit hook); the hook stays installed, recording only while active."""

    active = None

    @classmethod
    def install(cls):
        if getattr(sys, "_ulsam_open_hook", False):
            return
        sys._ulsam_open_hook = True

        def hook(event, args):
            if event == "open" and cls.active is not None and isinstance(args[0], (str, Path)):
                cls.active.append(str(args[0]))

        sys.addaudithook(hook)


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), command=st.sampled_from(["check", "check", "parity", "export"]))
def test_mutated_manifests_never_crash_or_escape(world, tmp_path_factory, data, command):
    from typer.testing import CliRunner

    from ulsam_deploy.cli import app

    root, pristine, images, other, manifest = world
    path = data.draw(st.sampled_from(list(_paths(manifest))))
    op = data.draw(st.sampled_from(["drop", "replace"]) if path else st.just("replace"))
    value = data.draw(NASTY)
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work)
    (work / MANIFEST).write_text(json.dumps(_mutate(manifest, path, op, value)))
    before = _snapshot(other) | _snapshot(images)
    args = [*EXPORT, "--out", str(work)] if command == "export" else [command, "--export", str(work), "--data",
                                                                          str(images)]
    _Opens.install()
    _Opens.active = []
    try:
        result = CliRunner().invoke(app, args)
    finally:
        opened, _Opens.active = _Opens.active, None
    assert result.exit_code in (0, 1, 2), (path, op, value, result.exit_code, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), (path, op, value, result.exception)
    assert "Traceback" not in result.stderr
    if result.exit_code == 2:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert _snapshot(other) | _snapshot(images) == before
    escaped = [p for p in opened if Path(p).resolve().is_relative_to(other)]
    assert not escaped, (path, op, value, escaped)
