"""Expected failures: problems a user can fix, reported as one line `<kind>: <message>`.

Every recipe's main runs under `rlaif_recipes.config.parse`, which turns a `RecipeError` into that
one line on stderr and a non-zero exit, with no traceback (set RLAIF_DEBUG=1, or pass
`rlaif run --debug`, to see it). Anything else is a bug and keeps its traceback. A message names
the file, key or setting at fault and says how to fix it; it never echoes a secret.
"""

import errno
import os
from typing import Optional


class RecipeError(Exception):
    """Base of the expected failures; `kind` prefixes the one-line report."""

    kind = "error"


class ConfigError(RecipeError, ValueError):
    """A setting that cannot work (wrong value, type, key, or a combination that cannot run)."""

    kind = "config error"


class DataError(RecipeError, ValueError):
    """Input data that is missing, empty, malformed or not what the recipe reads."""

    kind = "data error"


class CheckpointError(RecipeError, RuntimeError):
    """A model or training checkpoint that cannot be used (missing, corrupt, incompatible)."""

    kind = "checkpoint error"


class JudgeError(RecipeError, RuntimeError):
    """A judge that cannot be reached or that produced no verdict at all."""

    kind = "judge error"


class OutputError(RecipeError, RuntimeError):
    """An output directory that cannot be written, or that holds another run's output."""

    kind = "output error"


class TrainingError(RecipeError, RuntimeError):
    """A run that would train on nothing, or stopped because it did."""

    kind = "training error"


def debug() -> bool:
    """RLAIF_DEBUG=1: let expected failures raise with their traceback."""
    return os.environ.get("RLAIF_DEBUG", "") not in ("", "0", "false")


def one_line(error: RecipeError) -> str:
    """The report for `error`: its kind and the first line of its message."""
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    return f"{error.kind}: {lines[0] if lines else type(error).__name__}"


def os_error_line(error: OSError, where: str = "a file") -> str:
    """An expected OSError (a missing or read-only path, a full disk) as one line: the path (or
    `where`, when the error names none), the reason and what to do; the traceback adds nothing for these."""
    where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None) or where
    fix = {
        errno.ENOSPC: "free some disk space and run it again",
        errno.EDQUOT: "free some disk space and run it again",
        errno.ENOENT: "check the path",
        errno.EACCES: "fix its permissions or choose another path",
        errno.EPERM: "fix its permissions or choose another path",
        errno.EROFS: "choose a path on a writable file system",
    }.get(error.errno, "check the path")
    return f"{where}: {error.strerror or error}; {fix}"


def disk_full_error(error: BaseException) -> Optional[OSError]:
    """The full-disk (or quota) OSError that is `error` or caused it, or None: torch.save, for one,
    re-raises it as a RuntimeError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None
