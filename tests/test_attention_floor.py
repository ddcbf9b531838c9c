"""scripts/attention-floor.py: the floor it times is MV2 + ULSAM with each ULSAM an identity, in every runtime."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets.build import build_model
from ulsam_deploy.nets.ulsam import ULSAM

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "attention-floor.py"


def _script():
    module_spec = importlib.util.spec_from_file_location("attention_floor", SCRIPT)
    script = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(script)
    return script


def test_floor_removes_only_the_ulsams():
    """The floor: the same network, each ULSAM an identity, the model itself untouched."""
    model = build_model(ModelSpec.parse("mv2", "13,14,16,17", 4, num_classes=10, input_size=64)).eval()
    floor = _script().floor_of(model).eval()
    assert sum(isinstance(m, ULSAM) for m in model.modules()) == 4
    assert not any(isinstance(m, ULSAM) for m in floor.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ULSAM):
                module.forward = lambda t: t          # the floor by hand: ULSAM passes x through
        assert torch.equal(floor(x), model(x))


@pytest.mark.parametrize("args, says", [
    (["--backend", "litert", "--form", "broadcast"], "--form and --float-attention choose ONNX Runtime's graphs"),
    (["--backend", "executorch,onnxruntime", "--float-attention"], "--form and --float-attention"),
    (["--backend", "tensorrt"], "unknown --backend 'tensorrt'"),
    (["--positions", "99"], "mv2 has no layer 99"),
    (["--positions", "none"], "places no ULSAM"),
    (["--calls", "0"], "--calls and --threads must be at least 1"),
    (["--precision", "fp16"], "--precision 'fp16': choose fp32, int8 or fp32,int8"),
    (["--groups", "x"], "invalid int value"),
    (["--keep", "."], "name a new folder"),
    (["--keep", "/proc/floor-kept"], "kernel pseudo-file system"),
    (["--keep", "/sys/floor-kept"], "kernel pseudo-file system"),
    (["--input-size", "2048"], "over the 4 GiB limit"),
])
def test_refuses_what_it_cannot_time_in_one_line(args, says, tmp_path, capsys):
    """Bad arguments: one line on stderr, exit 2, before anything is exported."""
    with pytest.raises(SystemExit) as exited:
        _script().main([*args, *([] if "--keep" in args else ["--keep", str(tmp_path / "kept")])])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not (tmp_path / "kept").exists()


@pytest.mark.slow
def test_pipeline_floor_artifacts_compute_the_floor(tmp_path):
    """ExecuTorch through the export pipeline: the floor's program computes MV2 + ULSAM with every ULSAM an
    identity, the ULSAM model's program the model itself (same seed-0 weights), and the base program MV2."""
    from ulsam_deploy.runtime import open_artifact

    kept = tmp_path / "kept"
    done = subprocess.run([sys.executable, str(SCRIPT), "--backend", "executorch", "--input-size", "32", "--calls",
                           "20", "--precision", "fp32", "--keep", str(kept)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "executorch   fp32" in done.stdout and "executorch   int8" not in done.stdout
    assert not list(kept.glob("*/model_int8.pte"))                        # only what --precision asked for
    spec = ModelSpec.parse("mv2", "13,14,16,17", 4, input_size=32)
    ulsam = build_model(spec, seed=0).eval()
    eager = {"ULSAM": ulsam, "floor": _script().floor_of(ulsam).eval(), "base": build_model(spec.vanilla(), seed=0)}
    x = np.random.default_rng(1).normal(size=(1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = {name: model.eval()(torch.from_numpy(x)).numpy() for name, model in eager.items()}
    for name in eager:
        runner = open_artifact(kept / f"executorch-{name}" / "model_fp32.pte", "executorch", "fp32", 1)
        try:
            got = runner(x)
        finally:
            runner.close()
        # random-init logits are tiny (~1e-10): errors are relative to each model's own scale
        for other, logits in want.items():
            error = np.abs(got - logits).max() / np.abs(logits).max()
            assert error <= 1e-3 if other == name else error > 0.1, (name, other, error)
