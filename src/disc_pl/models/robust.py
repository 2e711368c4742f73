"""Adversarially trained (robust) networks: L2 PGD adversarial training (Madry et al. 2018).

Two uses. Robust *judges* (``judge.robust_k``): a plain judge accepts the transferable noise
that an optimiser pushing several plain classifiers paints, a robust one does not, because an
L2 change of norm ``eps`` cannot move it. Robust *manifold models* (``manifold=robust``):
networks trained to be robust have perceptually aligned gradients (Santurkar et al. 2019), so
following their gradient draws the class's features instead of noise.

Training: Adam on the cross entropy of adversarial examples; the radius ramps linearly from 0
to ``eps`` over ``ramp_epochs`` after ``warmup_epochs`` of clean training (starting at full
radius keeps a small network at chance). Each minibatch is attacked with ``steps`` L2 PGD steps
of size ``2.5 eps / steps`` from a random start in the ball, in eval mode (BatchNorm statistics
come from the clean and adversarial training passes only).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from disc_pl.errors import is_integer, is_number, require
from disc_pl.models.cache import cached_net
from disc_pl.nets.small_cnn import SmallCNN
from disc_pl.utils import to_plain

log = logging.getLogger(__name__)
ROBUST_KEYS = ("eps", "steps", "warmup_epochs", "ramp_epochs")


def _l2_normalize(v: Tensor) -> Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def _project_l2(delta: Tensor, eps: Tensor) -> Tensor:
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = torch.clamp(eps / norm, max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def l2_pgd(net: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, steps: int, targeted: bool = False,
           generator: torch.Generator | None = None, random_start: bool = True) -> Tensor:
    """Images within L2 distance ``eps`` of ``x`` (and in [0, 1]) that raise the cross entropy
    to ``y`` (``targeted=False``) or lower it (``targeted=True``); ``steps`` normalised-gradient
    steps of size ``2.5 eps / steps``. ``eps`` may be a per-image tensor ``[B]``."""
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()
    if steps < 1 or bool((eps_t <= 0).all()):
        return x.detach()
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start:
        noise = torch.randn(x.shape, generator=generator).to(x)
        radius = torch.rand(x.shape[0], generator=generator).to(x) * eps_t
        delta = _l2_normalize(noise) * radius.view(-1, 1, 1, 1)
    alpha = 2.5 * eps_t / steps
    sign = -1.0 if targeted else 1.0
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(int(steps)):
            delta = delta.detach().requires_grad_(True)
            loss = F.cross_entropy(net((x + delta).clamp(0, 1)), y, reduction="sum")
            grad, = torch.autograd.grad(loss, delta)
            delta = delta.detach() + sign * alpha.view(-1, 1, 1, 1) * _l2_normalize(grad)
            delta = _project_l2((x + delta).clamp(0, 1) - x, eps_t)
    return (x + delta).clamp(0, 1).detach()


def _robust_checks(rc: Mapping[str, Any]) -> list[tuple[str, Any, bool, str]]:
    eps, steps = rc.get("eps"), rc.get("steps")
    warm, ramp = rc.get("warmup_epochs"), rc.get("ramp_epochs")
    return [("eps", eps, is_number(eps, 0, low_open=True), "an L2 radius > 0 in [0, 1] pixel units (e.g. 0.25)"),
            ("steps", steps, is_integer(steps, 1), "an integer >= 1 (PGD steps per minibatch)"),
            ("warmup_epochs", warm, is_integer(warm, 0), "an integer >= 0"),
            ("ramp_epochs", ramp, is_integer(ramp, 0), "an integer >= 0")]


def check_robust_config(where: str, rc: Mapping[str, Any]) -> dict[str, Any]:
    """The plain robust-training settings of ``rc``; one ConfigError naming every bad key."""
    require(where, _robust_checks(rc))
    return {k: rc.get(k) for k in ROBUST_KEYS}


def eps_at(epoch: int, robust: Mapping[str, Any]) -> float:
    """The attack radius of ``epoch`` (0-based): 0 during warm-up, then a linear ramp."""
    warm, ramp = int(robust["warmup_epochs"]), int(robust["ramp_epochs"])
    if epoch < warm:
        return 0.0
    if ramp <= 0:
        return float(robust["eps"])
    return float(robust["eps"]) * min(1.0, (epoch - warm + 1) / ramp)


def adversarial_fit(net: nn.Module, x: Tensor, y: Tensor, seed: int, train: Mapping[str, Any],
                    robust: Mapping[str, Any] | None) -> None:
    """Trains ``net`` in place on (x, y) with L2 PGD adversarial examples (module docstring);
    ``robust=None``: plainly, on the augmented images alone (the plain judges).

    ``train``: epochs, lr, batch_size, weight_decay, hflip, max_shift, noise (the judges'
    recipe keys); ``robust``: eps, steps, warmup_epochs, ramp_epochs."""
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(net.parameters(), lr=float(train["lr"]), weight_decay=float(train.get("weight_decay", 0.0)))
    shift, noise, bs = int(train.get("max_shift", 0)), float(train.get("noise", 0.0)), int(train["batch_size"])
    epochs = int(train["epochs"])
    with torch.inference_mode(False), torch.enable_grad():
        for epoch in range(epochs):
            eps = eps_at(epoch, robust) if robust is not None else 0.0
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), bs):
                idx = order[start:start + bs]
                if len(idx) < 2:
                    continue
                xb = x[idx]
                if train.get("hflip"):
                    flip = torch.rand(len(idx), generator=gen) < 0.5
                    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                if shift:
                    dy, dx = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
                    xb = torch.roll(xb, (dy, dx), dims=(2, 3))
                if noise:
                    xb = (xb + noise * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
                if eps > 0:
                    net.eval()
                    xb = l2_pgd(net, xb, y[idx], eps, int(robust["steps"]), generator=gen)
                net.train()
                loss = F.cross_entropy(net(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.eval()


RECIPE_KEYS = ("width", "epochs", "lr", "batch_size", "weight_decay", "hflip", "max_shift", "noise", "max_train",
               *ROBUST_KEYS)


def robust_recipe(recipe: Any) -> dict[str, Any]:
    """The plain recipe of a robust manifold model (``manifold.recipe``), checked."""
    plain = {k: to_plain(recipe.get(k)) if recipe is not None else None for k in RECIPE_KEYS}
    require("manifold.recipe", [*_robust_checks(plain),
        ("width", plain["width"], is_integer(plain["width"], 1), "an integer >= 1 (SmallCNN width)"),
        ("epochs", plain["epochs"], is_integer(plain["epochs"], 1), "an integer >= 1"),
        ("lr", plain["lr"], is_number(plain["lr"], 0, low_open=True), "a number > 0"),
        ("batch_size", plain["batch_size"], is_integer(plain["batch_size"], 2), "an integer >= 2"),
        ("max_train", plain["max_train"], plain["max_train"] is None or is_integer(plain["max_train"], 2),
         "an integer >= 2, or null for the whole training split")])
    return plain


def ensure_robust_model(recipe: Any, datamodule: Any, seed: int, cache_dir: str) -> nn.Module:
    """A SmallCNN adversarially trained by ``recipe`` on the training split of ``datamodule``
    (the explained classifier's images), cached under ``<cache_dir>/robust-<key>``."""
    rc = robust_recipe(recipe)
    dm = datamodule

    def build() -> nn.Module:
        return SmallCNN(dm.num_classes, in_channels=dm.channels, image_size=dm.image_size, width=int(rc["width"]),
                        mean=[0.5] * dm.channels, std=[0.25] * dm.channels)

    def fit(net: nn.Module) -> None:
        data = dm.dataset("train")
        n = len(data) if rc["max_train"] is None else min(int(rc["max_train"]), len(data))
        x = torch.stack([data[i]["image"] for i in range(n)])
        y = torch.stack([torch.as_tensor(data[i]["label"]) for i in range(n)]).long()
        log.info("training a robust manifold model (seed %d, %d images, L2 eps %s)", seed, n, rc["eps"])
        adversarial_fit(net, x, y, seed, rc, rc)

    return cached_net(Path(str(cache_dir)), "robust", {"recipe": rc, "data": dm.fingerprint(), "seed": int(seed)},
                      build, fit)
