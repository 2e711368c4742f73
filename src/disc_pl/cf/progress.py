"""Progress of counterfactual generation: queries done / total, elapsed time and ETA.

``QueryProgress`` is a Lightning callback for ``trainer.predict`` over a ``QueryDataset``.
After every batch, rank 0 reports (log line, ``cf/progress``, ``cf/queries_done`` and
``cf/eta_s`` to the experiment logger, and the progress bar's postfix). Under DDP each rank
holds ~1/world of the queries and the ranks advance together, so rank 0 estimates the global
count as its own count times the world size (capped at the total).
"""
from __future__ import annotations

import logging
import time

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

    def __init__(self, total: int, already_done: int = 0) -> None:
        self.total, self.already_done = int(total), int(already_done)
        self.done_here = 0  # on this rank, in this run
        self.started = 0.0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done_here, self.started = 0, time.perf_counter()

    def state(self, world_size: int) -> dict[str, float]:
        """done / total, elapsed seconds and the ETA (seconds) at the current rate."""
        done_now = min(self.done_here * max(world_size, 1), self.total - self.already_done)
        elapsed = time.perf_counter() - self.started
        left = self.total - self.already_done - done_now
        eta = elapsed / done_now * left if done_now else float("nan")
        return {"done": self.already_done + done_now, "total": self.total, "elapsed_s": elapsed, "eta_s": eta}

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self.done_here += len(batch["query_id"])
        if not trainer.is_global_zero:
            return
        s = self.state(trainer.world_size)
        text = (f"{s['done']}/{s['total']} queries, elapsed {format_seconds(s['elapsed_s'])}, "
                f"ETA {format_seconds(s['eta_s']) if s['eta_s'] == s['eta_s'] else '?'}")
        log.info("cf/progress %s", text)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"cf/progress": s["done"] / max(s["total"], 1),
                                        "cf/queries_done": s["done"], "cf/eta_s": s["eta_s"]})
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and getattr(bar, "_predict_progress_bar", None) is not None:
            bar.predict_progress_bar.set_postfix_str(text)
