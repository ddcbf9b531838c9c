"""Compile a full-integer TFLite file for an Arm Ethos-U NPU with Vela, and read back where each operator
runs and Vela's performance estimate.

Vela (``ethos-u-vela``, the ``npu`` extra) runs in a process of its own on a scratch folder. It writes the
compiled model (``<name>_vela.tflite``: the NPU's command streams as ``ethos-u`` custom operators, with any
operator the NPU cannot run left as a TFLite operator for the microcontroller's CPU) and a summary CSV, whose
figures are an estimate from Vela's performance model at the configuration's clock, not a measurement.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import extras
from ..errors import UlsamError

# --npu name -> (Vela accelerator, system configuration, memory mode) from Vela's own Arm/vela.ini
NPUS: dict[str, tuple[str, str, str]] = {
    "ethos-u55-128": ("ethos-u55-128", "Ethos_U55_High_End_Embedded", "Shared_Sram"),
    "ethos-u65-256": ("ethos-u65-256", "Ethos_U65_High_End", "Dedicated_Sram"),
    "ethos-u85-256": ("ethos-u85-256", "Ethos_U85_SYS_DRAM_High", "Dedicated_Sram"),
}
DEFAULT_NPU = "ethos-u55-128"
CONFIG = "Arm/vela.ini"
NPU_OP = "ethos-u"     # the custom operator holding one NPU command stream (one segment)


def require() -> None:
    extras.require("ethos-u", "The NPU format (Vela)")


def compiled_name(filename: str) -> str:
    """``model_int8_npu.tflite`` -> ``model_int8_npu_vela.tflite``, as Vela names its output."""
    return filename.removesuffix(".tflite") + "_vela.tflite"


def check_npu(npu: str) -> str:
    name = npu.strip().lower()
    if name not in NPUS:
        raise UlsamError(f"--npu {npu!r} is not a known Ethos-U configuration", f"choose one of {', '.join(NPUS)}")
    return name


def version() -> str:
    from importlib.metadata import version as installed

    return installed("ethos-u-vela")


def compile_model(model: Path, target: Path, npu: str) -> dict:
    """Compile ``model`` for ``npu`` into ``target``; return the manifest's record of it."""
    require()
    accelerator, system, memory = NPUS[npu]
    with tempfile.TemporaryDirectory(prefix="ulsam-vela-") as scratch:
        work = Path(scratch)
        source = work / "model.tflite"
        shutil.copy(model, source)
        command = [sys.executable, "-c", "import sys; from ethosu.vela.vela import main; sys.exit(main())",
                   str(source), "--accelerator-config", accelerator, "--config", CONFIG, "--system-config", system,
                   "--memory-mode", memory, "--output-dir", str(work / "out")]
        proc = subprocess.run(command, cwd=work, capture_output=True, text=True)
        compiled = work / "out" / "model_vela.tflite"
        if proc.returncode != 0 or not compiled.is_file():
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()] or ["no output"]
            raise UlsamError(f"Vela could not compile the model for {npu} (exit {proc.returncode}): {lines[-1][:300]}")
        summary = next((work / "out").glob("*_summary_*.csv"))
        row = next(csv.DictReader(summary.open()))
        placed = operators(compiled)
        shutil.copy(compiled, target)
    counted = {key: int(match.group(1)) for key in ("CPU", "NPU")
               for match in [re.search(rf"^{key} operators = (\d+)", proc.stdout, re.M)] if match}
    clock = float(row["core_clock"])
    return {
        "compiler": f"vela {version()}", "npu": npu, "accelerator": row["accelerator_configuration"],
        "config": CONFIG, "system_config": system, "memory_mode": memory,
        "operators": {"npu": counted.get("NPU"), "cpu": counted.get("CPU"),
                      "segments": placed.count(NPU_OP),
                      "cpu_types": sorted({op for op in placed if op != NPU_OP})},
        "estimate": {"cycles": int(float(row["cycles_total"])), "clock_mhz": clock / 1e6,
                     "inference_ms": float(row["inference_time"]) * 1e3,
                     "sram_kib": float(row["sram_memory_used"]),
                     "flash_kib": float(row["off_chip_flash_memory_used"]) + float(row["on_chip_flash_memory_used"]),
                     "dram_kib": float(row["dram_memory_used"]), "macs": int(float(row["nn_macs"]))},
    }


def operators(path: Path) -> list[str]:
    """The operators of a (compiled) TFLite file's main graph, in order: builtin names, custom codes."""
    from ethosu.vela.tflite.BuiltinOperator import BuiltinOperator
    from ethosu.vela.tflite.Model import Model

    names = {value: key for key, value in vars(BuiltinOperator).items() if not key.startswith("_")}
    model = Model.GetRootAsModel(Path(path).read_bytes(), 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        codes.append(code.CustomCode().decode() if code.CustomCode() else names.get(builtin, str(builtin)))
    graph = model.Subgraphs(0)
    return [codes[graph.Operators(i).OpcodeIndex()] for i in range(graph.OperatorsLength())]
