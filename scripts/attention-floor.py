"""What ULSAM itself costs in ONNX Runtime: MV2 + ULSAM against MV2 and against its floor.

The floor is the same network with every ULSAM replaced by an identity - the substitution's layers are gone
and nothing is put in their place - so ULSAM / floor is the latency of the attention blocks alone. The three
models (random weights) are exported as `export` does (ULSAM in its ``spread`` form; INT8 by the same
``quantize_int8``, calibrated on the shipped photos; ``--form broadcast --float-attention`` gives the graphs of
earlier releases) and timed in turn, 20 calls of one model at a time (the
order reversed every other round), batch 1, so drift in machine load hits all three alike; a ratio is the
median over rounds of the two models' median latencies in the round.

    .venv/bin/python scripts/attention-floor.py --positions 13,14,16,17 --input-size 224 --calls 2000
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from ulsam_deploy.bench.timing import time_calls
from ulsam_deploy.data import calibration_set
from ulsam_deploy.export.onnx import export_onnx
from ulsam_deploy.export.quantize import quantize_int8
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets.build import build_model
from ulsam_deploy.nets.ulsam import FORMS, ULSAM, export_form
from ulsam_deploy.runtime import open_artifact

PER_ROUND = 20   # calls of one model in a row: each is timed warm, as `bench` times them


def floor_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ULSAM replaced by ``nn.Identity``."""
    floor = copy.deepcopy(model)
    for name, module in list(floor.named_modules()):
        if isinstance(module, ULSAM):
            parent, _, child = name.rpartition(".")
            setattr(floor.get_submodule(parent) if parent else floor, child, nn.Identity())
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mv2")
    parser.add_argument("--positions", default="13,14,16,17")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--form", default="spread", choices=FORMS,
                        help="ULSAM's export form (broadcast: the eager graph of earlier releases)")
    parser.add_argument("--float-attention", action="store_true",
                        help="INT8 keeps ULSAM's path after its scores in float (the recipe of earlier releases)")
    args = parser.parse_args()

    spec = ModelSpec.parse(args.arch, args.positions, args.groups, input_size=args.input_size)
    ulsam = build_model(spec).eval()
    models = {"base": build_model(spec.vanilla()).eval(), "ULSAM": ulsam, "floor": floor_of(ulsam).eval()}
    calib = calibration_set("photos", spec.input_size).images
    x = np.random.default_rng(0).normal(size=(1, 3, spec.input_size, spec.input_size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="ulsam-floor-") as work:
        files = {}
        for name, model in models.items():
            fp32, int8 = Path(work) / f"{name}.onnx", Path(work) / f"{name}.int8.onnx"
            with export_form(model, args.form):
                export_onnx(model, spec.input_size, fp32)
            quantize_int8(fp32, int8, calib, keep_attention_float=args.float_attention)
            files[name] = {"fp32": fp32, "int8": int8}
        print(f"{spec.name} vs {spec.vanilla().name}, {args.input_size} px, batch 1, {args.threads} threads, "
              f"{args.calls} calls each in rounds of {PER_ROUND}; ULSAM form {args.form}, INT8 attention "
              f"{'float' if args.float_attention else 'INT8'}")
        print("precision  base ms  ULSAM ms  floor ms  ULSAM/base  floor/base  ULSAM/floor")
        for precision in ("fp32", "int8"):
            runners = [open_artifact(files[n][precision], "onnxruntime", precision, args.threads) for n in models]
            for runner in runners:
                time_calls(lambda: runner(x), PER_ROUND)   # warm-up
            rounds = max(1, args.calls // PER_ROUND)
            p50 = np.zeros((rounds, len(runners)))
            for i in range(rounds):
                order = range(len(runners)) if i % 2 == 0 else reversed(range(len(runners)))
                for j in order:
                    p50[i, j] = np.median(time_calls(lambda: runners[j](x), PER_ROUND))
            base, ours, floor = np.median(p50, axis=0)
            ratio = lambda a, b: float(np.median(p50[:, a] / p50[:, b]))   # noqa: E731  per round, then median
            print(f"{precision:9s} {base:8.3f} {ours:9.3f} {floor:9.3f} {ratio(1, 0):11.3f} {ratio(2, 0):11.3f} "
                  f"{ratio(1, 2):12.3f}")
            for runner in runners:
                runner.close()


if __name__ == "__main__":
    main()
