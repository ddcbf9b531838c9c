"""verify.py of an ulsam-deploy pack: ``python verify.py [--formats F,..] [--threads N] [--images N] --out result.json``

Needs Python >= 3.9, numpy and the runtime of each artifact it runs: onnxruntime (ONNX), ai-edge-litert or
tflite-runtime (TFLite), executorch (.pte); no other part of the tool. It checks every file against ``pack.json``,
runs each artifact image by image (batch 1, as a device runs), compares its logits with the pack's eager
reference, prints a table and writes --out: this machine's identity, statistics, latency and the logits, from which
``ulsam-deploy check --device-result`` recomputes every verdict at home. Exit 0: every artifact within its
thresholds; 1: a breach; 2: bad input (one line, nothing written).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import importlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PACK_FORMAT = "ulsam-deploy-pack/1"
RESULT_FORMAT = "ulsam-deploy-device-result/1"
PROBE_FILE = "probe-matmulinteger.onnx"
PROBE_K, PROBE_A, PROBE_B = 64, 255, 127      # u8 x s8: a 16-bit pair sum (2 x 32385) saturates at 32767
WARMUP = 3
# backend -> (modules tried in order, what to install)
RUNTIMES = {"onnxruntime": (("onnxruntime",), "pip install onnxruntime"),
            "litert": (("ai_edge_litert.interpreter", "tflite_runtime.interpreter"),
                       "pip install ai-edge-litert (or tflite-runtime)"),
            "executorch": (("executorch.runtime",), "pip install executorch")}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class BadInput(Exception):
    """A pack, option or machine this verifier cannot use: one line, exit 2."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_id_of(pack: dict) -> str:
    """The pack's id: sha256 of pack.json's content (every file's sha256 included), the id itself left out."""
    body = {key: value for key, value in pack.items() if key != "pack_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_pack(folder: Path) -> dict:
    """pack.json, after checking its id and the sha256 of every file it lists."""
    path = folder / "pack.json"
    try:
        pack = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path} cannot be read as a pack manifest ({type(exc).__name__}); copy the whole pack again")
    if not isinstance(pack, dict) or pack.get("format") != PACK_FORMAT or not isinstance(pack.get("files"), dict):
        raise BadInput(f"{path} is not an ulsam-deploy pack ({PACK_FORMAT}); copy the whole pack again")
    if pack.get("pack_id") != pack_id_of(pack):
        raise BadInput(f"{path} was edited after the pack was made (its content does not match its pack id); "
                       "copy the whole pack again")
    for name, digest in sorted(pack["files"].items()):
        file = folder / name
        if not _NAME.fullmatch(name) or not isinstance(digest, str):
            raise BadInput(f"{path} lists {name!r}, which is no file of a pack; copy the whole pack again")
        if not file.is_file():
            raise BadInput(f"{name} is missing from the pack in {folder}; copy the whole pack again")
        if sha256_file(file) != digest:
            raise BadInput(f"{name} does not match pack.json (truncated or replaced); copy the whole pack again")
    return pack


# --- runtimes ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_stderr():
    """LiteRT and ExecuTorch print INFO lines to fd 2 as they load; keep this tool's output to its own lines."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_runtime(backend: str, artifact: str):
    modules, install = RUNTIMES[backend]
    for module in modules:
        try:
            with quiet_stderr():
                return importlib.import_module(module)
        except ImportError:
            continue
    raise BadInput(f"{artifact} needs the {backend} runtime, which is not installed here; {install}")


def open_onnxruntime(ort, path: Path, threads: int, graph: str):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    # "qdq": the file's Q/DQ graph as written (no fused integer kernels), as the export recorded
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if graph == "qdq"
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def open_litert(module, path: Path, threads: int, graph: str):
    interpreter = module.Interpreter(model_path=str(path), num_threads=threads or None)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [1] + list(inp["shape"][1:]), strict=False)   # batch 1
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(x):
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))          # NCHW -> NHWC
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if y.dtype != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y
    return run


def open_executorch(module, path: Path, threads: int, graph: str):
    import torch   # ExecuTorch's Python runtime takes and returns torch tensors: it installs torch itself

    if threads:   # the delegate's one process-wide pool, resized before a program is loaded
        from executorch.extension.pybindings import portable_lib
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
    method = module.Runtime.get().load_program(path).load_method("forward")
    return lambda x: method.execute([torch.from_numpy(np.array(x))])[0].numpy()


OPENERS = {"onnxruntime": open_onnxruntime, "litert": open_litert, "executorch": open_executorch}


def runtime_version(module) -> str:
    top = sys.modules.get(module.__name__.split(".")[0])
    return str(getattr(top, "__version__", "") or "unknown")


# --- what one artifact did ----------------------------------------------------------------------------
def run_artifact(opener, module, path: Path, threads: int, graph: str, images: np.ndarray):
    """(logits (N, classes) float32, per-image latency in ms), image by image after a short warm-up."""
    try:
        with quiet_stderr():
            run = opener(module, path, threads, graph)
            first = np.ascontiguousarray(images[:1], np.float32)
            for _ in range(WARMUP):
                run(first)
        outputs, latency = [], []
        for i in range(len(images)):
            x = np.ascontiguousarray(images[i:i + 1], np.float32)
            start = time.perf_counter_ns()
            y = run(x)
            latency.append((time.perf_counter_ns() - start) / 1e6)
            outputs.append(np.asarray(y, np.float32).reshape(1, -1))
    except Exception as exc:   # each runtime raises its own types; the message is what matters
        text = " ".join(str(exc).split())[:200]
        raise BadInput(f"{module.__name__} cannot run {path.name}: {type(exc).__name__}: {text}")
    return np.concatenate(outputs), np.asarray(latency)


def statistics(logits: np.ndarray, reference: np.ndarray, labels) -> dict:
    """Agreement and error of ``logits`` against ``reference``: the statistics ``ulsam-deploy check`` reports
    (agreement and accuracy in percent and points; a non-finite row agrees on nothing)."""
    out, ref = logits.astype(np.float64), reference.astype(np.float64)
    k = min(5, ref.shape[1])
    top_ref, top_out = np.argsort(-ref, axis=1)[:, :k], np.argsort(-out, axis=1)[:, :k]
    out_ok, ref_ok = np.isfinite(out).all(1), np.isfinite(ref).all(1)
    valid, n = out_ok & ref_ok, len(out)
    diff = np.abs(out - ref)
    norm_a, norm_b = np.linalg.norm(out, axis=1), np.linalg.norm(ref, axis=1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        cosine = (out * ref).sum(1) / (norm_a * norm_b)
    zero_a, zero_b = norm_a == 0, norm_b == 0
    cosine = np.where(zero_a | zero_b, np.where(zero_a & zero_b, 1.0, 0.0), cosine)
    cosine = np.where(valid, cosine, np.nan)
    stats = {"count": n, "top1_agreement": float(((top_ref[:, 0] == top_out[:, 0]) & valid).sum() / n * 100),
             "top5_agreement": float(((np.sort(top_ref, 1) == np.sort(top_out, 1)).all(1) & valid).sum() / n * 100),
             "cosine_mean": float(cosine.sum() / n), "cosine_min": float(cosine.min()), "max_abs": float(diff.max()),
             "mean_abs": float(diff.sum() / diff.size), "logit_range": float(ref.max() - ref.min()),
             "nonfinite": int((~out_ok).sum()), "reference_nonfinite": int((~ref_ok).sum())}
    if labels is not None:
        acc = float(((top_out[:, 0] == labels) & out_ok).sum() / n * 100)
        ref_acc = float(((top_ref[:, 0] == labels) & ref_ok).sum() / n * 100)
        stats.update(accuracy=acc, reference_accuracy=ref_acc, accuracy_delta=acc - ref_acc)
    return stats


def breaches(stats: dict, limits: dict) -> list:
    """Each threshold of ``limits`` that ``stats`` breaks, named with its value, as check names them (a NaN
    compares false with every threshold, so non-finite logits fail on their own)."""
    out, n, get = [], stats["count"], limits.get
    if stats["nonfinite"]:
        out.append(f"non-finite logits (NaN or infinity) in {stats['nonfinite']} of {n} samples")
    if stats["reference_nonfinite"]:
        out.append(f"the eager reference gives non-finite logits in {stats['reference_nonfinite']} of {n} samples")
    span = max(stats["logit_range"], 1.0)   # as check: a range under 1 counts as 1
    if get("max_abs") is not None and stats["max_abs"] > get("max_abs"):
        out.append(f"max_abs {stats['max_abs']:.3g} > {get('max_abs'):g}")
    if get("max_abs_rel") is not None and stats["max_abs"] > get("max_abs_rel") * span:
        out.append(f"max_abs/logit_range {stats['max_abs'] / span:.3g} > {get('max_abs_rel'):g}")
    if get("min_top1_agreement") is not None and stats["top1_agreement"] < get("min_top1_agreement"):
        out.append(f"top1_agreement {stats['top1_agreement']:.2f}% < {get('min_top1_agreement'):g}%")
    if get("min_cosine") is not None and stats["cosine_min"] < get("min_cosine"):
        out.append(f"cosine_min {stats['cosine_min']:.5f} < {get('min_cosine'):g}")
    delta = stats.get("accuracy_delta")
    if get("min_accuracy_delta") is not None and delta is not None and delta < get("min_accuracy_delta"):
        out.append(f"accuracy_delta {delta:+.2f} points < {get('min_accuracy_delta'):+g}")
    return out


def probe_int8(folder: Path) -> dict:
    """One MatMulInteger node, u8 255 x s8 127 over K=64: exact (2,072,640) where ONNX Runtime's integer kernels
    accumulate in 32 bits, less where they add two products in a saturating 16-bit lane (x86 AVX2 without VNNI)."""
    expected = PROBE_K * PROBE_A * PROBE_B
    probe = {"op": "MatMulInteger", "a_u8": PROBE_A, "b_s8": PROBE_B, "k": PROBE_K, "expected": expected}
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = 1, 3
        session = ort.InferenceSession(str(folder / PROBE_FILE), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"a": np.full((4, PROBE_K), PROBE_A, np.uint8),
                                 "b": np.full((PROBE_K, 16), PROBE_B, np.int8)})[0]
    except ImportError:
        return probe | {"skipped": "onnxruntime is not installed"}
    except Exception as exc:   # ONNX Runtime's own error types
        return probe | {"skipped": f"onnxruntime failed: {' '.join(str(exc).split())[:160]}"}
    return probe | {"got": int(got.min()), "saturates": bool((got != expected).any())}


# --- this machine ---------------------------------------------------------------------------------
def device_identity() -> dict:
    """OS, machine, CPU model and flags (/proc/cpuinfo where there is one), the features this process's CPU
    reports (CPUID, as numpy dispatches: an emulated CPU shows here, not in /proc/cpuinfo), cores, Python."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and cpu in (platform.processor(), platform.machine()):
                cpu = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = sorted(set(value.split()))
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:   # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return {"system": platform.system(), "release": platform.release(), "platform": platform.platform(),
            "machine": platform.machine(), "node": platform.node(), "cpu": cpu or "unknown", "cpu_flags": flags,
            "cpu_features": sorted(name for name, on in __cpu_features__.items() if on),
            "cores": os.cpu_count() or 0, "python": platform.python_version(), "numpy": np.__version__}


def encode(logits: np.ndarray) -> dict:
    raw = np.ascontiguousarray(logits, "<f4").tobytes()
    return {"dtype": "float32", "shape": list(logits.shape), "sha256": hashlib.sha256(raw).hexdigest(),
            "base64": base64.b64encode(raw).decode("ascii")}


def jsonable(value):
    """Strict JSON: a non-finite number becomes "NaN", "Infinity" or "-Infinity" (it must show, not vanish)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return "NaN" if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


# --- the command ------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(f"{message}; see python verify.py --help")


def options(argv):
    parser = Parser(prog="verify.py", description="Check this pack's artifacts on this machine.")
    parser.add_argument("--formats", help="comma list of the pack's formats (default: all of them)")
    parser.add_argument("--threads", type=int, default=0, help="runtime threads (0: the runtime's default)")
    parser.add_argument("--images", type=int, help="the first N images of the pack (default: all)")
    parser.add_argument("--out", type=Path, default=Path("result.json"), help="the result to bring home")
    parser.add_argument("--pack", type=Path, default=Path(__file__).resolve().parent, help=argparse.SUPPRESS)
    parser.add_argument("--emulated-cpu", help=argparse.SUPPRESS)     # set by `ulsam-deploy check --emulate`
    args = parser.parse_args(argv)
    if args.threads < 0 or (args.images is not None and args.images < 1):
        raise BadInput("--threads must be >= 0 and --images >= 1")
    return args


def open_out(out: Path):
    """A temporary file beside ``out``, made now so an unwritable --out fails before anything runs."""
    if out.is_dir():
        raise BadInput(f"--out {out} is a folder; name a file such as result.json")
    try:
        handle = tempfile.NamedTemporaryFile("w", dir=out.resolve().parent, prefix=f".{out.name}.", delete=False)
    except OSError as exc:
        raise BadInput(f"--out {out} cannot be written ({exc.strerror or exc}); choose a writable path")
    return handle


def chosen(pack: dict, text) -> list:
    names = list(pack["artifacts"])
    if not text:
        return names
    asked = [t.strip().lower() for t in text.split(",") if t.strip()]
    for name in asked:
        if name not in names:
            raise BadInput(f"format {name!r} is not in this pack; it holds {', '.join(names)}")
    return list(dict.fromkeys(asked))


def verify(args) -> int:
    folder = args.pack
    pack = load_pack(folder)
    names = chosen(pack, args.formats)
    modules = {name: import_runtime(pack["artifacts"][name]["backend"], name) for name in names}
    try:
        images, reference = (np.load(folder / pack[key]["file"], "r", False) for key in ("inputs", "reference"))
        labels = np.load(folder / pack["labels"]["file"], "r", False) if pack.get("labels") else None
    except (OSError, ValueError) as exc:
        raise BadInput(f"an array of the pack cannot be read ({str(exc)[:120]}); copy the whole pack again")
    count = len(images) if args.images is None else args.images
    if count > len(images):
        raise BadInput(f"--images {count}: the pack holds {len(images)} images")
    handle = open_out(args.out)
    try:
        result = {"format": RESULT_FORMAT, "pack_id": pack["pack_id"], "model": pack["model"],
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": device_identity() | {"emulated_cpu": args.emulated_cpu},
                  "threads": args.threads, "images": count, "probe": probe_int8(folder), "artifacts": {}}
        for name in names:
            entry = pack["artifacts"][name]
            logits, latency = run_artifact(OPENERS[entry["backend"]], modules[name], folder / entry["file"],
                                           args.threads, entry.get("graph", "fused"), images[:count])
            stats = statistics(logits, reference[:count], None if labels is None else labels[:count])
            broken = breaches(stats, entry["thresholds"])
            result["artifacts"][name] = {
                "file": entry["file"], "sha256": entry["sha256"], "backend": entry["backend"],
                "precision": entry["precision"], "runtime": f"{modules[name].__name__} {runtime_version(modules[name])}",
                "statistics": stats, "passed": not broken, "breaches": broken,
                "latency_ms": {"p50": float(np.percentile(latency, 50)), "p90": float(np.percentile(latency, 90)),
                               "mean": float(latency.mean()), "runs": len(latency)},
                "outputs": encode(logits)}
        json.dump(jsonable(result), handle, indent=1, allow_nan=False)
        handle.close()
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)      # a temporary file is private; the result is not
        os.replace(handle.name, args.out)
    finally:
        handle.close()
        if os.path.exists(handle.name):
            os.unlink(handle.name)
    print_table(result, pack)
    return 0 if all(a["passed"] for a in result["artifacts"].values()) else 1


def print_table(result: dict, pack: dict) -> None:
    device = result["device"]
    cpu = f"{device['emulated_cpu']} (emulated)" if device.get("emulated_cpu") else device["cpu"]
    print(f"{pack['model']} on {cpu} ({device['machine']}, {device['cores']} cores), pack "
          f"{result['pack_id'][:12]}, {result['images']} images of {pack['data']['name']}, batch 1")
    head = ("artifact", "precision", "top-1 agr %", "top-5 agr %", "acc delta", "cos min", "max abs", "mean abs",
            "p50 ms", "p90 ms", "status")
    rows = [(name, a["precision"], *(f"{a['statistics'][k]:{f}}" if a["statistics"].get(k) is not None else "-"
                                     for k, f in (("top1_agreement", ".2f"), ("top5_agreement", ".2f"),
                                                  ("accuracy_delta", "+.2f"), ("cosine_min", ".6f"),
                                                  ("max_abs", ".2e"), ("mean_abs", ".2e"))),
             f"{a['latency_ms']['p50']:.3f}", f"{a['latency_ms']['p90']:.3f}",
             "pass" if a["passed"] else "FAIL: " + "; ".join(a["breaches"])) for name, a in result["artifacts"].items()]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(str(c).ljust(w) if i in (0, 1, 10) else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    probe = result["probe"]
    print("int8 probe (MatMulInteger u8 255 x s8 127, K 64): " + (
        probe["skipped"] if "skipped" in probe else
        f"{'SATURATES' if probe['saturates'] else 'exact'} ({probe['got']:,} of {probe['expected']:,})"))


def main(argv=None) -> int:
    try:
        return verify(options(sys.argv[1:] if argv is None else argv))
    except BadInput as exc:
        message = str(exc)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:   # never a traceback on a device: one line that can be reported
        message = f"verify.py failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
