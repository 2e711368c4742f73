"""A realism score that asks no classifier: IM1 of Van Looveren & Klaise (2021).

Two small denoising autoencoders are trained on the judges' images (never the explained
classifier's), one on the source class and one on the target class. A counterfactual that
really belongs to the target class is reconstructed better by the target-class autoencoder:

    IM1(x') = |x' - AE_t(x')|^2 / (|x' - AE_s(x')|^2 + eps)

Below 1: closer to the target class's images; above 1: closer to the source's. Pixel noise an
optimiser paints is reconstructed by neither (both errors grow), which pulls IM1 towards 1, and
the unchanged query scores above 1. Neither network classifies anything, so no gradient of the
explained classifier, a surrogate or a judge can be gamed into a low score.

Whether it separates the classes at all depends on the data: on the 32 px synthetic faces the
label lives in a few mouth pixels, which an autoencoder may reconstruct equally well from
either class. ``disc_pl.validity`` therefore reports it beside its own calibration: IM1 of real
target-class test images and of the unchanged queries.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from disc_pl.errors import is_integer, is_number, require
from disc_pl.models.cache import cached_net
from disc_pl.utils import to_plain

log = logging.getLogger(__name__)
AE_KEYS = ("width", "latent", "epochs", "lr", "batch_size", "noise", "max_per_class")


class ConvAE(nn.Module):
    """Two stride-2 convolutions down to a ``latent``-channel map at a quarter of the side,
    two transposed convolutions back; sigmoid output in [0, 1]. Sides divisible by 4."""

    def __init__(self, channels: int, image_size: int, width: int = 16, latent: int = 8) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the realism autoencoder needs an image side divisible by 4, got {image_size}")
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, latent, 1))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def ae_settings(rc: Any) -> dict[str, Any]:
    """The plain autoencoder recipe of ``realism`` (judge.realism); checked."""
    out = {k: to_plain(rc.get(k)) for k in AE_KEYS}
    require("judge.realism", [
        ("width", out["width"], is_integer(out["width"], 1), "an integer >= 1"),
        ("latent", out["latent"], is_integer(out["latent"], 1), "an integer >= 1 (channels of the bottleneck)"),
        ("epochs", out["epochs"], is_integer(out["epochs"], 1), "an integer >= 1"),
        ("lr", out["lr"], is_number(out["lr"], 0, low_open=True), "a number > 0"),
        ("batch_size", out["batch_size"], is_integer(out["batch_size"], 2), "an integer >= 2"),
        ("noise", out["noise"], is_number(out["noise"], 0), "a number >= 0 (denoising: input noise std)"),
        ("max_per_class", out["max_per_class"], out["max_per_class"] is None or is_integer(out["max_per_class"], 2),
         "an integer >= 2, or null for every image of the class")])
    return out


def fit_autoencoder(ae: nn.Module, x: Tensor, seed: int, rc: dict[str, Any]) -> None:
    """Denoising fit: reconstruct ``x`` from ``x + noise``, Adam on the pixel MSE."""
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(ae.parameters(), lr=float(rc["lr"]))
    bs = int(rc["batch_size"])
    with torch.inference_mode(False), torch.enable_grad():
        ae.train()
        for _ in range(int(rc["epochs"])):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), bs):
                xb = x[order[start:start + bs]]
                noisy = (xb + float(rc["noise"]) * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
                loss = F.mse_loss(ae(noisy), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    ae.eval()


@torch.no_grad()
def recon_error(ae: nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    """Per-image squared reconstruction error ``[N]``."""
    return torch.cat([(ae(x[i:i + batch].float()) - x[i:i + batch].float()).flatten(1).pow(2).sum(1)
                      for i in range(0, len(x), batch)])


def im1(ae_target: nn.Module, ae_source: nn.Module, x: Tensor, eps: float = 1e-8) -> Tensor:
    """IM1 per image ``[N]`` (module docstring): < 1 means closer to the target class."""
    return recon_error(ae_target, x) / (recon_error(ae_source, x) + eps)


class RealismScore:
    """IM1 of one class pair (the source- and target-class autoencoders) and the manifold gap
    of an autoencoder trained on every class: ``gap(x, x') = |x' - AE(x')|^2 - |x - AE(x)|^2``,
    how much harder the counterfactual is to reconstruct than its query. An edit that stays on
    the image manifold (a real smile) costs about 0; pixel noise, which a denoising autoencoder
    removes, costs its energy."""

    def __init__(self, ae_source: nn.Module, ae_target: nn.Module, ae_all: nn.Module | None = None) -> None:
        self.ae_source, self.ae_target, self.ae_all = ae_source, ae_target, ae_all

    def __call__(self, x: Tensor) -> Tensor:
        return im1(self.ae_target, self.ae_source, x)

    def gap(self, x: Tensor, x_cf: Tensor) -> Tensor:
        if self.ae_all is None:
            raise ValueError("the manifold gap needs the all-class autoencoder (ae_all)")
        return recon_error(self.ae_all, x_cf) - recon_error(self.ae_all, x)


def ensure_realism(cfg: DictConfig, jdm: Any, source: int, target: int) -> RealismScore | None:
    """The IM1 score of the pair (source, target), its two autoencoders trained on the judges'
    datamodule ``jdm`` (cached); None when ``judge.realism`` is off."""
    rcfg = cfg.judge.get("realism")
    if not rcfg or not bool(rcfg.get("enabled", True)):
        return None
    rc = ae_settings(rcfg)
    data = jdm.dataset("train")
    labels = None
    aes = []
    for cls in (source, target, None):  # None: every class (the manifold gap)
        def fit(ae: nn.Module, cls: int | None = cls) -> None:
            nonlocal labels
            if labels is None:
                labels = torch.tensor([int(data[i]["label"]) for i in range(len(data))])
            idx = (labels == cls).nonzero().flatten().tolist() if cls is not None else list(range(len(labels)))
            idx = idx[: rc["max_per_class"] * (1 if cls is not None else 2) if rc["max_per_class"] else None]
            x = torch.stack([data[i]["image"] for i in idx])
            log.info("training the realism autoencoder of %s (%d images)", f"class {cls}" if cls is not None
                     else "every class", len(x))
            fit_autoencoder(ae, x, int(cfg.judge.seed) + 500 + (cls if cls is not None else 99), rc)

        build = lambda: ConvAE(jdm.channels, jdm.image_size, int(rc["width"]), int(rc["latent"]))  # noqa: E731
        seed = int(cfg.judge.seed) + 500 + (cls if cls is not None else 99)
        aes.append(cached_net(Path(str(cfg.cache_dir)), "realism_ae",
                              {"train": rc, "data": jdm.fingerprint(), "cls": cls, "seed": seed}, build, fit))
    return RealismScore(*aes)
