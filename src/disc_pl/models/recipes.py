"""Training recipes for the classifier-discrepancy evaluation (SPEC section 6).

CD trains two classifiers with *the same recipe*: F on real data and F_cf on data whose class-1
half is counterfactuals. A recipe is a ``train_fn(images, labels, seed) -> model`` (the
``disc_pl.metrics.discrepancy.TrainFn`` contract), chosen in ``conf/evaluate.yaml``
(``cd.recipe._target_``) and built with ``hydra.utils.instantiate``:

- ``make_cnn_trainer`` (default): ``disc_pl.nets.small_cnn.SmallCNN``, learns from a few dozen
  images per class (the CPU scale);
- ``make_resnet_trainer``: the project's ResNet-18 at a chosen width (paper-like; it needs
  hundreds of images per class to leave chance level on synthetic_faces).

Both run one plain PyTorch loop (2N images fit in memory; there is no logging or checkpointing
to do), Adam on cross-entropy, optional random horizontal flips and shifts (only for tasks
whose label survives them). Deterministic per seed: initial weights come from
``torch.manual_seed(seed)`` inside a forked RNG (the caller's global RNG is untouched), the
minibatch order and augmentations from a seeded generator.

With ``cache_dir`` the trained weights are stored under a key of (data, labels, seed, recipe):
F on the real data and the reference classifiers (ground-truth / identity counterfactuals) are
the same for every method of a sweep, so only F_cf is trained per method.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from disc_pl.cf.results import atomic_torch_save
from disc_pl.errors import ConfigError
from disc_pl.metrics.discrepancy import TrainFn
from disc_pl.nets.resnet import ResNet18
from disc_pl.nets.small_cnn import SmallCNN

# build(in_channels, image_size, num_classes) -> an untrained network taking [0, 1] pixels
Builder = Callable[[int, int, int], nn.Module]


def make_cnn_trainer(width: int = 16, epochs: int = 40, lr: float = 3e-3, batch_size: int = 32,
                     weight_decay: float = 0.0, hflip: bool = False, max_shift: int = 0,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     device: str = "cpu", cache_dir: str | None = None) -> TrainFn:
    """A ``train_fn`` over ``SmallCNN(width)``; see the module docstring."""
    def build(c: int, size: int, k: int) -> nn.Module:
        return SmallCNN(k, in_channels=c, image_size=size, width=width, mean=mean, std=std)

    recipe = dict(net="small_cnn", width=width, mean=mean, std=std)
    return _trainer(build, recipe, epochs, lr, batch_size, weight_decay, hflip, max_shift, device, cache_dir)


def make_resnet_trainer(width: int = 8, epochs: int = 30, lr: float = 3e-3, batch_size: int = 64,
                        weight_decay: float = 0.0, hflip: bool = False, max_shift: int = 0,
                        small_input: bool = True, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, device: str = "cpu",
                        cache_dir: str | None = None) -> TrainFn:
    """A ``train_fn`` over ``ResNet18(width)``; see the module docstring."""
    def build(c: int, size: int, k: int) -> nn.Module:
        return ResNet18(k, in_channels=c, width=width, small_input=small_input, mean=mean, std=std)

    recipe = dict(net="resnet18", width=width, small_input=small_input, mean=mean, std=std)
    return _trainer(build, recipe, epochs, lr, batch_size, weight_decay, hflip, max_shift, device, cache_dir)


def _trainer(build: Builder, recipe: dict[str, Any], epochs: int, lr: float, batch_size: int,
             weight_decay: float, hflip: bool, max_shift: int, device: str, cache_dir: str | None) -> TrainFn:
    if epochs <= 0 or batch_size <= 0 or lr <= 0 or max_shift < 0:
        raise ConfigError.one("cd.recipe", {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                            "max_shift": max_shift},
                              "needs epochs, batch_size, lr > 0 and max_shift >= 0")
    recipe = {**recipe, "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
              "hflip": hflip, "max_shift": max_shift}
    recipe = json.loads(json.dumps(recipe, default=list))  # plain values (ListConfig -> list)

    def train(images: Tensor, labels: Tensor, seed: int) -> nn.Module:
        num_classes = max(int(labels.max()) + 1, 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = build(images.shape[1], images.shape[-1], num_classes).to(device)
        path = _cache_path(cache_dir, images, labels, seed, recipe) if cache_dir else None
        if path is not None and path.exists():
            net.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        else:
            _fit(net, images, labels, seed, epochs, lr, batch_size, weight_decay, hflip, max_shift, device)
            if path is not None:
                atomic_torch_save({k: v.cpu() for k, v in net.state_dict().items()}, path)
        return _OnDevice(net.eval(), device)

    return train


def _cache_path(cache_dir: str, images: Tensor, labels: Tensor, seed: int, recipe: dict) -> Path:
    digest = hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().long().numpy().tobytes())
    digest.update(json.dumps({"seed": int(seed), **recipe}, sort_keys=True).encode())
    return Path(cache_dir) / f"cd-{digest.hexdigest()[:24]}.pt"


def _fit(net: nn.Module, images: Tensor, labels: Tensor, seed: int, epochs: int, lr: float, batch_size: int,
         weight_decay: float, hflip: bool, max_shift: int, device: str) -> None:
    gen = torch.Generator().manual_seed(int(seed))
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().clone().float().to(device)
        y = labels.detach().clone().long().to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                    continue
                xb = x[idx.to(device)]
                if hflip:
                    flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
                    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                if max_shift:  # one cyclic shift per batch, in pixels
                    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
                    xb = torch.roll(xb, (dy, dx), dims=(2, 3))
                loss = F.cross_entropy(net(xb), y[idx.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


class _OnDevice(nn.Module):
    """Moves inputs to the model's device (test images may live elsewhere)."""

    def __init__(self, net: nn.Module, device: str) -> None:
        super().__init__()
        self.net, self.device = net, device

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.to(self.device))
