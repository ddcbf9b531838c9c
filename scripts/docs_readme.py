"""MkDocs hook: README.md is the site's front page.

MkDocs reads pages from docs/ only, so the README is served as index.md at build time, with its links into
docs/ (``docs/models.md``, ``docs/bench-mv2-224.png``) made relative to the site.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

README = Path(__file__).resolve().parents[1] / "README.md"


def front_page(text: str) -> str:
    """The README's text with ``](docs/...)`` links pointing at the pages beside index.md."""
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files, config):
    if files.get_file_from_path("index.md") is None:
        files.append(File.generated(config, "index.md", content=front_page(README.read_text(encoding="utf-8"))))
    return files
