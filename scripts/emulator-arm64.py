"""Build the ARM64 emulation environment of ``ulsam-deploy check --emulate cortex-a76`` (``make emulator-arm64``):

    .venv/bin/python scripts/emulator-arm64.py [--dir DIR] [--force]

Fetches trixie's static qemu-aarch64, bookworm's arm64 Python 3.11 with its libraries, and the aarch64 wheels of
the numpy, ONNX Runtime and LiteRT versions installed here (about 250 MB), into DIR (default
``$ULSAM_DEPLOY_ARM64_ENV``, else ``~/.cache/ulsam-deploy/arm64``). A second run with the same versions does
nothing. Exit 0 when built, 2 with one line saying why not.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ulsam_deploy.errors import UlsamError  # noqa: E402
from ulsam_deploy.verify import arm64_env  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to build it (default: %(default)s)",
                        default=arm64_env.env_dir())
    parser.add_argument("--force", action="store_true", help="build again even when one of the same versions is there")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        arm64_env.build(args.dir, lambda line: print(line, flush=True), args.force)
    except UlsamError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    print(f"ARM64 emulation environment ready in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
