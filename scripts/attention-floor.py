"""What ULSAM itself costs in each CPU runtime: MV2 + ULSAM against MV2 and against its floor.

The floor is the same network with every ULSAM replaced by an identity - the substitution's layers are gone
and nothing is put in their place - so ULSAM / floor is the latency of the attention blocks alone. The three
models (random weights, seed 0) are exported as `export` exports them and timed in turn, 20 calls of one model
at a time (the order reversed every other round), batch 1, so drift in machine load hits all three alike; a
ratio is the median over rounds of the two models' median latencies in the round.

ONNX Runtime: ULSAM in its ``spread`` form, INT8 by the same ``quantize_int8``, calibrated on the shipped
photos; ``--form broadcast --float-attention`` gives the graphs of earlier releases. LiteRT and ExecuTorch: the
export pipeline itself (formats ``tflite-fp32,tflite-int8`` / ``executorch-fp32,executorch-int8``), each model
exported in a process of its own - the floor's process runs ULSAM as an identity, and the TFLite exporter reuses
its conversion for the same reference weights, which the ULSAM model and its floor share.

    .venv/bin/python scripts/attention-floor.py --backend onnxruntime,litert,executorch --calls 2000

``--precision fp32`` (or ``int8``) exports and times one precision only.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from torch import nn

from ulsam_deploy.bench.timing import alternate, time_calls
from ulsam_deploy.data.images import PSEUDO_FILE_SYSTEMS
from ulsam_deploy.errors import SpecError, UlsamError
from ulsam_deploy.extras import require
from ulsam_deploy.formats import FORMATS, parse_formats
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.data.sets import DEFAULT_CALIB_SAMPLES
from ulsam_deploy.nets.build import MAX_BUILD_BYTES, estimate_size
from ulsam_deploy.nets.ulsam import FORMS, ULSAM

PER_ROUND = 20   # calls of one model in a row: each is timed warm, as `bench` times them
MODELS = ("base", "ULSAM", "floor")
# backend -> its (fp32, int8) formats; ONNX Runtime's are exported here, the others by the pipeline
BACKENDS = {"onnxruntime": ("onnx", "onnx-int8"), "litert": ("tflite-fp32", "tflite-int8"),
            "executorch": ("executorch-fp32", "executorch-int8")}


def floor_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ULSAM replaced by ``nn.Identity``."""
    floor = copy.deepcopy(model)
    for name, module in list(floor.named_modules()):
        if isinstance(module, ULSAM):
            parent, _, child = name.rpartition(".")
            setattr(floor.get_submodule(parent) if parent else floor, child, nn.Identity())
    return floor


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):     # one line and exit 2, as the CLI answers bad input
        _refuse(f"{message} (see --help)")


def _refuse(line: str):
    print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def _arguments(argv: list[str] | None) -> tuple[argparse.Namespace, ModelSpec, list[str]]:
    """The arguments, the ULSAM model's spec and the backends, all checked before anything is exported."""
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="onnxruntime", help=f"comma-separated: {', '.join(BACKENDS)}")
    parser.add_argument("--arch", default="mv2")
    parser.add_argument("--positions", default="13,14,16,17")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--precision", default="fp32,int8", help="comma-separated: fp32, int8 (default both)")
    parser.add_argument("--form", default="spread", choices=FORMS,
                        help="ULSAM's ONNX Runtime export form (broadcast: the eager graph of earlier releases)")
    parser.add_argument("--float-attention", action="store_true",
                        help="ONNX Runtime INT8 keeps ULSAM's path after its scores in float (earlier releases)")
    parser.add_argument("--keep", type=Path, help="a new folder to keep the artifacts in (default: deleted); a "
                        "floor folder records the ULSAM model as its reference, so `check` there breaks parity")
    parser.add_argument("--allow-large", action="store_true",
                        help="build models past the memory guard (fp32 weights and activations over 4 GiB)")
    args = parser.parse_args(argv)
    backends = list(dict.fromkeys(b.strip() for b in args.backend.split(",") if b.strip()))
    unknown = [b for b in backends if b not in BACKENDS] or ([] if backends else [args.backend])
    if unknown:
        _refuse(f"unknown --backend {unknown[0]!r} (choose from {', '.join(BACKENDS)})")
    if (args.form != "spread" or args.float_attention) and backends != ["onnxruntime"]:
        _refuse("--form and --float-attention choose ONNX Runtime's graphs; the other backends time what "
                "`export` writes (use them with --backend onnxruntime alone)")
    asked = {p.strip() for p in args.precision.split(",")}
    args.precisions = [p for p in ("fp32", "int8") if p in asked]
    if not args.precisions or asked - {"fp32", "int8"}:
        _refuse(f"--precision {args.precision!r}: choose fp32, int8 or fp32,int8")
    if args.calls < 1 or args.threads < 1:
        _refuse("--calls and --threads must be at least 1")
    if args.keep is not None and (args.keep.exists() or args.keep.is_symlink() or not args.keep.parent.is_dir()):
        _refuse(f"--keep {args.keep}: name a new folder in an existing one (nothing is written over)")
    if args.keep is not None and any(args.keep.parent.resolve().is_relative_to(root) for root in PSEUDO_FILE_SYSTEMS):
        _refuse(f"--keep {args.keep}: that is a kernel pseudo-file system, not a place for files")
    try:
        spec = ModelSpec.parse(args.arch, args.positions, args.groups, input_size=args.input_size)
        if not spec.positions:
            raise SpecError(f"--positions {args.positions!r} places no ULSAM", "name the layers it takes")
        _check_memory(spec, args.allow_large)
        for backend in backends:
            if backend != "onnxruntime":
                require(backend, f"--backend {backend}")
    except UlsamError as exc:
        _refuse(exc.one_line())
    return args, spec, backends


def _onnxruntime_files(spec: ModelSpec, args, work: Path) -> dict[str, dict[str, Path]]:
    """Per model, its ONNX file per precision, exported from memory in ``args.form``."""
    from ulsam_deploy.data import calibration_set
    from ulsam_deploy.export.onnx import export_onnx
    from ulsam_deploy.export.quantize import quantize_int8
    from ulsam_deploy.nets.build import build_model
    from ulsam_deploy.nets.ulsam import export_form

    ulsam = build_model(spec, seed=0).eval()
    models = {"base": build_model(spec.vanilla(), seed=0).eval(), "ULSAM": ulsam, "floor": floor_of(ulsam).eval()}
    calib = calibration_set("photos", spec.input_size).images
    files = {}
    for name, model in models.items():
        fp32, int8 = work / f"{name}.onnx", work / f"{name}.int8.onnx"
        with export_form(model, args.form):
            export_onnx(model, spec.input_size, fp32)
        if "int8" in args.precisions:
            quantize_int8(fp32, int8, calib, keep_attention_float=args.float_attention)
        files[name] = {"fp32": fp32, "int8": int8}
    return files


def _export_one(model: str, spec_fields: dict, formats: tuple[str, ...], out: str) -> str | None:
    """Export ``model`` as `export --formats ...` does, in a process of its own; None, or the error's line."""
    from ulsam_deploy.export.options import ExportOptions
    from ulsam_deploy.model.options import ModelOptions
    from ulsam_deploy.workflow import export_for

    if model == "floor":      # this process only: every ULSAM passes its input through
        ULSAM.forward = lambda self, x: x
        os.environ["ULSAM_EXPORT_WORKERS"] = "1"     # so every format is built here, under the patch
    fields = dict(spec_fields, positions="none") if model == "base" else spec_fields
    try:
        export_for(None, ModelOptions(**fields), ExportOptions(formats=parse_formats(",".join(formats)),
                                                               out=Path(out)))
    except UlsamError as exc:
        return exc.one_line()
    return None


def _pipeline_files(backend: str, args, work: Path) -> dict[str, dict[str, Path]]:
    """Per model, its artifact per precision, exported by the pipeline, one spawned process per model."""
    formats = tuple(f for f, p in zip(BACKENDS[backend], ("fp32", "int8")) if p in args.precisions)
    fields = {"arch": args.arch, "positions": args.positions, "groups": args.groups, "input_size": args.input_size}
    files = {}
    for name in MODELS:
        out = work / f"{backend}-{name}"
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            failed = pool.submit(_export_one, name, fields, formats, str(out)).result()
        if failed:
            _refuse(f"exporting the {name} model for {backend}: {failed}")
        files[name] = {FORMATS[f].precision: out / FORMATS[f].filename for f in formats}
    return files


def _time(backend: str, files: dict[str, dict[str, Path]], args, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per precision, the per-round median latency (ms) of each model: an array of rounds x models."""
    from ulsam_deploy.runtime import open_artifact

    medians = {}
    for precision in args.precisions:
        runners = [open_artifact(files[name][precision], backend, precision, args.threads) for name in MODELS]
        try:
            for runner in runners:
                time_calls(lambda: runner(x), PER_ROUND)   # warm-up
            calls = [lambda r=runner: r(x) for runner in runners]
            rounds = alternate(calls, PER_ROUND, max(1, args.calls // PER_ROUND), reverse=True)
            medians[precision] = np.array([[np.median(s) for s in round_] for round_ in rounds])
        finally:
            for runner in runners:
                runner.close()
    return medians


def _report(backend: str, medians: dict[str, np.ndarray]) -> None:
    """A row per precision; the INT8 speed-up when both were timed."""
    ratio = lambda p50, a, b: float(np.median(p50[:, a] / p50[:, b]))   # noqa: E731  per round, then median
    for precision, p50 in medians.items():
        base, ours, floor = np.median(p50, axis=0)
        print(f"{backend:12s} {precision:9s} {base:8.3f} {ours:9.3f} {floor:9.3f} {ratio(p50, 1, 0):11.3f} "
              f"{ratio(p50, 2, 0):11.3f} {ratio(p50, 1, 2):12.3f}")
    if set(medians) != {"fp32", "int8"}:
        return
    fp32, int8 = (np.median(medians[p], axis=0) for p in ("fp32", "int8"))
    speedup = ", ".join(f"{name} {a / b:.2f}x" for name, a, b in zip(MODELS, fp32, int8))
    print(f"{'':12s} INT8 speed-up over fp32 (p50): {speedup}")


def _check_memory(spec: ModelSpec, allow_large: bool) -> None:
    """The CLI's memory guard, counting what this script holds besides the network: every INT8 format is
    calibrated on an array of DEFAULT_CALIB_SAMPLES images at the input size."""
    network = estimate_size(spec).total_bytes
    calibration = DEFAULT_CALIB_SAMPLES * 3 * spec.input_size ** 2 * 4
    if network + calibration > MAX_BUILD_BYTES and not allow_large:
        raise SpecError(f"{spec.input_size} px needs about {(network + calibration) / 2 ** 30:.1f} GiB (the network "
                        f"{network / 2 ** 30:.1f} GiB, its {DEFAULT_CALIB_SAMPLES} calibration images "
                        f"{calibration / 2 ** 30:.1f} GiB), over the {MAX_BUILD_BYTES / 2 ** 30:g} GiB limit",
                        "pass a smaller --input-size, or --allow-large if the machine has the memory")


def main(argv: list[str] | None = None) -> None:
    args, spec, backends = _arguments(argv)
    x = np.random.default_rng(0).normal(size=(1, 3, spec.input_size, spec.input_size)).astype(np.float32)
    # kept artifacts are built beside --keep and renamed to it at the end: a folder that cannot hold them is
    # refused now, not after the timing, and an interrupted run leaves no half-filled --keep
    try:
        scratch_dir = tempfile.TemporaryDirectory(prefix=f".{args.keep.name}." if args.keep else "ulsam-floor-",
                                                  dir=args.keep.parent if args.keep else None)
    except OSError as exc:
        _refuse(f"--keep {args.keep}: cannot write there ({exc.strerror or exc})")
    with scratch_dir as scratch:
        work = Path(scratch) / "artifacts"
        work.mkdir()
        files = {b: _onnxruntime_files(spec, args, work) if b == "onnxruntime" else _pipeline_files(b, args, work)
                 for b in backends}
        print(f"{spec.name} vs {spec.vanilla().name}, {args.input_size} px, batch 1, {args.threads} threads, "
              f"{args.calls} calls each in rounds of {PER_ROUND}; ONNX Runtime: ULSAM form {args.form}, INT8 "
              f"attention {'float' if args.float_attention else 'INT8'}")
        print("backend      precision  base ms  ULSAM ms  floor ms  ULSAM/base  floor/base  ULSAM/floor")
        for backend in backends:
            _report(backend, _time(backend, files[backend], args, x))
        if args.keep is not None:
            work.rename(args.keep)


if __name__ == "__main__":
    main()
