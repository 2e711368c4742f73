"""Error types shared by every layer (a leaf module: it imports nothing from disc_pl).

Every error caused by the user's input (config values, data on disk, model files, output
paths) derives from :class:`UserError`, so an entry point can print its one-line message and
exit with status 2 instead of a traceback. Anything else is an internal error and keeps its
traceback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


class UserError(Exception):
    """Marker base: the message names the problem and the fix; no traceback needed."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:  # pickles as the module-level singleton (sweep launchers pickle errors)
        return self.name


MISSING = _Sentinel("MISSING")  # a mandatory value (???) that was never set
ABSENT = _Sentinel("ABSENT")    # a key that does not exist (nothing to check)


def show(value: Any) -> str:
    """A value as the user would write it on the command line (yaml spelling)."""
    if value is MISSING:
        return "???"
    if value is ABSENT:
        return "<absent>"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


@dataclass(frozen=True)
class Problem:
    key: str        # dotted config key, e.g. "query.count"
    value: Any      # the offending value (MISSING: ??? never set; ABSENT: no such key)
    allowed: str    # what would be accepted, and how to fix it

    def __str__(self) -> str:
        return f"{self.key}={show(self.value)}: {self.allowed}"


class ConfigError(UserError, ValueError):
    """The config cannot work. ``problems`` lists each bad key, its value and what is allowed;
    ``key`` / ``value`` / ``allowed`` are those of the first problem."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        first = self.problems[0]
        self.key, self.value, self.allowed = first.key, first.value, first.allowed
        if len(self.problems) == 1:
            text = f"invalid config: {first}"
        else:
            text = f"invalid config ({len(self.problems)} problems):\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)

    @classmethod
    def one(cls, key: str, value: Any, allowed: str) -> "ConfigError":
        return cls([Problem(key, value, allowed)])

    def __reduce__(self):
        return type(self), (self.problems,)


def is_number(value: Any, low: float | None = None, low_open: bool = False) -> bool:
    """A finite real number (not a bool), optionally ``>= low`` (``> low`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        return False
    return low is None or (value > low if low_open else value >= low)


def is_integer(value: Any, low: int | None = None) -> bool:
    """An int (not a bool), optionally ``>= low``."""
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def require(prefix: str, checks: Sequence[tuple[str, Any, bool, str]]) -> None:
    """One :class:`ConfigError` for every failed ``(key, value, ok, allowed)`` of a config part
    (keys under ``prefix``, e.g. ``localize``); nothing when all are ok. A part's constructor
    validates its own options with it."""
    problems = [Problem(f"{prefix}.{key}", value, allowed) for key, value, ok, allowed in checks if not ok]
    if problems:
        raise ConfigError(problems)


class DatasetError(UserError, ValueError):
    """The data on disk is not usable (empty class folder, unreadable image, malformed file)."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset root or an expected file is missing. The message says what was expected where."""


class CorruptImageError(DatasetError):
    """An image file cannot be decoded. The message names the file."""


class ResultsWriteError(UserError, OSError):
    """A results file could not be written (disk full, no permission, ...). The message names
    the file and its directory; finished batches stay in ``parts/`` and a rerun resumes."""


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint holds pickled objects other than tensors and plain values: not loaded."""


class UsageError(UserError, ValueError):
    """A command-line argument or input path of a tool (report, bench) cannot be used."""
