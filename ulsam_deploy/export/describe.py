"""What a shipped file says about itself: how to feed it, what its outputs mean, which model it is.

A phone app gets one file. Each ``.tflite`` carries TFLite model metadata (the ``TFLITE_METADATA`` entry of
the model's metadata list), which MediaPipe's image classifier and the TFLite Task Library read: image
properties, ``NormalizationOptions`` that map raw 0-255 pixels to the model input, input statistics, and
the class names as a ``TENSOR_AXIS_LABELS`` associated file, packed into the model as the schema prescribes
(a zip archive appended to the flatbuffer; the name in the metadata is the name in the zip). No maintained
writer runs on our stack (tflite-support and mediapipe pin old protobuf / numpy), so the metadata flatbuffer is
built here with the ``flatbuffers`` runtime from the published schema (tflite-support's
``metadata_schema.fbs``, file identifier ``M001``; every field used is of schema version 1.0.0). The model
flatbuffer itself is read and rewritten with LiteRT's own generated schema classes.

ONNX files carry the same facts as ``metadata_props`` (strings; JSON where structured).
Neither touches a weight or an op: the numbers a runtime computes are unchanged (tested bit for bit).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UlsamError
from ..store.fileio import atomic_path

METADATA_NAME = "TFLITE_METADATA"       # the entry name tflite-support, MediaPipe and Android Studio look up
LABELS_FILE = "labels.txt"
PARSER_VERSION = "1.0.0"                # the newest schema member written here is of 1.0.0
ONNX_PREFIX = "ulsam_deploy."

# metadata_schema.fbs enums and union tags
_TENSOR_AXIS_LABELS = 2
_RGB = 1
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2
_NORMALIZATION_OPTIONS = 1


@dataclass(frozen=True)
class ModelFacts:
    """What every artifact of one model states about it."""

    name: str
    spec: dict
    preprocessing: dict
    class_names: tuple[str, ...]
    trained_on: str | None = None       # e.g. "fashion"
    accuracy: str | None = None         # e.g. "test top-1 92.77 % on 10,000 images"
    version: str = ""

    def description(self, artifact: str) -> str:
        spec = self.spec
        where = f"ULSAM at {spec['positions']} (g = {spec['groups']})" if spec.get("positions") else "no ULSAM"
        text = (f"{spec['arch'].upper()} (width {spec['width']:g}) with {where}, {spec['num_classes']} classes, "
                f"{spec['input_size']}x{spec['input_size']} RGB input. Artifact {artifact} of {self.name}.")
        if self.trained_on:
            text += f" Trained on {self.trained_on}" + (f"; {self.accuracy}." if self.accuracy else ".")
        return text

    def sha256(self) -> str:
        import hashlib

        text = json.dumps([self.name, self.spec, self.preprocessing, self.class_names, self.trained_on, self.accuracy,
                           self.version], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def normalisation_255(self) -> tuple[list[float], list[float]]:
        """(mean, std) per channel for raw 0-255 pixels: (x / 255 - m) / s == (x - 255 m) / (255 s)."""
        prep = self.preprocessing
        return [255.0 * m for m in prep["mean"]], [255.0 * s for s in prep["std"]]

    def input_text(self) -> str:
        prep = self.preprocessing
        mean, std = self.normalisation_255()
        crop = prep["crop_fraction"]
        resize = (f"resized ({prep['interpolation']}) to {prep['size']}x{prep['size']}" if crop == 1 else
                  f"shorter side resized ({prep['interpolation']}) to {prep['size']} / {crop:g}, centre crop "
                  f"{prep['size']}x{prep['size']}")
        return (f"RGB image {resize}, then per channel "
                f"(pixel - mean) / std on 0-255 values with mean {_floats(mean)} and std {_floats(std)}.")


def _floats(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


# --- TFLite --------------------------------------------------------------------------------------
def embed_tflite(path: Path, facts: ModelFacts, artifact: str) -> None:
    """Rewrite ``path`` with ``TFLITE_METADATA`` and the labels file (atomically; weights untouched)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as tfl

    data = Path(path).read_bytes()
    model = tfl.ModelT.InitFromPackedBuf(bytearray(data), 0)
    if any(getattr(b, "offset", 0) > 1 for b in model.buffers or []):
        raise UlsamError(f"{Path(path).name} keeps its weights outside the flatbuffer; metadata cannot be added")
    graph = model.subgraphs[0]
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise UlsamError(f"{Path(path).name} has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, "
                         "not the one image in and one vector out of a classifier")
    tensor = graph.tensors[graph.inputs[0]]
    quant = tensor.quantization
    scale = float(quant.scale[0]) if quant is not None and quant.scale is not None and len(quant.scale) else None
    zero = int(quant.zeroPoint[0]) if scale is not None else None
    integer = tensor.type in (tfl.TensorType.INT8, tfl.TensorType.UINT8) and scale is not None
    blob = metadata_flatbuffer(facts, artifact, (scale, zero) if integer else None)

    buffer = tfl.BufferT()
    buffer.data = bytearray(blob)
    entries = [m for m in (model.metadata or []) if m.name not in (METADATA_NAME, METADATA_NAME.encode())]
    model.buffers.append(buffer)
    entry = tfl.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = entries + [entry]
    builder = flatbuffers.Builder(len(data) + len(blob) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    packed = io.BytesIO(bytes(builder.Output()))
    packed.seek(0, io.SEEK_END)
    with zipfile.ZipFile(packed, "a") as archive:           # appended after the flatbuffer, as the schema prescribes
        archive.writestr(LABELS_FILE, labels_text(facts.class_names))
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(packed.getvalue())


def labels_text(names) -> str:
    return "".join(f"{name}\n" for name in names)


def metadata_flatbuffer(facts: ModelFacts, artifact: str, input_quantisation: tuple[float, int] | None) -> bytes:
    """The ``ModelMetadata`` flatbuffer (schema ``metadata_schema.fbs``, identifier ``M001``)."""
    import flatbuffers

    b = flatbuffers.Builder(4096)
    mean, std = facts.normalisation_255()
    low = [(0.0 - m) / s for m, s in zip(mean, std)]
    high = [(255.0 - m) / s for m, s in zip(mean, std)]
    input_text = facts.input_text()
    if input_quantisation is not None:
        scale, zero = input_quantisation
        input_text += (f" The input is int8: q = round(value / {scale:.6g}) {'-' if zero < 0 else '+'} {abs(zero)}, "
                       "clamped to [-128, 127]; "
                       "statistics are of the quantised values.")
        low = [max(-128.0, round(v / scale) + zero) for v in low]
        high = [min(127.0, round(v / scale) + zero) for v in high]
    size = int(facts.preprocessing["size"])

    # leaves first: a flatbuffer table can only point at what is already written
    image_size = _table(b, [(0, "u32", size), (1, "u32", size)])
    image_props = _table(b, [(0, "i8", _RGB), (1, "off", image_size)])
    input_content = _table(b, [(0, "u8", _IMAGE_PROPERTIES), (1, "off", image_props)])
    # one value when the channels agree: the schema spreads it, and MediaPipe reads only that form
    same = len(set(mean)) == 1 and len(set(std)) == 1
    norm = _table(b, [(0, "off", _floats_vector(b, mean[:1] if same else mean)),
                      (1, "off", _floats_vector(b, std[:1] if same else std))])
    unit = _table(b, [(0, "u8", _NORMALIZATION_OPTIONS), (1, "off", norm)])
    stats = _table(b, [(0, "off", _floats_vector(b, high)), (1, "off", _floats_vector(b, low))])
    input_meta = _table(b, [(0, "off", b.CreateString("image")), (1, "off", b.CreateString(input_text)),
                            (3, "off", input_content), (4, "off", _offsets_vector(b, [unit])), (5, "off", stats)])

    labels = _table(b, [(0, "off", b.CreateString(LABELS_FILE)),
                        (1, "off", b.CreateString("Class names, one per line, in the order of the output")),
                        (2, "i8", _TENSOR_AXIS_LABELS)])
    feature = _table(b, [])
    output_content = _table(b, [(0, "u8", _FEATURE_PROPERTIES), (1, "off", feature)])
    output_meta = _table(b, [(0, "off", b.CreateString("logits")),
                             (1, "off", b.CreateString(f"Unnormalised scores of the {len(facts.class_names)} classes "
                                                       "(apply softmax for probabilities)")),
                             (3, "off", output_content), (6, "off", _offsets_vector(b, [labels]))])
    subgraph = _table(b, [(0, "off", b.CreateString(facts.name)),
                          (2, "off", _offsets_vector(b, [input_meta])), (3, "off", _offsets_vector(b, [output_meta]))])
    root = _table(b, [(0, "off", b.CreateString(facts.name)), (1, "off", b.CreateString(facts.description(artifact))),
                      (2, "off", b.CreateString(facts.version)), (3, "off", _offsets_vector(b, [subgraph])),
                      (4, "off", b.CreateString("ulsam-deploy")), (7, "off", b.CreateString(PARSER_VERSION))])
    b.Finish(root, file_identifier=b"M001")
    return bytes(b.Output())


def _table(b, fields) -> int:
    """One table: ``fields`` are (slot, kind, value) with kind off / u8 / i8 / u32."""
    b.StartObject(max((slot for slot, _, _ in fields), default=-1) + 1)
    for slot, kind, value in fields:
        if kind == "off":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "u8":
            b.PrependUint8Slot(slot, value, 0)
        elif kind == "i8":
            b.PrependInt8Slot(slot, value, 0)
        else:
            b.PrependUint32Slot(slot, value, 0)
    return b.EndObject()


def _floats_vector(b, values) -> int:
    b.StartVector(4, len(values), 4)
    for value in reversed(values):
        b.PrependFloat32(float(value))
    return b.EndVector()


def _offsets_vector(b, offsets) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


# --- ONNX ----------------------------------------------------------------------------------------
def onnx_props(facts: ModelFacts, artifact: str) -> dict[str, str]:
    mean, std = facts.normalisation_255()
    return {f"{ONNX_PREFIX}{k}": v for k, v in {
        "model": facts.name, "description": facts.description(artifact), "spec": json.dumps(facts.spec),
        "preprocessing": json.dumps(facts.preprocessing), "labels": json.dumps(list(facts.class_names)),
        "normalization_0_255": json.dumps({"mean": mean, "std": std}), "input": facts.input_text(),
        "version": facts.version}.items()}


def embed_onnx(path: Path, facts: ModelFacts, artifact: str) -> None:
    """Rewrite ``path`` with our ``metadata_props`` (others kept) and a doc string (atomically)."""
    import onnx

    model = onnx.load(str(path))
    props = onnx_props(facts, artifact)
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(ONNX_PREFIX)]
    del model.metadata_props[:]
    for key, value in kept + sorted(props.items()):
        model.metadata_props.add(key=key, value=value)
    model.doc_string = facts.description(artifact)
    with atomic_path(Path(path)) as tmp:
        onnx.save(model, str(tmp))


def embed(backend: str, path: Path, facts: ModelFacts, artifact: str) -> bool:
    """Stamp an artifact of ``backend`` with ``facts``; False for formats without a metadata slot."""
    if backend == "litert":
        embed_tflite(path, facts, artifact)
    elif backend == "onnxruntime":
        embed_onnx(path, facts, artifact)
    else:
        return False
    return True
