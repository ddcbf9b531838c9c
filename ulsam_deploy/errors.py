"""The few exception types the tool raises on purpose.

Each carries a one-line message and, where useful, a hint on what to do. The CLI prints
``error: <message> (<hint>)`` on one line and exits 2; a parity breach exits 1.
"""

from __future__ import annotations


class UlsamError(Exception):
    """A user-facing error: bad input, not a bug."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(printable(text).split())


class SpecError(UlsamError):
    """A model specification (arch, positions, groups, sizes) that cannot be built."""


class InputFileError(UlsamError):
    """A file or folder given by the user is missing, unreadable, corrupt or of the wrong kind."""


class BackendUnavailable(UlsamError):
    """An optional backend is not installed or has no hardware to run on."""


class StaleArtifactError(UlsamError):
    """An artifact or manifest disagrees with what it claims to be built from."""


class RunFailed(UlsamError):
    """A run stopped by something outside its input (a process or a data worker died): exit 1; what is saved stays."""

    exit_code = 1


class Interrupted(UlsamError):
    """Ctrl-C or SIGTERM: one line and exit 130; what is finished stays, a rerun resumes."""

    exit_code = 130


def printable(text: str) -> str:
    """``text`` safe to print and to write as strict UTF-8 JSON.

    A file name that is not UTF-8 (Latin-1 from an old archive) reaches Python with its odd bytes as lone
    surrogates (``surrogateescape``); they are shown as ``\\xe9`` escapes instead of failing the output."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validation_line(exc) -> str:
    """A pydantic ``ValidationError`` as one line: where the first error is, what it is, how many more."""
    first = exc.errors()[0]
    where = ".".join(printable(str(part)) for part in first["loc"]) or "top level"
    text = f"unknown key {where!r}" if first["type"] == "extra_forbidden" else f"{where}: {first['msg']}"
    more = exc.error_count() - 1
    return printable(text)[:300] + (f" (and {more} more)" if more else "")
