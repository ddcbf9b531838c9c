"""Probes: an artifact run by its own runtime with the paper-layer tensors made readable.

A probe runs the artifact's own file - the same recipe, the same calibration ranges, the same runtime
settings as its Runner - and returns the final logits with the tapped tensors. It is only a probe of
the artifact if those logits equal the Runner's bit for bit; callers check that on every batch.

* ONNX Runtime: the tapped tensors become graph outputs (the artifact file is otherwise untouched) and
  the session takes the Runner's own session options. On a Q/DQ graph a tap reads the value the next
  layer consumes (the DequantizeLinear output, also where a reshape sits between the tensor and its
  quantisation) where that leaves ONNX Runtime's kernel fusion as it is; where exposing it would change
  the fused graph (and so the numbers), it reads the float tensor before quantisation instead, and says so.
* LiteRT: the Runner's interpreter opened with ``experimental_preserve_all_tensors``; XNNPACK stays on
  (it writes the tensors it computes), INT8 tensors are dequantised with their own scale and zero point.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from ..export.layermap import onnx_consumers, tensor_key, through_reshapes, to_eager_layout
from ..formats import TFLITE_BACKENDS
from ..runtime import open_artifact

POST_Q, PRE_Q, FLOAT = "post-quantisation", "pre-quantisation", "float"


class OnnxProbe:
    def __init__(self, path: Path, precision: str, threads: int, locations: dict[str, dict], sample: np.ndarray,
                 **options):
        import onnx

        self.runner = open_artifact(path, "onnxruntime", precision, threads, **options)
        self.model = onnx.load(str(path))
        graph = self.model.graph
        names = {out for node in graph.node for out in node.output}
        producer = {out: node.op_type for node in graph.node for out in node.output}
        consumers = onnx_consumers(graph)
        self.locations, self.choices = locations, {}
        for key, where in locations.items():
            tensor = where["tensor"]
            quantised = through_reshapes(tensor, consumers)[-1]   # a reshape may sit before the quantisation
            dq = [c.output[0] for q in consumers.get(quantised, []) if q.op_type == "QuantizeLinear"
                  for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]
            # before quantisation only where the quantiser kept the float graph's producer: where it folded
            # a Relu/Clip into the Q/DQ range, the tensor of that name holds the values before the activation
            pre = [(tensor, PRE_Q)] if producer.get(tensor) == where.get("op") else []
            options = [(dq[0], POST_Q)] + pre if dq else [(tensor, FLOAT)]
            self.choices[key] = [o for o in options if o[0] in names or o[0] == graph.input[0].name]
        self.observed = self._settle(sample)

    def _session(self, chosen: dict[str, tuple[str, str]]):
        import onnx
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        present = {o.name for o in probe.graph.output}
        for tensor, _ in chosen.values():
            if tensor not in present:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
                present.add(tensor)
        with tempfile.TemporaryDirectory(prefix="ulsam-probe-") as work:
            file = Path(work) / "probe.onnx"
            onnx.save(probe, str(file))
            return ort.InferenceSession(str(file), self.runner.session.get_session_options(),
                                        providers=["CPUExecutionProvider"])

    def _identical(self, session, sample: np.ndarray, expected: np.ndarray) -> bool:
        return bool(np.array_equal(session.run([self.model.graph.output[0].name],
                                               {self.runner.input: sample})[0], expected))

    def _settle(self, sample: np.ndarray) -> dict[str, str]:
        """Pick, tap by tap, the first reading that leaves the logits identical to the Runner's."""
        expected = self.runner(sample)
        chosen = {key: options[0] for key, options in self.choices.items() if options}
        session = self._session(chosen)
        if not self._identical(session, sample, expected):
            chosen = {}
            for key, options in self.choices.items():
                for option in options:
                    trial = chosen | {key: option}
                    if self._identical(self._session(trial), sample, expected):
                        chosen = trial
                        break
            session = self._session(chosen)
        self.sample = sample
        self._use(session, chosen)
        return {key: how for key, (_, how) in chosen.items()}

    def _use(self, session, chosen: dict[str, tuple[str, str]]) -> None:
        self.session, self.chosen = session, chosen
        self.outputs = [o.name for o in session.get_outputs()]

    def resettle(self, batch: np.ndarray, expected: np.ndarray) -> list[str]:
        """Drop the readings that change the logits on ``batch`` (settling saw no such input); return the
        tap keys dropped. Rare: exposing a tensor can change which kernels ONNX Runtime fuses, and a
        fused kernel rounds differently on a few inputs. A tap keeps its reading or is dropped, so the
        statistics already gathered stay readings of the artifact."""
        rows = (self.session.run([self.model.graph.output[0].name], {self.runner.input: batch})[0]
                != expected).any(axis=1)
        sample = np.concatenate([self.sample, batch[rows]]) if rows.any() else self.sample
        reference = self.runner(sample)
        kept: dict[str, tuple[str, str]] = {}
        for key, option in self.chosen.items():
            trial = kept | {key: option}
            if self._identical(self._session(trial), sample, reference):
                kept = trial
        dropped = [key for key in self.chosen if key not in kept]
        self.sample = sample
        self._use(self._session(kept), kept)
        self.observed = {key: how for key, how in self.observed.items() if key in kept}
        return dropped

    def __call__(self, batch: np.ndarray, shapes: dict[str, tuple]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        values = dict(zip(self.outputs, self.session.run(self.outputs, {self.runner.input: batch})))
        logits = values[self.model.graph.output[0].name]
        taps = {key: to_eager_layout(values[tensor], self.locations[key], shapes[key])
                for key, (tensor, _) in self.chosen.items()}
        return logits, taps

    def close(self) -> None:
        self.runner.close()
        self.session = None


class LiteRTProbe:
    def __init__(self, path: Path, precision: str, threads: int, locations: dict[str, dict]):
        with warnings.catch_warnings():   # LiteRT warns that preserving tensors costs memory: that is the point
            warnings.simplefilter("ignore", UserWarning)
            self.runner = open_artifact(path, "litert", precision, threads, experimental_preserve_all_tensors=True)
        interpreter = self.runner.interpreter
        by_key = {tensor_key(d["name"]): d for d in interpreter.get_tensor_details()}
        missing = [where["tensor"] for where in locations.values() if where["tensor"] not in by_key]
        if missing:
            raise InputFileError(f"{Path(path).name} has no tensor {missing[0]!r} recorded in its manifest",
                                 "re-run `ulsam-deploy export`")
        self.locations = locations
        self.index = {key: by_key[where["tensor"]]["index"] for key, where in locations.items()}
        self.quantisation = {key: by_key[where["tensor"]]["quantization"] for key, where in locations.items()}
        self.observed = {key: POST_Q if by_key[where["tensor"]]["dtype"] != np.float32 else FLOAT
                         for key, where in locations.items()}

    def __call__(self, batch: np.ndarray, shapes: dict[str, tuple]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logits = self.runner(batch)
        interpreter, taps = self.runner.interpreter, {}
        for key, index in self.index.items():
            value = interpreter.get_tensor(index)
            if value.dtype != np.float32:
                scale, zero = self.quantisation[key]
                value = (value.astype(np.float32) - zero) * scale
            taps[key] = to_eager_layout(value, self.locations[key], shapes[key])
        return logits, taps

    def close(self) -> None:
        self.runner.close()


def open_probe(path: Path, backend: str, precision: str, threads: int, locations: dict[str, dict],
               sample: np.ndarray, **options):
    """A probe of the artifact at ``path``; ``sample`` (a batch) settles which readings keep its numbers;
    ``options`` are its runner's (:func:`ulsam_deploy.runtime.runner_options`)."""
    if backend == "onnxruntime":
        return OnnxProbe(path, precision, threads, locations, sample, **options)
    if backend in TFLITE_BACKENDS:   # TFLite Micro keeps no intermediate tensors: LiteRT reads them
        return LiteRTProbe(path, precision, threads, locations)
    raise InputFileError(f"inspect does not probe {backend} artifacts yet", "inspect the ONNX it is built from")
