"""ResNet-18 classifier trained jointly with the DEP loss predictor (paper section 4, eq. 6-8).

L_total = lambda_cls * CE + lambda_dep * L_aux, where L_aux is the pairwise margin ranking loss
of the loss predictor's output s_hat against the (detached) per-sample CE losses s.
After every validation epoch the buffer `dep_target` is set to the median predicted loss on
the whole validation split; it is saved with the weights of the same epoch, and used as the
target level of the DEP manifold term at counterfactual time (eq. 8).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import CatMetric, MeanMetric, SpearmanCorrCoef
from torchmetrics.classification import MulticlassAccuracy

from disc_pl.nets.dep import LossPredictor
from disc_pl.nets.resnet import ResNet18


def dep_ranking_loss(pred: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Margin ranking loss between predicted losses pred [B] and true losses target [B].

    The batch is paired with its reverse, (i, B-1-i) for i < B // 2 (Yoo & Kweon's reference);
    I = +1 if target_i > target_j else -1; loss = mean_pairs max(0, -I (pred_i - pred_j) + margin).
    target is detached: the ranking loss never pushes the classifier's own loss.
    """
    half = pred.shape[0] // 2
    if half == 0:
        return pred.sum() * 0.0
    diff_pred = (pred - pred.flip(0))[:half]
    diff_true = (target - target.flip(0)).detach()[:half]
    sign = torch.where(diff_true > 0, 1.0, -1.0).to(pred.dtype)
    return F.relu(margin - sign * diff_pred).mean()


class ClassifierModule(pl.LightningModule):
    """Classifier F (+ DEP head); forward takes [0, 1] pixels and returns logits."""

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 64,
        small_input: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        use_dep: bool = True,
        lambda_cls: float = 1.0,
        lambda_dep: float = 0.5,
        margin: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        dep_stop_grad_epoch: int | None = None,
        dep_hidden: int = 128,
        cosine_lr: bool = False,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        # Plain types only: checkpoints are loaded with torch.load(weights_only=True).
        mean = None if mean is None else [float(v) for v in mean]
        std = None if std is None else [float(v) for v in std]
        class_names = None if class_names is None else [str(c) for c in class_names]
        self.save_hyperparameters()
        self.net = ResNet18(num_classes, in_channels, width, small_input, mean, std)
        self.loss_predictor = LossPredictor(self.net.widths, dep_hidden) if use_dep else None
        self.register_buffer("dep_target", torch.tensor(float("nan")))
        # Keyed "<split>_<name>" (a ModuleDict key "train" would shadow nn.Module.train).
        self.metrics = torch.nn.ModuleDict({"train_acc": MulticlassAccuracy(num_classes, average="micro")})
        for split in ("val", "test"):
            self.metrics[f"{split}_acc"] = MulticlassAccuracy(num_classes, average="micro")
            self.metrics[f"{split}_loss"] = MeanMetric()
            self.metrics[f"{split}_spearman"] = SpearmanCorrCoef()
        self.metrics["val_pred_loss"] = CatMetric()

    # --- interface used by the counterfactual engine -------------------------------------
    @property
    def class_names(self) -> list[str]:
        names = self.hparams.class_names
        return list(names) if names else [str(i) for i in range(self.hparams.num_classes)]

    @property
    def has_loss_predictor(self) -> bool:
        return self.loss_predictor is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.net.forward_features(x)

    def predict_loss(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Predicted per-sample loss s_hat [B] from the layer1..layer4 features."""
        if self.loss_predictor is None:
            raise RuntimeError("this classifier was trained without a DEP loss predictor (use_dep=False)")
        return self.loss_predictor(feats)

    # --- training ------------------------------------------------------------------------
    def _shared_step(self, batch: dict, detach_feats: bool = False):
        x, y = batch["image"], batch["label"]
        logits, feats = self.net.forward_features(x)
        ce = F.cross_entropy(logits, y, reduction="none")  # [B]
        pred = None
        if self.loss_predictor is not None:
            pred = self.loss_predictor([f.detach() for f in feats] if detach_feats else feats)
        return logits, ce, pred

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stop = self.hparams.dep_stop_grad_epoch
        detach = stop is not None and self.current_epoch >= stop
        logits, ce, pred = self._shared_step(batch, detach_feats=detach)
        loss_cls = ce.mean()
        loss = self.hparams.lambda_cls * loss_cls
        if pred is not None:
            loss_dep = dep_ranking_loss(pred, ce, self.hparams.margin)
            loss = loss + self.hparams.lambda_dep * loss_dep
            self.log("train/loss_dep", loss_dep)
        self.metrics["train_acc"](logits, batch["label"])
        self.log("train/loss_cls", loss_cls)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        logits, ce, pred = self._shared_step(batch)
        self.metrics[f"{split}_acc"](logits, batch["label"])
        self.metrics[f"{split}_loss"](ce)
        self.log(f"{split}/acc", self.metrics[f"{split}_acc"], on_epoch=True, prog_bar=split == "val")
        self.log(f"{split}/loss", self.metrics[f"{split}_loss"], on_epoch=True)
        if pred is not None:
            self.metrics[f"{split}_spearman"](pred, ce)
            if split == "val":
                self.metrics["val_pred_loss"](pred)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_spearman(self, split: str) -> None:
        # Over the whole epoch (all ranks): a per-batch rank correlation would be noisy.
        if self.loss_predictor is not None:
            self.log(f"{split}/dep_spearman", self.metrics[f"{split}_spearman"].compute(), sync_dist=False)
            self.metrics[f"{split}_spearman"].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_spearman("val")
        if self.loss_predictor is not None:
            preds = self.metrics["val_pred_loss"].compute()  # gathered over ranks
            self.metrics["val_pred_loss"].reset()
            if preds.numel():
                self.dep_target.fill_(preds.float().median().item())

    def on_test_epoch_end(self) -> None:
        self._log_spearman("test")

    @torch.no_grad()
    def calibrate_dep_target(self, loader: Iterable[dict]) -> float:
        """Recompute dep_target = median predicted loss over `loader` (e.g. the val split)."""
        if self.loss_predictor is None:
            raise RuntimeError("no loss predictor to calibrate")
        was_training = self.training
        self.eval()
        preds = []
        for batch in loader:
            _, feats = self.net.forward_features(batch["image"].to(self.device))
            preds.append(self.loss_predictor(feats))
        self.train(was_training)
        self.dep_target.fill_(torch.cat(preds).median().item())
        return float(self.dep_target)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return with_cosine_schedule(self, opt) if self.hparams.cosine_lr else opt


def with_cosine_schedule(module: pl.LightningModule, opt: torch.optim.Optimizer) -> dict:
    """Cosine decay of the lr to 0 over the whole fit, stepped per batch."""
    steps = module.trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError("cosine_lr needs a finite fit length (set fit.trainer.max_epochs or max_steps)")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(steps)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
