"""ONNX Runtime's fused kernels on the CPU this runs on, meant for an emulated one:

    qemu-x86_64 -cpu Haswell .venv/bin/python scripts/int8-kernels.py IN OUT

numpy and ONNX Runtime only, so that it starts in seconds under emulation.

IN holds ``images.npy`` and ONNX files; for each ``*.onnx`` OUT receives ``<stem>.npy``: the logits of ONNX
Runtime's fused integer kernels on this CPU. ``host.json`` says which CPU the process saw.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ulsam_deploy.runtime import isa  # noqa: E402  (numpy-only module: no torch under emulation)

source, target = Path(sys.argv[1]), Path(sys.argv[2])
(target / "host.json").write_text(json.dumps(isa.host() | {"label": isa.isa_label()}))
images = np.load(source / "images.npy")
for path in sorted(source.glob("*.onnx")):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: images[i:i + 16]})[0] for i in range(0, len(images), 16)]
    np.save(target / f"{path.stem}.npy", np.concatenate(outputs))
