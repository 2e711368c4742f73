"""ResNet-18 classifier trained jointly with the DEP loss predictor (paper section 4, eq. 6-8).

L_total = lambda_cls * CE + lambda_dep * L_aux, where L_aux is the pairwise margin ranking loss
of the loss predictor's output s_hat against the (detached) per-sample CE losses s.
After every validation epoch the buffer `dep_target` is set to the median predicted loss on
the whole validation split; it is saved with the weights of the same epoch, and used as the
target level of the DEP manifold term at counterfactual time (eq. 8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import CatMetric, SpearmanCorrCoef

from disc_pl.models.base import ImageModule, plain_hparams, with_cosine_schedule  # noqa: F401 (re-exported)
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


class ClassifierModule(ImageModule):
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
        mean, std, class_names = plain_hparams(mean, std, class_names)
        self.save_hyperparameters()
        self.net = ResNet18(num_classes, in_channels, width, small_input, mean, std)
        self.loss_predictor = LossPredictor(self.net.widths, dep_hidden) if use_dep else None
        self.register_buffer("dep_target", torch.tensor(float("nan")))
        self.init_metrics(num_classes, spearman=SpearmanCorrCoef)
        self.metrics["val_pred_loss"] = CatMetric()

    # --- interface used by the counterfactual engine -------------------------------------
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
        terms = {"loss_cls": ce.mean()}
        loss = self.hparams.lambda_cls * terms["loss_cls"]
        if pred is not None:
            terms["loss_dep"] = dep_ranking_loss(pred, ce, self.hparams.margin)
            loss = loss + self.hparams.lambda_dep * terms["loss_dep"]
        self.log_train(loss, logits, batch["label"], **terms)
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        logits, ce, pred = self._shared_step(batch)
        self.log_eval(split, logits, batch["label"], ce)
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
