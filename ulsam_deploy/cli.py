"""The ``ulsam-deploy`` command line: parse options, call the library, render the result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, TyperException

from . import options as o
from .errors import UlsamError


class OneLineErrors(TyperGroup):
    """Usage errors and UlsamErrors become one line on stderr and exit 2; no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UlsamError as exc:
            _fail(exc.one_line(), exc.exit_code)
        except TyperException as exc:  # usage errors: bad option values, unknown options
            _fail(exc.format_message(), exc.exit_code)
        except Abort:
            _fail("aborted", 130)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


app = typer.Typer(cls=OneLineErrors, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Build, profile, export, verify and benchmark MobileNet-V1/V2 with ULSAM.")


@app.command()
def profile(arch: o.Arch = None, positions: o.Positions = None, groups: o.Groups = None, width: o.Width = None,
            num_classes: o.NumClasses = None, input_size: o.InputSize = None, model: o.ModelPath = None,
            paper: Annotated[bool, typer.Option("--paper", help="Compare with every number of the paper's tables.")] = False,
            json_out: o.Json = False) -> None:
    """Per-layer params and MACs: the direct count and the paper's convention."""
    from . import report
    from .profile import paper_comparison, profile as run_profile

    if paper:
        checks = paper_comparison()
        report.print_json(checks) if json_out else report.console.print(report.paper_table(checks))
        return
    spec = o.spec_for_model(model, arch, positions, groups, width, num_classes, input_size)
    result = run_profile(spec)
    report.print_json(result) if json_out else report.console.print(report.profile_table(result))


@app.command()
def build(out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .safetensors checkpoint.")],
          arch: o.Arch = None, positions: o.Positions = None, groups: o.Groups = None, width: o.Width = None,
          num_classes: o.NumClasses = None, input_size: o.InputSize = None,
          from_checkpoint: Annotated[Optional[Path], typer.Option(
              "--from", help="Convert this checkpoint (.pth/.pt, official SubSpace layout accepted).")] = None,
          seed: Annotated[int, typer.Option(help="Seed for random initialisation.")] = 0,
          json_out: o.Json = False) -> None:
    """Write a safetensors checkpoint of a spec: randomly initialised, or converted from another checkpoint."""
    from . import report
    from .errors import InputFileError
    from .nets.build import build_model, load_model, save_checkpoint, sha256_file

    if out.suffix != ".safetensors":
        raise InputFileError(f"--out {out} must end in .safetensors")
    if out.is_dir():
        raise InputFileError(f"--out {out} is a folder", "name a .safetensors file")
    spec = o.spec_from_options(arch, positions, groups, width, num_classes, input_size)
    model = load_model(from_checkpoint, spec) if from_checkpoint else build_model(spec, seed=seed)
    save_checkpoint(model, out)
    summary = {"path": str(out), "spec": spec.to_dict(), "name": spec.name, "sha256": sha256_file(out),
               "params": sum(p.numel() for p in model.parameters())}
    if json_out:
        report.print_json(summary)
    else:
        report.console.print(f"wrote {out} ({spec.name}, {summary['params']:,} params)")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
