"""``disc-pl run|train|evaluate|report|bench`` — one front door, and the error boundary of
every entry point.

:func:`guard` is what each entry point's ``main`` goes through (``python -m disc_pl.run`` and
``disc-pl run`` alike). An error the user caused — a :class:`~disc_pl.errors.UserError` (bad
config value, unusable data, model file, output path) or one of Hydra's own composition errors
(unknown group option, unknown key without ``+``, bad override syntax) — prints one message and
exits with status 2, without a traceback. ``HYDRA_FULL_ERROR=1`` or the override
``debug=true`` shows the full traceback instead; any other (internal) error keeps its traceback.

Hydra's ``@hydra.main`` catches exceptions itself and prints a trimmed traceback; setting
``HYDRA_FULL_ERROR=1`` for the duration of the call makes it re-raise them (also the first
failed job of a multirun, after the sweep), so they reach :func:`guard` unchanged.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from disc_pl import utils
from disc_pl.errors import UserError

CONF_DIR = Path(utils.CONF_DIR)
# command -> (module, primary config or None for an argparse tool, what it does)
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "run": ("disc_pl.run", "run", "counterfactuals for queries of one dataset split"),
    "train": ("disc_pl.train", "train", "fit and test one model (classifier | duq | byo)"),
    "evaluate": ("disc_pl.evaluate", "evaluate", "the run job + classifier discrepancy (CD)"),
    "report": ("disc_pl.report", None, "tables, figures and report.html of a sweep's job dirs"),
    "bench": ("disc_pl.bench", None, "throughput / FLOP-rate benchmark of the inversion step"),
}
EXIT_USAGE = 2
HINT = "(debug=true or HYDRA_FULL_ERROR=1 shows the full traceback)"


def _cause_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__
    return chain


def user_message(err: BaseException) -> str | None:
    """The message of an error caused by the user's input; None for an internal error.

    A UserError anywhere in the ``__cause__`` chain counts (Hydra's InstantiationException
    and Lightning wrap what a constructor or a data loader raised)."""
    from hydra.errors import CompactHydraException, InstantiationException, OverrideParseException
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

    for e in _cause_chain(err):
        if isinstance(e, UserError):
            return str(e)
    if isinstance(err, CompactHydraException) and not isinstance(err, InstantiationException):
        text = str(err).split("Config search path:")[0].strip()  # the search path is noise here
        if isinstance(err, OverrideParseException):
            text = f"cannot parse the override {err.override!r}: {text}\nwrite overrides as key=value (quote lists)"
        if isinstance(err.__cause__, OmegaConfBaseException) and str(err.__cause__) not in text:
            text += "\n" + str(err.__cause__).strip()
        return text
    if isinstance(err, (InterpolationResolutionError, MissingMandatoryValue)):
        return f"{str(err).strip()}\nset the value on the command line (key=value) or in your config"
    return None


def wants_traceback(argv: Sequence[str]) -> bool:
    """``HYDRA_FULL_ERROR=1`` in the environment or a ``debug=true`` override."""
    if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
        return True
    return any(a.lstrip("+").lower() in ("debug=true", "debug=1", "debug=yes") for a in argv)


def guard(entry: Callable[[], Any], argv: Sequence[str] | None = None) -> Any:
    """Call ``entry()``; a user error becomes its message on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    full = wants_traceback(argv)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; this function decides what is shown
    try:
        return entry()
    except Exception as err:  # noqa: BLE001 - re-raised unless it is the user's
        message = None if full else user_message(err)
        if message is None:
            raise
        sys.stderr.write(f"Error: {message}\n{HINT}\n")
        sys.exit(EXIT_USAGE)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def hydra_entry(main: Callable[[], Any]) -> Any:
    """``if __name__ == "__main__"`` of a Hydra entry point (reads ``sys.argv``)."""
    return guard(main)


# ----------------------------------------------------------------------------- disc-pl
def config_groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """Every config group under ``conf/`` and its options (yaml file stems), sorted."""
    groups: dict[str, list[str]] = {}
    for folder in sorted(p for p in conf_dir.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[folder.relative_to(conf_dir).as_posix()] = options
    return groups


def usage(conf_dir: Path = CONF_DIR) -> str:
    lines = ["usage: disc-pl <command> [overrides or options ...]", "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, (_, _, what) in COMMANDS.items()]
    lines += ["", "config groups (run / train / evaluate; choose one with group=option):"]
    lines += [f"  {group:<16} {', '.join(options)}" for group, options in config_groups(conf_dir).items()]
    lines += ["", "The model group is mounted twice in run / evaluate: model@models.classifier=... and "
              "model@models.duq=...",
              "`disc-pl <command> --help` shows that command's own help (Hydra's for run, train, evaluate).",
              "Errors in your input exit with status 2 and one message; debug=true (or HYDRA_FULL_ERROR=1) "
              "shows the traceback."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"Error: unknown command {command!r}; use one of {', '.join(COMMANDS)}\n{usage()}\n")
        sys.exit(EXIT_USAGE)
    module_name, config_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    if config_name is None:  # argparse tools take argv
        return guard(lambda: module.main(rest), rest)
    sys.argv = [f"disc-pl {command}", *rest]  # @hydra.main reads sys.argv
    return guard(module.main, rest)


if __name__ == "__main__":
    main()
