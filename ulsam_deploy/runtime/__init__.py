"""Artifact consumers: one Runner per backend, opened by name from the manifest; artifact I/O read-back."""

from .base import RUNNERS, Runner, open_artifact, open_entry, run_batched, runner_class, runner_options

__all__ = ["RUNNERS", "Runner", "open_artifact", "open_entry", "run_batched", "runner_class", "runner_options"]


def torch_runner(model, threads: int = 0) -> Runner:
    """An in-memory model run eagerly as it is (what ``bench`` times as the torch row)."""
    from .torch import TorchRunner

    return TorchRunner(model=model, threads=threads)


def reference_runner(model, threads: int = 0) -> Runner:
    """The eager fp32 reference of parity and evaluation: the model with each BatchNorm folded into its
    convolution (the same function, half the kernels; see :func:`~ulsam_deploy.nets.build.fold_batchnorm`),
    each batch cut into ``threads`` slices run side by side on one core each (0: one per usable core)."""
    from .torch import TorchRunner

    return TorchRunner(model=model, threads=threads, fold_bn=True, split=True)
