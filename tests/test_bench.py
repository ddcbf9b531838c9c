"""Structure and statistics of the benchmark (no timing is asserted)."""

import json

import numpy as np
import pytest

from ulsam_deploy.bench.timing import LatencyStats, interleaved, measure


class _Sleeper:
    name = "sleeper"

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return np.zeros((len(batch), 10), np.float32)

    def close(self):
        pass


def test_latency_stats_percentiles():
    stats = LatencyStats.from_samples([float(v) for v in range(1, 101)], warmup=3)
    assert stats.p50_ms == pytest.approx(50.5) and stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01) and stats.min_ms == 1.0 and stats.runs == 100
    assert stats.throughput(8) == pytest.approx(8000 / 50.5)
    with pytest.raises(ValueError):
        LatencyStats.from_samples([], 0)


def test_measure_and_interleave_call_counts():
    x = np.zeros((2, 3, 8, 8), np.float32)
    runner = _Sleeper()
    stats = measure(runner, x, warmup=4, runs=20)
    assert runner.calls == 24 and stats.runs == 20
    a, b = _Sleeper(), _Sleeper()
    sa, sb, ratio = interleaved(a, b, x, warmup=2, runs=30, rounds=5)
    assert a.calls == b.calls == 32 and sa.runs == sb.runs == 30 and ratio.rounds == 5
    assert ratio.low <= ratio.median <= ratio.high


def test_bench_cli_rows_ratios_and_plot(cli, tmp_path):
    plot = tmp_path / "b.png"
    code, out, err = cli("bench", "--arch", "mv2", "--positions", "16,17", "--width", "0.5", "--num-classes", "10",
                         "--input-size", "64", "--vs", "mv2", "--backend", "torch,onnxruntime", "--precision", "fp32",
                         "--runs", "6", "--warmup", "1", "--threads", "1", "--batch", "1,2", "--plot", plot, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 * 2 * 2        # 2 models x (torch, onnx) x 2 batches
    for row in rows:
        for key in ("model", "backend", "precision", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput",
                    "size_mb", "macs", "top1_agreement", "vs_ratio", "efficiency"):
            assert key in row
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["threads"] == 1
    first = [r for r in rows if r["model"] == "mv2-w0.5-ulsam-16-17-g4-c10-s64"]
    second = [r for r in rows if r["model"] == "mv2-w0.5-c10-s64"]
    assert len(first) == len(second) == 4 and first[0]["macs"] < second[0]["macs"]
    assert first[0]["vs_ratio"] == pytest.approx(1 / second[0]["vs_ratio"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,needle", [(["--backend", "cuda"], "--backend 'cuda'"),
                                         (["--precision", "int4"], "--precision 'int4'"),
                                         (["--batch", "0"], "--batch"), (["--batch", "1,x"], "--batch"),
                                         (["--backend", "trt"], "TensorRT"), (["--plot", "out.jpg"], "--plot")])
def test_bench_bad_options_one_line(cli, args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("bench", "--arch", "mv2", "--width", "0.5", "--input-size", "32", *args)
    assert code == 2 and err.count("\n") == 1 and needle in err and out == ""
    assert not (tmp_path / "runs").exists() or args[0] != "--backend"


def test_int8_rows_are_measured_against_an_int8_peak():
    from types import SimpleNamespace

    from ulsam_deploy.bench.timing import LatencyStats
    from ulsam_deploy.bench.suite import BenchReport, _row

    report = BenchReport("cpu", 2, peak_gflops=100.0, models=["m"], peak_int8_gops=400.0)
    subject = SimpleNamespace(name="m", params=1, macs=50_000_000)
    stats = LatencyStats.from_samples([1.0] * 5, 0)   # 1 ms: 100 GOP/s achieved
    fp32 = _row(subject, "onnx", "onnxruntime", "fp32", 1.0, stats, 2, 1, report, {})
    int8 = _row(subject, "onnx-int8", "onnxruntime", "int8", 1.0, stats, 2, 1, report, {})
    assert fp32.efficiency == pytest.approx(1.0) and int8.efficiency == pytest.approx(0.25)
    assert _row(subject, "onnx", "onnxruntime", "fp32", 1.0, stats, 2, 1,
                BenchReport("cpu", 2, 0.0, ["m"]), {}).efficiency is None


def test_gemm_peaks_are_measured_per_precision():
    from ulsam_deploy.bench.peak import gemm_peak

    fp32, int8 = gemm_peak(1, repeats=2), gemm_peak(1, int8=True, repeats=2)
    assert fp32 > 0 and int8 > 0


@pytest.mark.slow
def test_bench_reads_an_export_directory_and_writes_no_runs_folder(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "exp"
    code, _, err = cli("export", "--arch", "mv2", "--width", "0.35", "--num-classes", "10", "--input-size", "32",
                       "--formats", "onnx", "--out", out)
    assert code == 0, err
    code, text, err = cli("bench", "--export", out, "--backend", "onnxruntime,torch", "--precision", "fp32",
                          "--runs", "3", "--warmup", "1", "--threads", "1", "--no-parity", "--json")
    assert code == 0, err
    assert {r["artifact"] for r in json.loads(text)} == {"torch", "onnx"}
    assert not (tmp_path / "runs").exists()
    code, text, err = cli("bench", "--export", out, "--backend", "onnxruntime", "--precision", "fp32", "--runs", "4",
                          "--warmup", "1", "--threads", "1", "--no-parity", "--ops", "--json")
    assert code == 0, err
    profile = json.loads(text)["ops"][0]
    assert profile["artifact"] == "onnx" and profile["kernel_ms"] > 0
    by_op = {r["op"]: r for r in profile["rows"]}
    assert by_op["Gemm"]["nodes"] == 1 and sum(r["share"] for r in profile["rows"]) == pytest.approx(100)


def test_kernel_time_by_op_skips_the_warmup_runs():
    from ulsam_deploy.bench.ops import kernel_time_by_op

    events = []
    for run, (conv, relu) in enumerate([(900, 900), (10, 30), (30, 10)]):     # the first run is a warm-up
        t = 1000 * run
        events += [{"name": "model_run", "cat": "Session", "ts": t, "dur": 100},
                   {"name": "c_kernel_time", "cat": "Node", "ts": t + 1, "dur": conv, "args": {"op_name": "Conv"}},
                   {"name": "r_kernel_time", "cat": "Node", "ts": t + 50, "dur": relu, "args": {"op_name": "Relu"}}]
    rows, total = kernel_time_by_op(events, skip_runs=1)
    assert total == pytest.approx(0.04) and [(r.op, r.nodes) for r in rows] == [("Conv", 1), ("Relu", 1)]
    assert rows[0].ms == pytest.approx(0.02) and rows[0].share == pytest.approx(50)


def test_an_export_with_float_layers_is_named_so():
    """Two exports of one model, one with --keep-float, are two subjects of `bench --export A --vs B`."""
    from types import SimpleNamespace

    from ulsam_deploy.bench.suite import Subject

    def subject(keep):
        entry = {"onnx": {}, "onnx-int8": {"keep_float": keep}, "tflite-int8": {"keep_float": keep}}
        return Subject(SimpleNamespace(data={"model": "m"}, artifacts=entry), 1, 1)

    assert subject([]).name == "m"
    assert subject([1, 2, 3, 4]).name == "m (float layers 1,2,3,4)"
