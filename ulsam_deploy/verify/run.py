"""Parity of an export directory: every artifact against its reference weights, in one streamed pass.

Each batch is decoded once (worker threads) and fed to the eager reference (or read from the
reference-logit cache) and to every artifact's Runner; metrics accumulate online. The pass holds the
directory's read lock, so an export running at the same time cannot change what is being checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..data.preprocess import Preprocessing
from ..data.sets import evaluation_source, reference_set
from ..data.stream import Source, StreamStats, batches
from ..errors import InputFileError, UlsamError
from ..store.manifest import REFERENCE, Manifest, locked, weights_sha256
from ..nets import load_model
from .parity import ParityResult, PassTimes, compare_stream, judge, thresholds_for
from ..store.refcache import ReferenceCache, cache_key
from ..store.verified import verified_labels
from ..runtime import open_entry, reference_runner
from ..runtime.isa import refusal


@dataclass
class ParityRun:
    """The results of one pass, what was missing, and where the time went."""

    directory: str
    data: str
    results: list[ParityResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # formats asked for or promised but not built
    times: PassTimes = field(default_factory=PassTimes)
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)     # artifacts run with --force on a CPU they are not exact on

    @property
    def passed(self) -> bool:
        return bool(self.results) and not self.missing and all(r.passed for r in self.results)


def data_source(manifest: Manifest, data: str | None, images: int | None = None) -> Source:
    """The stream parity runs on: ``data``, else the model's own test set (a reference set the manifest
    names; never a path it holds), else the calibration photos, with the recorded preprocessing; with
    ``images``, its first ``images`` samples (named so in the source's name, keyed apart in the cache)."""
    spec = manifest.spec
    prep = Preprocessing.from_dict(manifest.data["preprocessing"])
    source = evaluation_source(data or reference_set(manifest.data.get("dataset")) or "photos", spec.input_size, prep)
    if images is not None and images < source.count:
        source.name = f"{source.name}, first {images:,} of {source.count:,}"
        source.fingerprint = f"{source.fingerprint}:first:{images}"
        source.count = images
    if source.labelled and source.num_classes not in (None, spec.num_classes):
        # labels of another task say nothing about this model; the images still serve for parity
        source.labelled = False
        source.name = f"{source.name} (unlabelled for {spec.num_classes} classes)"
    return source


def checked_reference(manifest: Manifest):
    """(the eager reference model of an export directory, its weights' sha256), refused when its weights are
    not the ones the manifest records."""
    reference = load_model(manifest.directory / REFERENCE)
    weights = weights_sha256(reference)
    if weights != manifest.data["weights_sha256"]:
        raise InputFileError(f"{manifest.directory / REFERENCE} does not match its manifest",
                             "re-run `ulsam-deploy export`")
    return reference, weights


def unsafe_here(manifest: Manifest, names: list[str], force: bool) -> list[str]:
    """Refuse (or with ``force``, warn of) artifacts whose integer kernels are not exact on this CPU."""
    reasons = [reason for name in names if (reason := refusal(name, manifest.artifacts[name]))]
    if reasons and not force:
        raise UlsamError(reasons[0], "run it on such a CPU, use onnx-int8 (exact on every CPU), "
                                     "or pass --force to run it anyway")
    return [f"{reason}: run anyway (--force), so its numbers are this CPU's kernels, not the artifact's meaning"
            for reason in reasons]


def run_parity(directory, formats: list[str] | None, data: str | None, threads: int, overrides: dict,
               batch: int = 32, given_model=None, workers: int = 2, force: bool = False,
               on_start: Callable[[int], None] | None = None,
               on_batch: Callable[[int], None] | None = None, images: int | None = None) -> ParityRun:
    """Parity of ``formats`` (default: every artifact listed or promised) of the export ``directory``, on
    the first ``images`` samples of the data (default: all of them).

    An INT8 artifact whose encoding is not exact on this CPU is refused (UlsamError), or with ``force`` run
    and named in ``warnings``."""
    with locked(directory, "read"):
        manifest = Manifest.load(directory)
        reference, weights = checked_reference(manifest)
        if given_model is not None:
            other = load_model(given_model)
            manifest.verify_model(other.spec, weights_sha256(other), str(given_model))
        names = formats or list(dict.fromkeys(manifest.promised + list(manifest.artifacts)))
        source = data_source(manifest, data, images)
        run = ParityRun(str(manifest.directory), source.name,
                        missing=[n for n in names if n not in manifest.artifacts])
        present = [n for n in names if n in manifest.artifacts]
        paths = {name: manifest.verify_artifact(name) for name in present}
        run.warnings = unsafe_here(manifest, present, force)
        if not present:
            return run
        runners = {}
        try:
            for name in present:
                entry = manifest.artifacts[name]
                runners[name] = open_entry(paths[name], entry, threads)
            key = cache_key(weights, source.fingerprint, manifest.data["preprocessing"])
            stats = StreamStats()
            if on_start:
                on_start(source.count)
            accumulators, run.times = _pass(manifest, source, reference, key, runners, threads, batch, workers,
                                            stats, on_batch)
        finally:
            for runner in runners.values():
                runner.close()
    run.skipped, run.skipped_reasons = stats.skipped, stats.skipped_reasons
    if stats.count == 0:
        raise InputFileError(f"no usable images in {source.name} ({stats.skipped} skipped"
                             + (f", e.g. {stats.skipped_reasons[0]})" if stats.skipped_reasons else ")"))
    for name in present:
        entry = manifest.artifacts[name]
        result = ParityResult(artifact=name, backend=entry["backend"], precision=entry["precision"],
                              count=stats.count, data=source.name, skipped=stats.skipped,
                              skipped_reasons=list(stats.skipped_reasons), seconds=run.times.artifacts[name],
                              reference_cached=run.times.reference_cached,
                              verified_on=verified_labels(manifest.data, name, entry["sha256"]),
                              **accumulators[name].result())
        run.results.append(judge(result, thresholds_for(entry["backend"], entry["precision"], overrides)))
    return run


def _pass(manifest, source, reference, key, runners, threads, batch, workers, stats, on_batch):
    cache = ReferenceCache(manifest.directory, key)
    cached = cache.open()
    if cached:
        accumulators, times = compare_stream(batches(source, batch, workers, stats),
                                             lambda images: cache.next_rows(len(images)), runners, on_batch)
        cache.finish_read(stats.count, stats.sha256)
        times.reference_cached = True
    else:
        eager = reference_runner(reference, threads)
        writing = cache.start_write()
        classes: list[int] = []

        def compute(images: np.ndarray) -> np.ndarray:
            logits = eager(images)
            cache.append(logits)
            classes[:] = [logits.shape[1]]
            return logits

        try:
            accumulators, times = compare_stream(batches(source, batch, workers, stats), compute, runners, on_batch)
        except BaseException:
            cache.abort()
            raise
        finally:
            eager.close()
        if writing and stats.count:
            cache.finish_write(stats.count, classes[0], stats.sha256)
    times.decode_wait = stats.decode_wait_s
    return accumulators, times
