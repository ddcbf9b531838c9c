"""The ``ulsam-deploy`` command line: parse options, call the library, render the result."""

from __future__ import annotations

import os
import signal
import sys

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, TyperException

from .errors import Interrupted, UlsamError, printable
from .training.lifetime import LAUNCHER_ENV, report_failure


class OneLineErrors(TyperGroup):
    """Usage errors and UlsamErrors become one line on stderr and exit 2; no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        self.argv = [str(a) for a in (sys.argv[1:] if args is None else args)]   # what `train --nproc` relaunches
        _terminate_like_interrupt()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UlsamError as exc:
            _fail(exc.one_line(), exc.exit_code)
        except TyperException as exc:  # usage errors: bad option values, unknown options
            _fail(exc.format_message(), exc.exit_code)
        except (Abort, KeyboardInterrupt):   # Ctrl-C, or SIGTERM (see below), while the options are parsed
            _fail(INTERRUPTED, 130)
        _exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        # Typer turns a KeyboardInterrupt escaping a command into a silent exit 130; name it first, so that
        # check, evaluate, parity, inspect and bench say what happened as export does.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted(INTERRUPTED) from None


INTERRUPTED = "interrupted; nothing is left half-written (finished artifacts are kept, re-run the command to resume)"


def _terminate_like_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary files and converter scratch folders are cleaned up."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:   # not the main thread (embedded use): leave signal handling to the host
        pass


def _fail(message: str, code: int) -> None:
    if os.environ.get(LAUNCHER_ENV):   # a process of `train --nproc`: its launcher prints the first line
        if report_failure(' '.join(printable(str(message)).split()), code):
            _exit(code)
    print(f"error: {' '.join(printable(str(message)).split())}", file=sys.stderr)
    _exit(code)


def _exit(code: int) -> None:
    """Exit; a SIGTERM arriving now (torchrun stopping the other processes) ends the process without unwinding
    the interpreter's exit handlers into a traceback."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:   # not the main thread
        pass
    sys.exit(code)


app = typer.Typer(cls=OneLineErrors, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Build, profile, export, verify and benchmark MobileNet-V1/V2 with ULSAM.")


from .commands import bench, deploy, inspect, model, pack, train

for command in (model.profile, model.build, train.train, model.evaluate, deploy.export, deploy.parity, deploy.check,
                pack.pack, inspect.inspect, bench.bench):
    app.command()(command)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
