"""Training recipes for the classifier-discrepancy evaluation (SPEC section 6).

CD trains two classifiers with *the same recipe*: F on real data and F_cf on data whose class-1
half is counterfactuals. A recipe is a ``train_fn(images, labels, seed) -> model`` (the
``disc_pl.metrics.discrepancy.TrainFn`` contract); it is chosen in ``conf/evaluate.yaml``
(``cd.recipe._target_``) and built with ``hydra.utils.instantiate``.

``make_resnet_trainer`` is a plain PyTorch loop (no Trainer: 2N images fit in memory, and the
loop has no logging or checkpointing to do) over the project's ResNet-18 at a small width.
Deterministic per seed: initial weights come from ``torch.manual_seed(seed)`` inside a forked
RNG (the caller's global RNG is untouched) and the minibatch order from a seeded generator.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from disc_pl.metrics.discrepancy import TrainFn
from disc_pl.nets.resnet import ResNet18


def make_resnet_trainer(
    width: int = 8,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    hflip: bool = False,
    small_input: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str = "cpu",
) -> TrainFn:
    """A ``train_fn``: ResNet-18 (``width``) trained with Adam on cross-entropy for ``epochs``.

    ``hflip`` adds random horizontal flips (only for tasks whose label is mirror invariant).
    The returned model is in eval mode on ``device`` and accepts inputs on any device.
    """
    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"cd.recipe needs epochs, batch_size, lr > 0 (got {epochs}, {batch_size}, {lr})")

    def train(images: Tensor, labels: Tensor, seed: int) -> nn.Module:
        num_classes = int(labels.max()) + 1
        gen = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(int(seed))
            net = ResNet18(max(num_classes, 2), in_channels=images.shape[1], width=width,
                           small_input=small_input, mean=mean, std=std).to(device)
            x = images.detach().clone().float().to(device)
            y = labels.detach().clone().long().to(device)
            opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
            net.train()
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=gen).to(device)
                flips = torch.rand(len(x), generator=gen).to(device) < 0.5
                for start in range(0, len(x), batch_size):
                    idx = order[start:start + batch_size]
                    if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                        continue
                    xb = x[idx]
                    if hflip:
                        xb = torch.where(flips[idx, None, None, None], xb.flip(-1), xb)
                    loss = F.cross_entropy(net(xb), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return _OnDevice(net.eval(), device)

    return train


class _OnDevice(nn.Module):
    """Moves inputs to the model's device (test images may live elsewhere)."""

    def __init__(self, net: nn.Module, device: str) -> None:
        super().__init__()
        self.net, self.device = net, device

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.to(self.device))
