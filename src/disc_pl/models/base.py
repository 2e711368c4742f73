"""What the trained image models (``ClassifierModule``, ``DUQModule``) share: plain-typed
hyper-parameters, their accuracy / loss metrics and logging, class names and the optimiser."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy


def plain_hparams(mean: Sequence[float] | None, std: Sequence[float] | None,
                  class_names: Sequence[str] | None) -> tuple[list | None, list | None, list | None]:
    """Plain types only: checkpoints are loaded with ``torch.load(weights_only=True)``."""
    return (None if mean is None else [float(v) for v in mean], None if std is None else [float(v) for v in std],
            None if class_names is None else [str(c) for c in class_names])


def with_cosine_schedule(module: pl.LightningModule, opt: torch.optim.Optimizer) -> dict:
    """Cosine decay of the lr to 0 over the whole fit, stepped per batch."""
    steps = module.trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError("cosine_lr needs a finite fit length (set fit.trainer.max_epochs or max_steps)")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(steps)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ImageModule(pl.LightningModule):
    """Base of the trained image models. hparams: ``num_classes``, ``class_names``, ``lr``,
    ``weight_decay``, ``cosine_lr``."""

    def init_metrics(self, num_classes: int, **per_split: Callable[[], Metric]) -> None:
        """``train_acc``, ``<split>_acc``, ``<split>_loss`` and ``<split>_<name>`` for val and test."""
        # Keyed "<split>_<name>" (a ModuleDict key "train" would shadow nn.Module.train).
        self.metrics = torch.nn.ModuleDict({"train_acc": MulticlassAccuracy(num_classes, average="micro")})
        for split in ("val", "test"):
            self.metrics[f"{split}_acc"] = MulticlassAccuracy(num_classes, average="micro")
            self.metrics[f"{split}_loss"] = MeanMetric()
            for name, make in per_split.items():
                self.metrics[f"{split}_{name}"] = make()

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.class_names
        return list(names) if names else [str(i) for i in range(self.hparams.num_classes)]

    def log_train(self, loss: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, **terms: Any) -> None:
        """``train/<term>`` for each term, ``train/loss`` and the epoch's ``train/acc``."""
        self.metrics["train_acc"](scores, labels)
        for name, value in terms.items():
            self.log(f"train/{name}", value)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True, prog_bar=True)

    def log_eval(self, split: str, scores: torch.Tensor, labels: torch.Tensor, *loss: Any) -> None:
        """``<split>/acc`` and ``<split>/loss`` (``loss``: the MeanMetric's value [, weight])."""
        self.metrics[f"{split}_acc"](scores, labels)
        self.metrics[f"{split}_loss"](*loss)
        self.log(f"{split}/acc", self.metrics[f"{split}_acc"], on_epoch=True, prog_bar=split == "val")
        self.log(f"{split}/loss", self.metrics[f"{split}_loss"], on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return with_cosine_schedule(self, opt) if self.hparams.cosine_lr else opt
