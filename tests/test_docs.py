"""The documentation cannot drift: every block marked runnable in README.md and docs/ runs as written, the pages
stay short enough to read, and every page is in the site's navigation.

A block is runnable when the line before its opening fence is ``<!-- runnable -->`` (``<!-- runnable: slow -->``
for one that takes more than a few seconds). The runnable blocks of one page run in order, Python blocks in one
namespace (a notebook), bash blocks with this environment's ``ulsam-deploy`` on PATH, all in a fresh working
directory where ``models/``, ``datasets/`` and ``calibration/`` are the repository's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(slow))?\s*-->\s*$")
FENCE = re.compile(r"^```(\w+)")
SHARED = ("models", "datasets", "calibration")
README_LINES, PAGE_LINES = 300, 400


def runnable_blocks(path: Path) -> list[tuple[int, str, str, bool]]:
    """(line, language, code, slow) of each runnable block of a page, in order."""
    lines, blocks = path.read_text(encoding="utf-8").splitlines(), []
    for i, line in enumerate(lines[:-1]):
        marker, fence = MARKER.match(line.strip()), FENCE.match(lines[i + 1])
        if not marker:
            continue
        assert fence, f"{path.name}:{i + 1}: a runnable marker must sit right above a fenced block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks.append((i + 3, fence.group(1), "\n".join(lines[i + 2:end]) + "\n", marker.group(1) == "slow"))
    return blocks


def _cases():
    for page in PAGES:
        blocks = runnable_blocks(page)
        if blocks:
            marks = [pytest.mark.slow] if any(slow for *_, slow in blocks) else []
            yield pytest.param(page, blocks, id=str(page.relative_to(ROOT)), marks=marks)


@pytest.mark.parametrize("page, blocks", list(_cases()))
def test_the_runnable_blocks_of_a_page_run_as_written(page, blocks, tmp_path, monkeypatch):
    for name in SHARED:
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    namespace: dict = {"__name__": "__docs__"}
    for line, language, code, _ in blocks:
        where = f"{page.relative_to(ROOT)}:{line}"
        if language == "python":
            exec(compile(code, where, "exec"), namespace)
        elif language in ("bash", "sh", "console"):
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        else:
            pytest.fail(f"{where}: cannot run a {language} block")


def test_there_are_runnable_blocks_on_the_front_page_and_in_the_worked_example():
    assert runnable_blocks(ROOT / "README.md") and runnable_blocks(DOCS / "example.md")


def test_the_front_page_and_every_page_stay_readable_in_length():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= README_LINES
    long = {p.name: n for p in DOCS.rglob("*.md") if (n := len(p.read_text(encoding="utf-8").splitlines())) > PAGE_LINES}
    assert not long, f"pages over {PAGE_LINES} lines: {long}"


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config[config.index("\nnav:"):]
    listed = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", nav, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")} | {"index.md"}   # index.md: the README
    assert listed == pages, f"not in nav: {sorted(pages - listed)}; in nav, no page: {sorted(listed - pages)}"
