"""What a job prints: third-party noise kept off the console, and a summary as its last lines.

A default run used to print Lightning's tips and GPU/TPU lines once per trained model,
deprecation and metric-buffer warnings a user cannot act on, and W&B's run summary (40 lines of
sparklines) after the one line that answers. :func:`quiet` silences those for the duration of a
job (``debug=true`` keeps them); :func:`summary` is the answer, which ``tracking.tracked_figure``
prints once every logger has finished, so nothing follows it.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Lightning's INFO lines ("GPU available: ...", "TPU available: ...", "💡 Tip: ... litlogger",
# "Restoring states from the checkpoint path ...") all go through these loggers; its warnings
# (warnings.warn) stay on.
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
# (message regex, category): known warnings a disc_pl user can do nothing about.
KNOWN_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # torchmetrics, for every Spearman / AUROC-like metric it builds (our data are small)
    (r"Metric `\w+` will save all targets and predictions in the buffer", UserWarning),
    # Lightning on a CPU job whose data live in memory (num_workers=0 is the fast choice here)
    (r".*does not have many workers", UserWarning),
    # Lightning when a tiny training set has fewer batches than log_every_n_steps
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning),
)
# Deprecations raised inside these packages are for their maintainers, not for a disc_pl user.
THIRD_PARTY = r"(pytorch_lightning|lightning_fabric|lightning_utilities|lightning|torchmetrics|torch|torchvision" \
              r"|hydra|omegaconf|wandb)(\.|$)"


@contextmanager
def quiet(debug: bool = False) -> Iterator[None]:
    """For the duration of a job: Lightning's INFO lines off, the known warnings (KNOWN_NOISE)
    and third-party deprecation warnings ignored, and W&B silent (``WANDB_SILENT``: its run
    summary stays in the offline run, which ``wandb sync`` uploads). Everything is restored on
    exit; ``debug=True`` changes nothing."""
    if debug:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    silent = os.environ.get("WANDB_SILENT")
    with warnings.catch_warnings():
        for message, category in KNOWN_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        for category in (DeprecationWarning, FutureWarning):  # LightningDeprecationWarning is a DeprecationWarning
            warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        if silent is None:  # the user's own setting wins
            os.environ["WANDB_SILENT"] = "true"
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            if silent is None:
                os.environ.pop("WANDB_SILENT", None)


def _figure(value: Any, digits: int = 3) -> str:
    return "n/a" if not isinstance(value, (int, float)) or math.isnan(float(value)) else f"{float(value):.{digits}f}"


def _spread(metrics: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``mean ± std`` of a metric (the std only where it is there)."""
    std = metrics.get(f"{key}_std")
    text = _figure(metrics.get(key), digits)
    return text + (f" ± {_figure(std, digits)}" if isinstance(std, (int, float)) and not math.isnan(std) else "")


# (file in the job's folder, what it is)
OUTPUT_FILES = (("grid.png", "grid"), ("results.csv", "results"), ("metrics.json", "metrics"),
                ("report.html", "report"))


def summary(metrics: Mapping[str, Any], out_dir: str | Path | None) -> str:
    """The few lines that answer a run: flip rate (n flipped of n), the judges' verdict where
    judged, the classifier discrepancy where measured (``disc_pl.evaluate``), seconds per
    counterfactual, and the paths of the files to open next (those that exist)."""
    lines: list[str] = []
    n = metrics.get("cf/queries")
    if "cf/flip_rate" in metrics:
        counts = ""
        if isinstance(n, (int, float)) and "cf/n_flipped" in metrics:
            counts = f"  ({int(metrics['cf/n_flipped'])} of {int(n)} flipped"
            counts += "".join(f", {int(metrics[f'cf/n_{s}'])} {s.replace('_', ' ')}"
                              for s in ("not_flipped", "diverged") if metrics.get(f"cf/n_{s}"))
            counts += ")"
        lines.append(f"flip rate       {_figure(metrics['cf/flip_rate'])}{counts}")
        if metrics.get("cf/n_not_flipped_localized"):
            lines.append(f"{'':<16}(no localized edit flips those: localize.fallback=true retries them without "
                         "the gate, which may change the whole image)")
    if "cf/judge_flip_rate" in metrics:
        parts = [f"target prob {_spread(metrics, 'cf/judge_target_prob')}"]
        if "judge/acc" in metrics:
            k = metrics.get("judge/k")
            parts.append(f"{f'{int(k)} ' if k else ''}judges' clean accuracy {_figure(metrics['judge/acc'])}")
        if "judge/query_flip_rate" in metrics:
            parts.append(f"on the unchanged queries {_figure(metrics['judge/query_flip_rate'])}")
        lines.append(f"judges agree    {_spread(metrics, 'cf/judge_flip_rate')}  ({'; '.join(parts)})")
    for key in sorted(metrics):  # other panels of judges (cf/judge_<panel>_flip_rate), e.g. robust ones
        panel = re.fullmatch(r"cf/judge_(\w+?)_flip_rate", key)
        if panel:
            name = f"{panel.group(1).replace('_', ' ')} judges"
            lines.append(f"{name:<15} {_spread(metrics, key)}  "
                         f"(target prob {_spread(metrics, f'cf/judge_{panel.group(1)}_target_prob')})")
    if "cd/mean" in metrics:
        lines.append(f"discrepancy     {_figure(metrics['cd/mean'])} ± {_figure(metrics.get('cd/std'))}  "
                     f"(classifier accuracy real {_figure(metrics.get('cd/acc_real'))}, "
                     f"counterfactual {_figure(metrics.get('cd/acc_cf'))})")
    if "cf/seconds" in metrics:
        lines.append(f"time            {_figure(metrics['cf/seconds'], 2)} s per counterfactual")
    if out_dir is not None:
        out = Path(out_dir)
        for name, what in OUTPUT_FILES:
            if (out / name).is_file():
                lines.append(f"{what:<15} {out / name}")
        runs = sorted((out / "wandb").glob("offline-run-*"))
        if runs:  # W&B's summary is in it (silent run): one command uploads it
            lines.append(f"{'W&B (offline)':<15} wandb sync {runs[-1]}")
    if not lines:
        return ""
    title = f"disc_pl: {int(n)} counterfactual queries" if isinstance(n, (int, float)) else "disc_pl"
    return "\n".join([f"── {title} " + "─" * max(3, 60 - len(title)), *lines])
