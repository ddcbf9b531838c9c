"""ONNX -> TensorRT engines: FP16 from a float16 ONNX, INT8 from the calibrated Q/DQ ONNX.

TensorRT >= 10.1 deprecates and 11 removes implicit calibration and the FP16/INT8 builder flags;
TensorRT 11 networks are always strongly typed. So precision lives in the ONNX on both: the INT8
engine is built from the symmetric Q/DQ ONNX (``onnx-int8-trt``: int8 zero points 0, per-channel
weights, TensorRT's explicit quantization) and the FP16 engine from a float16 copy of ``model.onnx``
made here (:mod:`.fp16`, ULSAM's attention path kept float32); each format's ``needs`` names its source.
The network is created STRONGLY_TYPED wherever the flag exists (TensorRT 10; ignored by 11), and the
FP16/INT8 builder flags are set only where they exist and the network is not strongly typed.

An engine is specific to the TensorRT version and GPU architecture that built it: the manifest
records both, and :func:`check_engine` refuses an engine from elsewhere before it is deserialized.
A timing cache (``timing.cache`` beside the engines) makes rebuilds on the same GPU fast.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from ..errors import BackendUnavailable, StaleArtifactError, UlsamError
from ..fileio import atomic_path
from . import FORMATS

MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 32, 256     # optimisation profile of the dynamic batch axis
WORKSPACE_BYTES = 1 << 30                        # builder scratch memory limit
TIMING_CACHE = "timing.cache"
INSTALL_HINT = ("pip install 'ulsam-deploy[tensorrt]' --extra-index-url https://pypi.nvidia.com, "
                "on a machine with an NVIDIA GPU and driver")


def gpu_info() -> dict | None:
    """``{"gpu", "compute_capability"}`` of CUDA device 0 (torch, else cuda-python); None if none is visible."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    try:   # a CPU build of torch on a GPU machine: ask the CUDA runtime directly
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}"}


def require(what: str = "TensorRT export"):
    """The ``tensorrt`` module, or BackendUnavailable (one line) when it or a CUDA GPU is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable(f"{what} needs TensorRT, which is not installed", INSTALL_HINT)
    if gpu_info() is None:
        raise BackendUnavailable(f"{what} needs an NVIDIA GPU, and no CUDA device is visible",
                                 "check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES")
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:   # e.g. the wheel is there but its CUDA libraries are not
        raise BackendUnavailable(f"{what}: TensorRT is installed but cannot load ({str(exc).splitlines()[0][:160]})",
                                 INSTALL_HINT) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"{what} needs TensorRT 10 or newer, not {trt.__version__}", INSTALL_HINT)
    return trt


def environment() -> dict:
    """What an engine built here is tied to: TensorRT version, GPU name, compute capability."""
    trt = require("TensorRT")
    return {"tensorrt_version": trt.__version__, **gpu_info()}


def engine_mismatch(recorded: dict, current: dict) -> str | None:
    """Why an engine recorded as ``recorded`` cannot run in ``current``; None if it can.

    TensorRT refuses engines from another version, and engines are built for one compute capability;
    another GPU model of the same capability runs them (perhaps with other tactics than the fastest).
    """
    problems = [f"{label} {recorded.get(key)} (here {current.get(key)})"
                for key, label in (("tensorrt_version", "TensorRT"), ("compute_capability", "compute capability"))
                if recorded.get(key) != current.get(key)]
    if not problems:
        return None
    return f"built with {', '.join(problems)} on {recorded.get('gpu', 'an unknown GPU')}"


def check_engine(path: Path) -> None:
    """Refuse ``path`` when its manifest entry names another TensorRT version or GPU architecture."""
    from ..manifest import MANIFEST, Manifest

    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        return      # a bare engine file: TensorRT itself refuses what it cannot run
    entry = next((e for e in Manifest.load(path.parent).artifacts.values() if e.get("file") == path.name), None)
    reason = engine_mismatch(entry, environment()) if entry else None
    if reason:
        raise StaleArtifactError(f"{path.name} was {reason}",
                                 f"delete {path} and re-run `ulsam-deploy export` on this machine")


def produce(name: str, manifest, target: Path, calib) -> dict:
    """Build the engine ``name`` (trt-fp16 or trt-int8) of ``manifest``'s ONNX into ``target``."""
    trt = require(f"format {name}")            # before anything is written
    directory = manifest.directory
    details = environment()
    source = onnx_path = directory / FORMATS[FORMATS[name].needs[0]].filename
    with tempfile.TemporaryDirectory(prefix="ulsam-trt-") as work:
        if FORMATS[name].precision == "fp16":      # the float32 ONNX, made float16 here
            import onnx

            from .fp16 import to_fp16_onnx
            from .quantize import attention_nodes

            onnx_path = Path(work) / "model.fp16.onnx"
            details["fp16_onnx"] = to_fp16_onnx(source, onnx_path, attention_nodes(onnx.load(str(source))))
        details["source"] = source.name
        plan, build = _build(trt, onnx_path, FORMATS[name].precision, manifest.spec.input_size,
                             directory / TIMING_CACHE)
    with atomic_path(target) as tmp:
        tmp.write_bytes(plan)
    return details | build


def _logger(trt):
    class Collecting(trt.ILogger):
        """Keeps TensorRT's errors for the one-line message; everything else stays quiet."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))

    return Collecting()


def _parse(trt, builder, logger, onnx_path: Path):
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UlsamError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors) or 'no error reported'}")
    return network, parser, flag is not None


def _parser_error(error) -> str:
    def field(method: str):
        try:
            return getattr(error, method)()
        except (AttributeError, TypeError):    # node_name/node_operator exist from TensorRT 10 on
            return None

    name, op, index = field("node_name"), field("node_operator"), field("node")
    where = f"node {name}" if name else f"node #{index}" if index not in (None, -1) else "graph"
    return f"{where}{f' ({op})' if op else ''}: {field('desc')}"


def _build(trt, onnx_path: Path, precision: str, input_size: int, cache_path: Path) -> tuple[bytes, dict]:
    """Serialized engine and build details; the timing cache is read from and written back to ``cache_path``."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, parser, strongly_typed = _parse(trt, builder, logger, onnx_path)   # parser owns the weights
    if network.num_inputs != 1:
        raise UlsamError(f"{onnx_path.name} has {network.num_inputs} inputs; the engine expects one image batch")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if not strongly_typed:     # weakly typed TensorRT 10: precision must be enabled by flag
        for flag in (("FP16",) if precision == "fp16" else ("FP16", "INT8")):
            if hasattr(trt.BuilderFlag, flag):
                config.set_flag(getattr(trt.BuilderFlag, flag))
    image = network.get_input(0)
    per_image = tuple(image.shape)[1:]
    if any(d < 0 for d in per_image):    # only the batch axis is meant to be dynamic
        per_image = (3, input_size, input_size)
    shapes = [(batch, *per_image) for batch in (MIN_BATCH, OPT_BATCH, MAX_BATCH)]
    profile = builder.create_optimization_profile()
    profile.set_shape(image.name, *shapes)
    config.add_optimization_profile(profile)
    cache, reused = _attach_timing_cache(config, cache_path)     # must outlive the build
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UlsamError(f"TensorRT could not build an engine from {onnx_path.name}: "
                         f"{'; '.join(logger.errors[-3:]) or 'no error reported'}")
    del parser
    with atomic_path(cache_path) as tmp:
        tmp.write_bytes(bytes(cache.serialize()))
    profile_shapes = dict(zip(("min", "opt", "max"), (list(shape) for shape in shapes)))
    return bytes(plan), {"strongly_typed": strongly_typed, "input": image.name, "profile": profile_shapes,
                         "workspace_bytes": WORKSPACE_BYTES, "timing_cache": cache_path.name,
                         "timing_cache_reused": reused}


def _attach_timing_cache(config, cache_path: Path):
    """(cache, reused): the saved timing cache if it fits this TensorRT and GPU, else a fresh one."""
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, False):
                return cache, True
        except (RuntimeError, TypeError, ValueError):
            pass     # from another TensorRT or GPU, or damaged: start afresh
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache, False
