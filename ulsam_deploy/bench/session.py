"""One ``bench``: export what is missing, parity for the agreement columns, then every artifact timed
interleaved (and, with ``vs``, a second model beside the first). The CLI and the Python API both run this."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

from ..errors import UlsamError
from ..model.options import ModelOptions


def choices(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(allowed) if text.strip().lower() == "all" else tuple(t.strip().lower() for t in text.split(","))
    for token in chosen:
        if token not in allowed:
            raise UlsamError(f"{flag} {token!r} is unknown", f"choose from {', '.join(allowed)} or all")
    return chosen


def _vs_reference(vs: str, primary_spec) -> tuple[Path | None, ModelOptions]:
    path = Path(vs)
    if path.exists():
        return path, ModelOptions()
    arch, _, positions = vs.partition("@")
    same_arch = arch.strip().lower() == primary_spec.arch   # another arch keeps its own default activation
    return None, ModelOptions(arch, positions, primary_spec.groups, primary_spec.width, primary_spec.num_classes,
                              primary_spec.input_size, primary_spec.activation if same_arch else None)


def _subject_manifest(model, options, formats, export_dir, npu: str | None = None):
    """An export directory passed as such is read as it is; a model is exported (into ``export_dir`` if given)."""
    from ..export import parse_formats
    from ..export.options import ExportOptions
    from ..store.manifest import MANIFEST, Manifest
    from ..workflow import export_for

    if model is not None and (Path(model) / MANIFEST).is_file():
        export_dir, model = Path(model), None
    if export_dir is not None and model is None and options == ModelOptions():
        return Manifest.load(export_dir)
    chosen = parse_formats(",".join(formats)) if formats else ("onnx",)
    extra = {} if npu is None else {"npu": npu}
    return export_for(model, options, ExportOptions(chosen, export_dir, **extra))[1]


def run_bench(model: Path | None, options: ModelOptions, export_dir: Path | None, vs: str | None, backend: str,
              precision: str, threads: int | None, batches: list[int], warmup: int, runs: int, parity: bool,
              ops: bool, force: bool, on_step: Callable[[str], None] | None = None,
              on_warning: Callable[[str], None] | None = None, npu: str | None = None):
    """The bench report (``rows``, ``ratios``, ``skipped``) and, with ``ops``, each artifact's op profile;
    for ``backend`` ethos-u, Vela's estimate of each model's NPU file instead (bench/npu.py)."""
    if backend.strip().lower() == "ethos-u":
        return _npu_bench(model, options, export_dir, vs, npu, parity, threads, on_step or (lambda what: None))
    if npu is not None:
        raise UlsamError("--npu has no effect: it applies to --backend ethos-u", "drop it, or pass --backend ethos-u")
    from ..bench.suite import BACKENDS, Subject, encoding_safe_here, formats_for, new_report, run_suite
    from ..model.profile import count_layers
    from ..runtime.isa import isa_label
    from ..store.manifest import locked
    from ..workflow import parity_for

    step = on_step or (lambda what: None)
    backends = choices(backend, "--backend", BACKENDS)
    precisions = choices(precision, "--precision", ("fp32", "fp16", "int8"))
    threads = os.cpu_count() or 1 if threads is None else threads
    for value, name, low, high in ((threads, "threads", 1, 256), (warmup, "warmup", 0, 10_000),
                                   (runs, "runs", 1, 100_000), *((b, "batch", 1, 4096) for b in batches)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UlsamError(f"--{name} {value!r} is not a whole number in {low}..{high}")
    if not batches:
        raise UlsamError("--batch names no batch size", "e.g. 1 or 1,8")
    refs = [(model, options)]
    skipped: list[str] = []
    formats = formats_for(backends, precisions, skipped, force)
    for name in [f for f in formats if not encoding_safe_here(f)]:
        if on_warning:
            on_warning(f"{name} is timed with --force on a CPU its INT8 encoding is not exact on ({isa_label()}): "
                       "its numbers are this CPU's kernels, not the artifact's meaning")
    keys = (["torch"] if "torch" in backends and "fp32" in precisions else []) + formats
    if not keys:
        raise UlsamError("no artifact matches --backend/--precision", "; ".join(skipped) or None)
    subjects, parities = [], []
    for index in range(2 if vs else 1):
        if index == 1:
            refs.append(_vs_reference(vs, subjects[0].manifest.spec))
        ref_model, ref_options = refs[index]
        step(f"export {ref_model or ref_options.arch}")
        manifest = _subject_manifest(ref_model, ref_options, formats, export_dir if index == 0 else None)
        rows = count_layers(manifest.spec)
        subjects.append(Subject(manifest, sum(r.params for r in rows), sum(r.macs for r in rows)))
        if parity and formats:
            step(f"parity {manifest.data['model']}")
            parities.append({r.artifact: r for r in parity_for(manifest, formats, None, threads, {}, force=force)})
        else:
            parities.append({})
    for key in [k for k in keys if k != "torch"]:
        holders = [s.name for s in subjects if key not in s.manifest.artifacts]
        if holders:
            keys.remove(key)
            skipped.append(f"{key}: not in the export directory of {', '.join(holders)}")
    result = new_report(subjects, threads)
    result.skipped = skipped
    with contextlib.ExitStack() as held:   # an export running meanwhile cannot swap an artifact being timed
        for subject in subjects:
            held.enter_context(locked(subject.manifest.directory, "read"))
        run_suite(subjects, keys, threads, batches, warmup, runs, parities, result,
                  subjects[0].manifest.spec.input_size, on_step=lambda what: step(f"timing {what}"), force=force)
    profiles = []
    if ops:
        from ..bench.ops import profile_ops

        step("profiling ops")
        profiles = profile_ops(subjects, [k for k in keys if k != "torch"], threads, runs)
    result.ops = profiles
    return result


def _npu_bench(model, options, export_dir, vs, npu, parity, threads, step):
    from ..export.vela import check_npu, require
    from .npu import NPU_FORMAT, run_npu_bench

    require()
    npu = None if npu is None else check_npu(npu)
    manifests = []
    for index in range(2 if vs else 1):
        ref_model, ref_options = (model, options) if index == 0 else _vs_reference(vs, manifests[0].spec)
        step(f"export {ref_model or ref_options.arch}")
        manifests.append(_subject_manifest(ref_model, ref_options, [NPU_FORMAT], export_dir if index == 0 else None,
                                           npu))
    return run_npu_bench(manifests, npu, parity, threads or 1, step)
