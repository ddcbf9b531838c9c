"""Eager reference logits of a data set, kept in the export directory so that a second ``parity`` or
``check`` does not run the eager model again (it is the slowest runner).

Keyed by the reference weights, the data (a fingerprint taken before decoding), the preprocessing and the
form the reference runs in (:data:`REFERENCE_FORM`);
the decoded data's sha256 is stored too and compared when a pass ends. Rows are float32 logits in
stream order, read back through a memory map, so memory stays flat in the number of images.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import StaleArtifactError
from .fileio import atomic_path, write_json_atomic

FOLDER = "reference-logits"
# How the eager reference computes the cached rows (runtime.reference_runner): BatchNorm folded into the
# convolutions. Rows computed another way are not reused.
REFERENCE_FORM = "eager-bn-folded"


def cache_key(weights_sha256: str, fingerprint: str, preprocessing: dict) -> str:
    text = json.dumps([weights_sha256, fingerprint, preprocessing, REFERENCE_FORM], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ReferenceCache:
    """One cache entry: ``<key>.f32`` (rows x classes float32) and ``<key>.json`` (count, classes, sha256)."""

    def __init__(self, directory: Path, key: str):
        self.folder = Path(directory) / FOLDER
        self.rows_path, self.meta_path = self.folder / f"{key}.f32", self.folder / f"{key}.json"
        self._rows: np.ndarray | None = None
        self._cursor = 0
        self._writer = None

    # --- reading ----------------------------------------------------------------------------------
    def open(self) -> bool:
        """Map a complete entry; False when there is none (or it is unreadable)."""
        try:
            meta = json.loads(self.meta_path.read_text())
            count, classes = int(meta["count"]), int(meta["classes"])
            if self.rows_path.stat().st_size != count * classes * 4 or count < 1:
                return False
            self._rows = np.memmap(self.rows_path, np.float32, "r", shape=(count, classes))
            self.meta = meta
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return False
        return True

    def next_rows(self, n: int) -> np.ndarray:
        rows = np.array(self._rows[self._cursor:self._cursor + n])
        if len(rows) != n:
            raise StaleArtifactError("cached reference logits hold fewer rows than the data",
                                     f"delete {self.folder} and re-run")
        self._cursor += n
        return rows

    def finish_read(self, count: int, data_sha256: str) -> None:
        if count != self._cursor or count != int(self.meta["count"]) or data_sha256 != self.meta["sha256"]:
            self.discard()
            raise StaleArtifactError("the data changed since their reference logits were cached",
                                     "re-run the command; the cache was removed")

    # --- writing ----------------------------------------------------------------------------------
    def start_write(self) -> bool:
        """Begin a new entry; False when the export directory cannot be written (read-only media)."""
        try:
            self.folder.mkdir(exist_ok=True)
            self._atomic = atomic_path(self.rows_path)
            self._writer = open(self._atomic.__enter__(), "wb")
        except OSError:
            self._writer = None
            return False
        return True

    def append(self, logits: np.ndarray) -> None:
        if self._writer is not None:
            self._writer.write(np.ascontiguousarray(logits, np.float32).tobytes())

    def finish_write(self, count: int, classes: int, data_sha256: str) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close()
            self._atomic.__exit__(None, None, None)
            write_json_atomic(self.meta_path, {"count": count, "classes": classes, "sha256": data_sha256})
        except OSError:
            self.discard()
        finally:
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._writer = None

    def discard(self) -> None:
        for path in (self.meta_path, self.rows_path):
            try:
                os.unlink(path)
            except OSError:
                pass
