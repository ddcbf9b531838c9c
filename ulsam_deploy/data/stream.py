"""Data sets as streams: preprocessed batches decoded by worker threads while a runtime computes.

A :class:`Source` is an indexed collection of samples that decodes one sample at a time; nothing
holds the whole set, so memory does not grow with the number of images. :func:`batches` yields
fixed-size batches in order; a sample that fails to decode is skipped with its reason (the same
ones in every pass, so every runner sees the same images). The data's sha256 is the hash of the
preprocessed float32 batches in order - the same value as hashing the whole array at once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import InputFileError
from .preprocess import Preprocessing

MAX_SKIP_REASONS = 5


@dataclass
class Source:
    """``count`` samples; ``load(i)`` returns (CHW float32, label or None) or raises InputFileError."""

    name: str
    count: int
    load: Callable[[int], tuple[np.ndarray, int | None]]
    preprocessing: Preprocessing
    labelled: bool
    fingerprint: str                       # identifies the data before decoding (cache key)
    num_classes: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)   # found while scanning
    describe_sample: Callable[[int], str] | None = None            # names a sample in skip reasons


@dataclass
class Batch:
    images: np.ndarray                     # NCHW float32
    labels: np.ndarray | None


@dataclass
class StreamStats:
    """What one pass over a source saw: samples used, skipped (with the first reasons), hash, time."""

    count: int = 0
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    sha256: str = ""
    decode_wait_s: float = 0.0             # time the consumer waited for decoded batches

    def skip(self, what: str, reason: str) -> None:
        self.skipped += 1
        if len(self.skipped_reasons) < MAX_SKIP_REASONS:
            self.skipped_reasons.append(f"{what}: {reason}")


def _load_batch(source: Source, indices: Sequence[int]) -> tuple[list, list, list[tuple[int, str]]]:
    images, labels, failed = [], [], []
    for index in indices:
        try:
            image, label = source.load(index)
        except InputFileError as exc:
            failed.append((index, exc.message))
            continue
        images.append(image)
        labels.append(label)
    return images, labels, failed


def batches(source: Source, batch: int = 32, workers: int = 2, stats: StreamStats | None = None
            ) -> Iterator[Batch]:
    """Preprocessed batches of ``source`` in order; ``workers`` threads decode up to workers+1 batches ahead.

    ``stats`` (optional) is filled as the stream is consumed: count, skips, sha256, decode wait.
    """
    stats = stats if stats is not None else StreamStats()
    for what, reason in source.skipped:
        stats.skip(what, reason)
    digest = hashlib.sha256()
    chunks = [range(i, min(i + batch, source.count)) for i in range(0, source.count, batch)]
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")
    try:
        pending: deque = deque()
        upcoming = iter(chunks)
        for chunk in upcoming:
            pending.append(pool.submit(_load_batch, source, chunk))
            if len(pending) > workers:
                break
        while pending:
            t0 = time.perf_counter()
            images, labels, failed = pending.popleft().result()
            stats.decode_wait_s += time.perf_counter() - t0
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append(pool.submit(_load_batch, source, nxt))
            for index, reason in failed:
                stats.skip(source.describe_sample(index) if source.describe_sample else f"sample {index}", reason)
            if not images:
                continue
            array = np.stack(images).astype(np.float32, copy=False)
            digest.update(np.ascontiguousarray(array).tobytes())
            stats.count += len(array)
            yield Batch(array, np.asarray(labels, np.int64) if source.labelled else None)
    finally:   # on Ctrl-C/SIGTERM (or a consumer that stops early) queued batches are not decoded any more
        pool.shutdown(wait=True, cancel_futures=True)
    stats.sha256 = digest.hexdigest()


def array_source(name: str, images: np.ndarray, labels: np.ndarray | None, preprocessing: Preprocessing,
                 fingerprint: str, num_classes: int | None = None) -> Source:
    """A source over an array already in memory (small sets: digits, calibration photos)."""
    def load(i: int):
        return images[i], (int(labels[i]) if labels is not None else None)

    return Source(name, len(images), load, preprocessing, labels is not None, fingerprint, num_classes)


def files_fingerprint(paths: Sequence[Path], extra: str = "") -> str:
    """Identity of a list of files without reading them: names (their bytes: any encoding), sizes,
    modification times."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        st = path.stat()
        digest.update(os.fsencode(path) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def collect(source: Source, batch: int = 64, workers: int = 2) -> tuple[np.ndarray, np.ndarray | None, StreamStats]:
    """The whole source as one array (for small sets: calibration samples, training)."""
    stats = StreamStats()
    parts = list(batches(source, batch, workers, stats))
    if not parts:
        raise InputFileError(f"no usable images in {source.name}"
                             + (f" ({stats.skipped} skipped, e.g. {stats.skipped_reasons[0]})" if stats.skipped else ""))
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts]) if source.labelled else None
    return images, labels, stats
