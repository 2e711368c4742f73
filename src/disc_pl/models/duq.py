"""DUQ model trained for the manifold-consistency term (paper eq. 9; van Amersfoort et al. 2020).

Loss = BCE(K, onehot(y)) + gp_weight * (||d/dz sum_c K_c(x)||_2 - 1)^2, a two-sided penalty
computed with create_graph=True, where z = (x - mean) / std is the network's normalised input
(the reference trains on normalised images and differentiates with respect to them). After
every optimiser step the class centroids take an EMA step on the batch's embeddings,
recomputed under no_grad in eval mode with the updated weights (as in the reference loop).

Recipe differences from van Amersfoort et al. (SGD lr 0.05, momentum 0.9, wd 5e-4, 75 epochs),
chosen for a short CPU fit on the 32x32 faces: Adam with a cosine-decayed lr, and the gradient
penalty switched on after `gp_warmup_epochs` epochs. From the first step the penalty keeps the
kernel too smooth to pick up the small mouth region for many epochs (still at chance after 5
epochs in our runs), and SGD at lr 0.05 diverged; without the penalty the features appear in
~4 epochs, and the penalty then shapes them for the remaining epochs. conf/model/duq.yaml also
sets the centroid EMA gamma to 0.99: with gamma 0.999 a ~400-step fit leaves ~70% of each
centroid at its random initial value (test/ood_auroc 0.75-0.79 vs 0.84-0.89 with 0.99).

test/ood_auroc: AUROC of the certainty max_c K_c separating the clean test images (positives)
from two corrupted copies of each (strong Gaussian noise; a shuffle of 4x4 patches), generated
in code with a per-image seed, so the figure does not depend on batching or ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC

from disc_pl.models.base import ImageModule, plain_hparams
from disc_pl.nets.duq import DUQNet
from disc_pl.nets.resnet import ResNet18


def gradient_penalty(x: torch.Tensor, kernel: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Two-sided penalty mean_i (||d sum_c K_ic / d z_i||_2 - 1)^2; x must require grad.

    x [B, C, H, W] (or [B, D]), kernel [B, K]. With `scale` = the network's std ([1, C, 1, 1]),
    z = (x - mean) / std is the normalised input, as in van Amersfoort et al. (whose inputs are
    normalised): dK/dz = dK/dx * std. Without it, z = x. The graph is kept (create_graph).
    """
    (grad,) = torch.autograd.grad(kernel.sum(), x, create_graph=True)
    if scale is not None:
        grad = grad * scale
    # sqrt(sum + eps), not .norm(): a saturated kernel has an all-zero gradient, where the
    # derivative of the norm is 0/0.
    norm = (grad.flatten(1).pow(2).sum(1) + 1e-12).sqrt()
    return (norm - 1.0).pow(2).mean()


def kernel_bce(log_kernel: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Binary cross entropy of K = exp(log_kernel) [B, K] against onehot [B, K], from log K.

    Same value as F.binary_cross_entropy(K, onehot) where that is finite, but a kernel that
    underflows to 0 keeps its gradient (-log K = squared distance / 2 sigma^2 stays exact).
    """
    log_1m_k = torch.log(-torch.expm1(log_kernel).clamp(max=-1e-12))  # log(1 - K)
    return -(onehot * log_kernel + (1 - onehot) * log_1m_k).mean()


def corrupt(images: torch.Tensor, indices: torch.Tensor, seed: int, noise_std: float = 0.5, patch: int = 4):
    """Two corrupted copies of [B, C, H, W] images in [0, 1]: Gaussian noise, patch shuffle.

    Each image's randomness comes from a generator seeded by (seed, its dataset index).
    Returns ([B, C, H, W], [B, C, H, W]).
    """
    noisy, shuffled = [], []
    _, c, h, w = images.shape
    for img, idx in zip(images, indices.tolist()):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(idx))
        noise = torch.randn(img.shape, generator=g).to(img)
        noisy.append((img + noise_std * noise).clamp(0, 1))
        # [C, H, W] -> patches [(H/p)(W/p), C, p, p], permuted, folded back.
        p = patch if h % patch == 0 and w % patch == 0 else 1
        tiles = img.unfold(1, p, p).unfold(2, p, p)  # [C, H/p, W/p, p, p]
        gh, gw = tiles.shape[1], tiles.shape[2]
        tiles = tiles.reshape(c, gh * gw, p, p)
        perm = torch.randperm(gh * gw, generator=g).to(img.device)
        tiles = tiles[:, perm].reshape(c, gh, gw, p, p).permute(0, 1, 3, 2, 4).reshape(c, h, w)
        shuffled.append(tiles)
    return torch.stack(noisy), torch.stack(shuffled)


class DUQModule(ImageModule):
    """forward(x in [0, 1]) -> kernel values K [B, K] in [0, 1]; prediction = argmax K."""

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 64,
        small_input: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        embedding_size: int = 256,
        length_scale: float = 0.5,
        gp_weight: float = 0.5,
        gp_warmup_epochs: int = 0,
        gamma: float = 0.999,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        cosine_lr: bool = False,
        ood_noise_std: float = 0.5,
        ood_seed: int = 0,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        mean, std, class_names = plain_hparams(mean, std, class_names)
        self.save_hyperparameters()
        self.net = DUQNet(ResNet18(num_classes, in_channels, width, small_input, mean, std), num_classes,
                          embedding_size, length_scale, gamma)
        self.init_metrics(num_classes)
        self.metrics["test_ood_auroc"] = BinaryAUROC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.hparams.num_classes).float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"].detach().requires_grad_(True)
        y = batch["label"]
        log_kernel = self.net.log_kernel(x)
        kernel = log_kernel.exp()
        terms = {"loss_bce": kernel_bce(log_kernel, self._onehot(y))}
        loss = terms["loss_bce"]
        if self.hparams.gp_weight > 0 and self.current_epoch >= self.hparams.gp_warmup_epochs:
            terms["loss_gp"] = gradient_penalty(x, kernel, scale=self.net.trunk.std)
            loss = loss + self.hparams.gp_weight * terms["loss_gp"]
        self.log_train(loss, kernel.detach(), y, **terms)
        return loss

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        # Runs after optimizer.step(): EMA of the centroids with the updated weights, eval-mode
        # BN (the statistics the kernel is evaluated with at test time).
        self.net.eval()
        with torch.no_grad():
            feats = self.net.features(batch["image"])
            onehot = self._onehot(batch["label"])
            if self.trainer.world_size > 1:
                # Every rank must take the same EMA step, or the centroid buffers drift apart.
                feats_all = self.all_gather(feats).flatten(0, 1)
                onehot_all = self.all_gather(onehot).flatten(0, 1)
                feats, onehot = feats_all, onehot_all
            self.net.head.update_centroids(feats, onehot)
        self.net.train()

    def _eval_step(self, batch: dict, split: str) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        log_kernel = self.net.log_kernel(x)
        kernel = log_kernel.exp()
        self.log_eval(split, kernel, y, kernel_bce(log_kernel, self._onehot(y)), len(y))
        return kernel

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        kernel = self._eval_step(batch, "test")
        noisy, shuffled = corrupt(batch["image"], batch["index"], self.hparams.ood_seed, self.hparams.ood_noise_std)
        certainty = [kernel.max(1).values, self.net(noisy).max(1).values, self.net(shuffled).max(1).values]
        is_clean = [torch.ones_like(certainty[0]), torch.zeros_like(certainty[1]), torch.zeros_like(certainty[2])]
        self.metrics["test_ood_auroc"](torch.cat(certainty), torch.cat(is_clean).long())
        self.log("test/ood_auroc", self.metrics["test_ood_auroc"], on_epoch=True)
