"""Artifact consumers: one Runner per backend, opened by name from the manifest; artifact I/O read-back."""

from .base import RUNNERS, Runner, open_artifact, open_entry, run_batched, runner_class, runner_options

__all__ = ["RUNNERS", "Runner", "open_artifact", "open_entry", "run_batched", "runner_class", "runner_options"]


def torch_runner(model, threads: int = 0) -> Runner:
    """The eager reference of an in-memory model as a Runner."""
    from .torch import TorchRunner

    return TorchRunner(model=model, threads=threads)
