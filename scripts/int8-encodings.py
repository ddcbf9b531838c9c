"""ONNX Runtime's INT8 encodings on this CPU and on an emulated one: do the fused kernels compute the file's meaning?

For each model: `export --formats onnx,onnx-int8,onnx-int8-vnni` (7-bit and 8-bit weights), the first N images of
its evaluation set, and per INT8 file the logits of (a) its Q/DQ meaning (ONNX Runtime, graph optimisations off),
(b) ONNX Runtime's fused integer kernels here and (c) with ``--emulate CPU`` the same kernels under
``qemu-x86_64 -cpu CPU`` (scripts/int8-kernels.py: numpy and ONNX Runtime only). Top-1 agreement is with the
float ONNX; "= meaning" is agreement with (a); "= here" says whether the emulated CPU's logits are bit-identical
to this CPU's. Then batch-1 latency of the two encodings and the float ONNX, taking turns (bench.timing.alternate).

    .venv/bin/python scripts/int8-encodings.py --model models/mv2-ulsam-13-14-16-17-g4-fashion-112 --emulate Haswell
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ulsam_deploy.bench.timing import alternate, time_calls  # noqa: E402
from ulsam_deploy.data.stream import batches  # noqa: E402
from ulsam_deploy.runtime.isa import cpu_model, isa_label  # noqa: E402
from ulsam_deploy.runtime.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from ulsam_deploy.store.manifest import Manifest  # noqa: E402
from ulsam_deploy.verify.run import data_source  # noqa: E402

FILES = {"onnx-int8 (7-bit)": "model.int8.onnx", "onnx-int8-vnni (8-bit)": "model.int8.vnni.onnx"}


def logits(path: Path, images: np.ndarray, fused: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 16]})[0] for i in range(0, len(images), 16)])


def first_images(manifest: Manifest, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    images, labels, seen = [], [], 0
    for batch in batches(data_source(manifest, None), 64):
        images.append(batch.images)
        labels.append(batch.labels)
        seen += len(batch.images)
        if seen >= count:
            break
    x = np.concatenate(images)[:count]
    y = None if labels[0] is None else np.concatenate(labels)[:count]
    return np.ascontiguousarray(x, np.float32), y


def emulated(cpu: str, folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    out = folder / f"on-{cpu}"
    out.mkdir()
    run = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, str(ROOT / "scripts/int8-kernels.py"),
                          str(folder), str(out)], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"error: the emulated run failed: {run.stderr.strip().splitlines()[-1][:300]}")
    return json.loads((out / "host.json").read_text()), {p.stem: np.load(p) for p in out.glob("*.npy")}


def cell(out: np.ndarray, ref: np.ndarray, labels, meaning: np.ndarray | None = None) -> str:
    text = f"{100 * (out.argmax(1) == ref.argmax(1)).mean():.2f} %"
    if labels is not None:
        text += f" / acc {100 * (out.argmax(1) == labels).mean():.2f} %"
    if meaning is not None:
        text += f", = meaning {100 * (out.argmax(1) == meaning.argmax(1)).mean():.1f} %"
    return text


def measure(model: Path, work: Path, args) -> None:
    out = work / model.name
    run = subprocess.run([sys.executable, "-m", "ulsam_deploy", "export", "--model", str(model), "--formats",
                          "onnx,onnx-int8,onnx-int8-vnni", "--out", str(out), "--json"], capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr.strip() or f"error: export of {model} failed")
    manifest = Manifest.load(out)
    x, y = first_images(manifest, args.images)
    folder = work / f"{model.name}-run"
    folder.mkdir()
    np.save(folder / "images.npy", x)
    stems = {}
    for label, file in FILES.items():
        stems[label] = Path(file).stem.replace(".", "-")
        shutil.copy(out / file, folder / f"{stems[label]}.onnx")
    reference = logits(out / "model.onnx", x, True)
    far = emulated(args.emulate, folder) if args.emulate else None
    print(f"\n{model.name}: {len(x)} images of {manifest.data.get('dataset')}; fp32 ONNX accuracy "
          + ("-" if y is None else f"{100 * (reference.argmax(1) == y).mean():.2f} %"))
    head = f"| encoding | Q/DQ meaning | fused here ({isa_label()}) |"
    if far:
        head += f" fused on qemu -cpu {args.emulate} ({far[0]['label']}) | = here |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for label, file in FILES.items():
        meaning, here = logits(out / file, x, False), logits(out / file, x, True)
        row = f"| {label} | {cell(meaning, reference, y)} | {cell(here, reference, y, meaning)} |"
        if far:
            there = far[1][stems[label]]
            same = "bit-identical" if np.array_equal(there, here) else f"max diff {np.abs(there - here).max():.3g}"
            row += f" {cell(there, reference, y, meaning)} | {same} |"
        print(row)
    runners = [OnnxRuntimeRunner(out / f, "int8", args.threads) for f in (*FILES.values(), "model.onnx")]
    one = x[:1]
    for runner in runners:
        time_calls(lambda r=runner: r(one), 20)
    samples = alternate([lambda r=r: r(one) for r in runners], 20, args.rounds, reverse=True)
    medians = [statistics.median(t for rnd in samples for t in rnd[i]) for i in range(len(runners))]
    names = [*FILES, "onnx (fp32)"]
    print(f"batch 1, {args.threads} thread(s), {cpu_model()}: " + ", ".join(
        f"{n} p50 {m:.3f} ms ({m / medians[0]:.2f}x)" for n, m in zip(names, medians)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", required=True, help="model folder (repeatable)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--emulate", help="a QEMU x86 CPU model, e.g. Haswell (AVX2, no AVX-512)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.images < 1 or args.threads < 1 or args.rounds < 1:
        parser.error("--images, --threads and --rounds must be positive")
    if args.emulate and shutil.which("qemu-x86_64") is None:
        parser.error("--emulate needs qemu-x86_64 (Debian: apt-get install qemu-user)")
    print(f"this CPU: {cpu_model()} ({isa_label()})")
    with tempfile.TemporaryDirectory(prefix="ulsam-encodings-") as work:
        for model in args.model:
            measure(model, Path(work), args)


if __name__ == "__main__":
    main()
