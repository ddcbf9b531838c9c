"""Verification where it runs: ``pack`` (a torch-free parity pack), and the device results ``check`` brings home."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UlsamError
from . import options as o
from .options import Data, Formats

PackImages = Annotated[int, typer.Option("--images", min=1, max=1_000_000,
                                         help="Evaluation images in the pack: the first N of the data.")]
DeviceResult = Annotated[Optional[Path], typer.Option(
    "--device-result", help="A result.json written by a pack's verify.py: recompute its verdicts here, record "
                            "them in the manifest (verified_on).")]
Emulate = Annotated[Optional[str], typer.Option(
    "--emulate", help="Run a pack of the export on an emulated CPU (haswell, nehalem; cortex-a72, cortex-a76, "
                      "neoverse-n2 once `make emulator-arm64` has built their environment; QEMU user mode), one "
                      "thread, and record it as emulated. Default formats: the INT8 ones.")]
EmulateImages = Annotated[Optional[int], typer.Option(
    "--images", min=1, max=1_000_000, help="With --emulate: images to run (default 64).")]


def pack(export_dir: Annotated[Path, typer.Option("--export", "-e", help="The export directory to pack.")],
         out: Annotated[Path, typer.Option("--out", "-o", help="The pack: a folder, or a .zip.")],
         formats: Formats = None, data: Data = None, images: PackImages = 1000, json_out: o.Json = False) -> None:
    """Pack an export's CPU artifacts with inputs, reference logits, thresholds and a verify.py that needs
    only numpy and each artifact's runtime."""
    from ..render import report
    from ..verify.pack import make_pack

    result = make_pack(export_dir, out, _named_formats(formats), data, images)
    report.print_json(result) if json_out else report.console.print(report.pack_table(result))


def _named_formats(formats: str | None) -> list[str] | None:
    """The formats named (groups such as 'cpu' expand), without the ones they are built from."""
    if not formats:
        return None
    from ..export import parse_formats
    from .inspect import _named

    return _named(formats, parse_formats(formats))


def device_check(export_dir: Path | None, device_result: Path | None, emulate: str | None, images: int | None,
                 formats: str | None, data: str | None, threads: int, force: bool, overrides: dict,
                 json_out: bool) -> None:
    """``check --device-result`` / ``check --emulate``: one device's verdicts, recorded; exit 1 on a breach."""
    from ..render import report

    if export_dir is None:
        raise UlsamError(f"{'--device-result' if device_result else '--emulate'} needs --export DIR",
                         "pass the export directory the pack was made from")
    if device_result is not None:
        o.refuse_unused("--device-result carries the device's run", "drop it",
                        **{"--emulate": emulate, "--images": images, "--formats": formats, "--data": data})
    o.refuse_unused("the verifier runs on one thread under emulation, on the device with its own --threads",
                    "drop it", **{"--threads": threads or None, "--force": force or None})
    if device_result is not None:
        from ..verify.device import bring_home

        run = bring_home(export_dir, device_result, overrides)
    else:
        from ..verify.emulate import EMULATE_IMAGES, emulator, not_run_line, run_emulated, split_formats

        emulated = emulator(emulate)          # before a pack is made: refused at once where QEMU cannot run
        named, skipped = split_formats(export_dir, emulated, _named_formats(formats))
        if skipped:
            report.log(f"not run on {emulated.cpu.label} (emulated): {not_run_line(skipped)}")
        with report.progress() as bar:
            bar.add_task(f"verify.py under emulation ({emulate})", total=None)
            run = run_emulated(export_dir, emulate, named, data, EMULATE_IMAGES if images is None else images,
                               overrides)
    report.print_json(run) if json_out else report.console.print(report.device_table(run))
    for r in run.results:
        if not r.passed:
            report.log(f"FAIL {r.artifact} on {run.device}: " + "; ".join(r.breaches))
    if not run.passed:
        raise typer.Exit(1)
