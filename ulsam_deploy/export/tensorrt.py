"""ONNX -> TensorRT engines: FP16 from a float16 ONNX, INT8 from the calibrated Q/DQ ONNX.

TensorRT >= 10.1 deprecates and 11 removes implicit calibration and the FP16/INT8 builder flags;
TensorRT 11 networks are always strongly typed. So precision lives in the ONNX on both: the INT8
engine is built from the symmetric Q/DQ ONNX (``onnx-int8-trt``: int8 zero points 0, per-channel
weights, TensorRT's explicit quantization) and the FP16 engine from a float16 copy of ``model.onnx``
made here (:mod:`.fp16`, ULSAM's attention path kept float32); each format's ``needs`` names its source.
The network is created STRONGLY_TYPED wherever the flag exists (TensorRT 10; ignored by 11), and the
FP16/INT8 builder flags are set only where they exist and the network is not strongly typed.

An engine is specific to the TensorRT version and GPU architecture that built it: the manifest
records both, and :func:`..runtime.engines.check_engine` refuses an engine from elsewhere before it is deserialized.
A timing cache (``timing.cache`` beside the engines) makes rebuilds on the same GPU fast.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import UlsamError
from ..runtime.engines import environment, require
from ..store.fileio import atomic_path
from . import FORMATS

MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 32, 256     # optimisation profile of the dynamic batch axis
WORKSPACE_BYTES = 1 << 30                        # builder scratch memory limit
TIMING_CACHE = "timing.cache"


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
