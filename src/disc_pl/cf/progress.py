"""Progress of counterfactual generation: queries done / total, elapsed time and ETA.

``QueryProgress`` is a Lightning callback for ``trainer.predict`` over a ``QueryDataset``.
After every batch, rank 0 reports (log line, ``cf/progress``, ``cf/queries_done`` and
``cf/eta_s`` to the experiment logger, and the progress bar's postfix). Under DDP each rank
holds ~1/world of the queries and the ranks advance together, so rank 0 estimates the global
count as its own count times the world size (capped at the total).

A batch optimises for minutes, so inside one the callback also follows the optimisation
(``on_inversion_step``, called by ``InversionModule`` at every logged engine step): stage, step,
queries flipped so far and an ETA, as the bar's postfix (at most once a second) or, without a
bar, a log line (at most every ``log_seconds``).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class QueryProgress(pl.Callback):
    """Reports queries done / total with an ETA after every predict batch.

    ``total``: queries of the whole run (all ranks), ``already_done``: those finished by an
    earlier, resumed run (counted as done, not in the ETA rate)."""

    BAR_SECONDS = 1.0  # the bar's postfix is redrawn at most this often

    def __init__(self, total: int, already_done: int = 0, log_seconds: float = 15.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.already_done = int(total), int(already_done)
        self.clock = clock  # seconds; a test gives its own
        self.done_here = 0  # on this rank, in this run
        self.started = 0.0
        self.log_seconds = float(log_seconds)
        self._batch: dict[str, float] = {}  # the batch being optimised: its index, size, start
        self._pass: tuple[float, float] | None = None  # last step of the current pass: (time, global step)
        self._sec_per_step = math.nan
        self._shown = -math.inf  # when the step progress was last shown
        self.batch_seconds: list[float] = []  # wall time of each finished batch of this run

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done_here, self.started = 0, self.clock()
        self.batch_seconds = []

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch = {"index": batch_idx, "size": len(batch["query_id"]), "start": self.clock()}
        self._pass, self._shown = None, -math.inf  # the step rate carries over: batches are alike
        if trainer.is_global_zero:  # the prior's reconstruction runs before the first step
            self._show(trainer, f"batch {batch_idx + 1}/{self._batches(trainer)}: fitting the generators to "
                                f"{self._batch['size']} queries", force=True)

    def _batches(self, trainer: pl.Trainer) -> str:
        n = trainer.num_predict_batches[0] if getattr(trainer, "num_predict_batches", None) else None
        return "?" if n is None or n == math.inf else str(int(n))

    def step_text(self, trainer: pl.Trainer, stats: Mapping[str, float]) -> str:
        """One line of where the batch stands: stage, step, flipped so far, ETA of the run."""
        now, step = self.clock(), float(stats.get("cf/global_step", math.nan))
        if self._pass is not None and step > self._pass[1]:  # seconds per step, smoothed
            rate = (now - self._pass[0]) / (step - self._pass[1])
            self._sec_per_step = rate if math.isnan(self._sec_per_step) else 0.7 * self._sec_per_step + 0.3 * rate
        self._pass = (now, step)  # a new pass (a fallback search, the next chunk) starts lower: no rate from it
        text = (f"batch {int(self._batch.get('index', 0)) + 1}/{self._batches(trainer)}: "
                f"stage {int(stats['cf/stage']) + 1}/{int(stats['cf/stages'])} "
                f"step {int(stats['cf/step'])}/{int(stats['cf/stage_steps'])}, "
                f"{int(stats['cf/flipped'])}/{int(stats['cf/pass_queries'])} flipped")
        return text + f", ETA {self.eta_text(trainer, float(stats.get('cf/steps_left', math.nan)))}"

    def eta_text(self, trainer: pl.Trainer, steps_left: float) -> str:
        """This batch's step budget left at the current rate (queries that flip stop early, so it
        is mostly an overestimate), plus the batches still to come at the time a batch takes."""
        batch_left = self._sec_per_step * steps_left
        if math.isnan(batch_left):
            return "?"
        n = self._batches(trainer)
        later = int(n) - int(self._batch.get("index", 0)) - 1 if n != "?" else 0
        elapsed = self.clock() - self._batch["start"] if "start" in self._batch else 0.0
        per_batch = (sum(self.batch_seconds) / len(self.batch_seconds)) if self.batch_seconds else elapsed + batch_left
        return format_seconds(batch_left + max(later, 0) * per_batch)

    def on_inversion_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          stats: Mapping[str, float]) -> None:
        if not trainer.is_global_zero or "cf/steps_left" not in stats:
            return
        self._show(trainer, self.step_text(trainer, stats))  # the rate is measured at every step, shown seldom

    def _show(self, trainer: pl.Trainer, text: str, force: bool = False) -> None:
        bar = self._bar(trainer)
        now = self.clock()
        if now - self._shown < (self.BAR_SECONDS if bar is not None else self.log_seconds) and not force:
            return
        self._shown = now
        if bar is not None:
            bar.set_postfix_str(text)
        else:
            log.info("cf/progress %s", text)

    @staticmethod
    def _bar(trainer: pl.Trainer):
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and getattr(bar, "_predict_progress_bar", None) is not None:
            return bar.predict_progress_bar
        return None

    def state(self, world_size: int) -> dict[str, float]:
        """done / total, elapsed seconds and the ETA (seconds) at the current rate."""
        done_now = min(self.done_here * max(world_size, 1), self.total - self.already_done)
        elapsed = self.clock() - self.started
        left = self.total - self.already_done - done_now
        eta = elapsed / done_now * left if done_now else float("nan")
        return {"done": self.already_done + done_now, "total": self.total, "elapsed_s": elapsed, "eta_s": eta}

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self.done_here += len(batch["query_id"])
        if "start" in self._batch:
            self.batch_seconds.append(self.clock() - self._batch["start"])
        if not trainer.is_global_zero:
            return
        s = self.state(trainer.world_size)
        text = (f"{s['done']}/{s['total']} queries, elapsed {format_seconds(s['elapsed_s'])}, "
                f"ETA {format_seconds(s['eta_s']) if s['eta_s'] == s['eta_s'] else '?'}")
        log.info("cf/progress %s", text)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"cf/progress": s["done"] / max(s["total"], 1),
                                        "cf/queries_done": s["done"], "cf/eta_s": s["eta_s"]})
        bar = self._bar(trainer)
        if bar is not None:
            bar.set_postfix_str(text)
