"""Time our vectorised ULSAM against the official loop layout in eager mode.

    python -m ulsam_deploy.nets.speed [--channels 512] [--size 14] [--runs 50]

Prints median latency per (batch, g) and the loop/vectorised ratio. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .reference import LoopULSAM
from .ulsam import ULSAM, to_official


def _median_ms(module: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    with torch.inference_mode():
        for _ in range(5):
            module(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter_ns()
            module(x)
            times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--groups", default="1,4,16")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, m={args.channels}, "
          f"{args.size}x{args.size}, median of {args.runs} runs")
    print(f"{'batch':>5} {'g':>4} {'loop ms':>9} {'ours ms':>9} {'ratio':>7}")
    for batch in map(int, args.batches.split(",")):
        for groups in map(int, args.groups.split(",")):
            ours = ULSAM(args.channels, groups).eval()
            loop = LoopULSAM(args.channels, args.channels, args.size, args.size, groups).eval()
            loop.load_state_dict(to_official(ours.state_dict(), {"": groups}))
            x = torch.randn(batch, args.channels, args.size, args.size)
            # interleave the two so that drift in machine load hits both alike
            t_loop, t_ours = [], []
            for _ in range(3):
                t_loop.append(_median_ms(loop, x, args.runs // 3 or 1))
                t_ours.append(_median_ms(ours, x, args.runs // 3 or 1))
            a, b = statistics.median(t_loop), statistics.median(t_ours)
            print(f"{batch:>5} {groups:>4} {a:>9.3f} {b:>9.3f} {a / b:>6.2f}x")


if __name__ == "__main__":
    main()
