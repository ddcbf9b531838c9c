"""A trained model folder: ``model.safetensors`` (spec, data, accuracy and recipe in its metadata) and the
card ``README.md`` (exact command, data, recipe, per-epoch log, time, machine)."""

from __future__ import annotations

import json
from collections import Counter
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from ..nets import MobileNet, save_checkpoint
from ..nets.build import sha256_file
from ..store.fileio import write_text_atomic
from .data import TrainData
from .train import Accuracy, TrainConfig, TrainResult


def checkpoint_extra(data: TrainData, config: TrainConfig, test: Accuracy, origin: str | None = None,
                     teacher: str | None = None) -> dict[str, str]:
    """The metadata a trained checkpoint carries (class names as UTF-8 JSON: a label set in any script)."""
    return {"dataset": data.name, "preprocessing": json.dumps(data.preprocessing.to_dict()),
            "test_top1": f"{test.top1:.2f}", "test_top5": f"{test.top5:.2f}", "test_count": str(test.count),
            "train_config": json.dumps(asdict(config)), "train_recipe": json.dumps(asdict(data.recipe)),
            **({"origin": origin} if origin else {}), **({"teacher": teacher} if teacher else {}),
            **({"class_names": json.dumps(list(data.class_names), ensure_ascii=False)} if data.class_names else {})}


def check_writable(model: MobileNet, data: TrainData, config: TrainConfig, origin: str | None = None,
                   teacher: str | None = None) -> None:
    """Refuse, before the first epoch, a run whose model folder could not be written or read back at its end
    (the metadata of the final checkpoint is validated as a reader would, with placeholder accuracies)."""
    from pydantic import ValidationError

    from ..errors import UlsamError, validation_line
    from ..nets.metadata import FORMAT_TAG, CheckpointMetadata

    extra = checkpoint_extra(data, config, Accuracy(100.0, 100.0, data.evaluation.count), origin, teacher)
    try:
        CheckpointMetadata.model_validate({"format": FORMAT_TAG, "spec": model.spec.to_json(), **extra})
    except ValidationError as exc:
        raise UlsamError(f"the model this run would write could not be read back: its metadata "
                         f"{validation_line(exc)}", "shorten the class folder names (at most 256 characters) or "
                         "use fewer classes (at most 100,000)") from None


def write_model_folder(model: MobileNet, folder: Path, data: TrainData, result: TrainResult, test: Accuracy,
                       command: str, origin: str | None = None, teacher: str | None = None) -> Path:
    """``folder/model.safetensors`` and ``folder/README.md``; returns the checkpoint path."""
    spec, config = model.spec, result.config
    dataset = data.name
    meta = checkpoint_extra(data, config, test, origin, teacher)
    checkpoint = save_checkpoint(model.cpu().to(memory_format=torch.contiguous_format), Path(folder) / "model.safetensors",
                                 extra=meta)
    params = sum(p.numel() for p in model.parameters())
    history = "\n".join(f"| {e.epoch} | {e.loss:.4f} | {e.train_top1:.2f} | "
                        f"{'' if e.test_top1 is None else f'{e.test_top1:.2f}'} | {e.images_per_s:.1f} |"
                        for e in result.history)
    distil = (f"\n\nDistillation: teacher {teacher}, loss (1 - {config.kd_weight:g}) CE + {config.kd_weight:g} T² "
              f"KL at T = {config.kd_temperature:g}; the teacher in eval mode, no gradients, on the same batch."
              if teacher else "")
    if config.qat:
        from .qat import RECIPE

        distil += (f"\n\nQuantisation-aware fine-tuning: {RECIPE}. The per-epoch test top-1 below is the simulated "
                   "INT8 model's; the accuracy above is that of the saved float weights.")
    card = f"""# {Path(folder).name}

{spec.arch.upper()} (width {spec.width:g}) with ULSAM at `{spec.positions or '-'}` (g = {spec.groups}),
{spec.num_classes} classes, {spec.input_size}x{spec.input_size} input, {params:,} parameters.

| | |
|---|---|
| spec | `{spec.to_json()}` |
| data | {dataset} |
| test accuracy | top-1 **{test.top1:.2f} %**, top-5 {test.top5:.2f} % on {data.evaluation_note} |
| training time | {result.seconds:.0f} s, {result.world_size} process(es) on {result.device} ({_machine()}) |
| checkpoint sha256 | `{sha256_file(checkpoint)}` |

Data: {data.description}, normalised with `{json.dumps(data.preprocessing.to_dict())}`.{_data_problems(data, result)}

Initial weights: {origin or 'random (seed ' + str(config.seed) + ')'}.

Training: SGD momentum {config.momentum}, weight decay {config.weight_decay}, lr {config.lr}
with {config.schedule} decay, batch {config.batch_size} per process x {result.world_size}, {config.epochs} epochs,
{data.recipe.describe()}, label smoothing {config.label_smoothing:g}, AMP {config.amp}, seed {config.seed}{_frozen(config)}.{distil}

Produced by:

```bash
{command}
```

| epoch | train loss | train top-1 % | test top-1 % | images/s |
|---|---|---|---|---|
{history}
"""
    write_text_atomic(Path(folder) / "README.md", card)
    return checkpoint


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads != 1 else ''} per process"


def _frozen(config) -> str:
    n = config.freeze_backbone_epochs
    return f"; backbone frozen for the first {n} epoch{'s' if n != 1 else ''}" if n else ""


def _data_problems(data: TrainData, result: TrainResult) -> str:
    """What the run could not use: files the scan skipped (counted by reason), images unreadable mid-run."""
    lines = []
    skipped = data.extra.get("scan_skipped", [])
    if skipped:
        reasons = Counter(_kind(why) for _, why in skipped)
        lines.append(f"Skipped by the scan: {len(skipped)} file(s) - " + ", ".join(f"{n} {why}" for why, n in
                                                                                  reasons.most_common()) + ".")
    total = sum(log.skipped for log in result.history)
    if total:
        listed = "; ".join(f"`{name}`: {why}" for name, why in list(result.unreadable.items())[:10])
        more = f" (and {len(result.unreadable) - 10} more)" if len(result.unreadable) > 10 else ""
        lines.append(f"Unreadable while training: {total} read(s) over the epochs, each replaced by the next readable "
                     f"image - {listed}{more}.")
    return "".join("\n\n" + line for line in lines)


def _kind(why: str) -> str:
    """A skip reason without the file's own name and sizes, so that equal reasons count together."""
    text = why.split(" is ", 1)[-1] if " is " in why else why
    return text.split(": ", 1)[0][:80]
