"""Timing: one place that times things (warm-up, percentiles), the benchmark suite, the machine's peaks."""
