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

IM1 is a ratio, and noise raises both errors alike, which pulls it towards 1. Where real
target-class images score near 1 themselves (Fashion-MNIST's T-shirts: 1.04 against Shirts'
1.20), Gaussian noise at a counterfactual's MSE scores as well as a real change (issue 27,
eleventh session). So a second score, the nearest-real-image margin, asks no network at all:

    NN(x') = mean over the k nearest real target images of |x' - r|^2 / D
           - mean over the k nearest real source images of |x' - r|^2 / D

(D the pixel count; the real images are the autoencoders' own, from the judges' split, never
the queries' split). Below 0: nearer real images of the target class. Independent noise adds
about its energy to every distance alike, so it leaves the margin where the query had it; only
an edit towards what real target images look like lowers it. A blur does lower it (a smudge is
nearer a plain garment than a printed one), so ``disc_pl.validity`` reports both scores with two
content-free controls, each as large as the counterfactuals' change: the queries plus Gaussian
noise, and the queries blurred. A counterfactual must beat both to count as realistic by a score.
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
NN_DEFAULT_K = 5


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


def nn_settings(rc: Any) -> int | None:
    """The neighbours of the nearest-real-image margin (judge.realism.knn; None: off); checked."""
    knn = to_plain(rc.get("knn", NN_DEFAULT_K))
    require("judge.realism", [("knn", knn, knn is None or is_integer(knn, 1),
                               "an integer >= 1 (neighbours of the nearest-real-image margin), or null for off")])
    return None if knn is None else int(knn)


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


def nearest_sq_dist(x: Tensor, bank: Tensor, k: int, batch: int = 256) -> Tensor:
    """Per image ``[N]``: the mean over its ``k`` nearest images of ``bank`` of the squared
    distance per pixel (mean squared difference)."""
    if len(bank) < k:
        raise ValueError(f"the nearest-real-image margin needs at least k={k} real images per class, got {len(bank)}: "
                         f"lower judge.realism.knn or give the judges more images of the class")
    flat = bank.flatten(1).float()
    out = []
    for i in range(0, len(x), batch):
        d = torch.cdist(x[i:i + batch].flatten(1).float(), flat).square()
        out.append(d.topk(k, dim=1, largest=False).values.mean(1) / flat.shape[1])
    return torch.cat(out)


def nn_margin(x: Tensor, bank_target: Tensor, bank_source: Tensor, k: int = NN_DEFAULT_K) -> Tensor:
    """The nearest-real-image margin per image ``[N]`` (module docstring): mean squared distance
    to the ``k`` nearest real target images minus to the ``k`` nearest real source images.
    Below 0: nearer the target class's real images."""
    return nearest_sq_dist(x, bank_target, k) - nearest_sq_dist(x, bank_source, k)


class RealismScore:
    """IM1 of one class pair (the source- and target-class autoencoders), the manifold gap
    of an autoencoder trained on every class: ``gap(x, x') = |x' - AE(x')|^2 - |x - AE(x)|^2``,
    how much harder the counterfactual is to reconstruct than its query (an edit that stays on
    the image manifold, a real smile, costs about 0; pixel noise, which a denoising autoencoder
    removes, costs its energy), and, given real images of both classes (``bank_source``,
    ``bank_target``), the nearest-real-image margin ``nn(x)`` with ``k`` neighbours."""

    def __init__(self, ae_source: nn.Module, ae_target: nn.Module, ae_all: nn.Module | None = None,
                 bank_source: Tensor | None = None, bank_target: Tensor | None = None, k: int = NN_DEFAULT_K) -> None:
        self.ae_source, self.ae_target, self.ae_all = ae_source, ae_target, ae_all
        if (bank_source is None) != (bank_target is None):
            raise ValueError("the nearest-real-image margin needs real images of both classes (bank_source and "
                             "bank_target), or neither")
        self.bank_source, self.bank_target, self.k = bank_source, bank_target, int(k)

    @property
    def has_nn(self) -> bool:
        return self.bank_target is not None

    def nn(self, x: Tensor) -> Tensor:
        if not self.has_nn:
            raise ValueError("the nearest-real-image margin needs real images of both classes (bank_source, bank_target)")
        return nn_margin(x, self.bank_target, self.bank_source, self.k)

    def __call__(self, x: Tensor) -> Tensor:
        return im1(self.ae_target, self.ae_source, x)

    def gap(self, x: Tensor, x_cf: Tensor) -> Tensor:
        if self.ae_all is None:
            raise ValueError("the manifold gap needs the all-class autoencoder (ae_all)")
        return recon_error(self.ae_all, x_cf) - recon_error(self.ae_all, x)


def ensure_realism(cfg: DictConfig, jdm: Any, source: int, target: int) -> RealismScore | None:
    """The realism scores of the pair (source, target): IM1's two autoencoders and the manifold
    gap's, trained on the judges' datamodule ``jdm`` (cached), and the nearest-real-image margin
    over the same real images of the two classes (``judge.realism.knn`` neighbours; null: off).
    None when ``judge.realism`` is off."""
    rcfg = cfg.judge.get("realism")
    if not rcfg or not bool(rcfg.get("enabled", True)):
        return None
    rc = ae_settings(rcfg)
    knn = nn_settings(rcfg)
    data = jdm.dataset("train")
    labels = None
    loaded: dict[int | None, Tensor] = {}  # each class's images are read once (an autoencoder's fit, the bank)

    def images(cls: int | None) -> Tensor:
        """The class's real images the realism models see: the first max_per_class of the judges' split."""
        nonlocal labels
        if cls in loaded:
            return loaded[cls]
        if labels is None:  # the dataset's label array where it has one: no image is decoded for it
            known = getattr(data, "labels", None)
            labels = (torch.as_tensor(known).long() if known is not None
                      else torch.tensor([int(data[i]["label"]) for i in range(len(data))]))
        idx = (labels == cls).nonzero().flatten().tolist() if cls is not None else list(range(len(labels)))
        idx = idx[: rc["max_per_class"] * (1 if cls is not None else 2) if rc["max_per_class"] else None]
        loaded[cls] = torch.stack([data[i]["image"] for i in idx])
        return loaded[cls]

    aes = []
    for cls in (source, target, None):  # None: every class (the manifold gap)
        def fit(ae: nn.Module, cls: int | None = cls) -> None:
            x = images(cls)
            log.info("training the realism autoencoder of %s (%d images)", f"class {cls}" if cls is not None
                     else "every class", len(x))
            fit_autoencoder(ae, x, int(cfg.judge.seed) + 500 + (cls if cls is not None else 99), rc)

        build = lambda: ConvAE(jdm.channels, jdm.image_size, int(rc["width"]), int(rc["latent"]))  # noqa: E731
        seed = int(cfg.judge.seed) + 500 + (cls if cls is not None else 99)
        aes.append(cached_net(Path(str(cfg.cache_dir)), "realism_ae",
                              {"train": rc, "data": jdm.fingerprint(), "cls": cls, "seed": seed}, build, fit))
    if knn is None:
        return RealismScore(*aes)
    banks = images(source), images(target)
    if min(len(b) for b in banks) < knn:
        log.warning("the nearest-real-image margin is left out: the judges' split holds %d / %d images of the source "
                    "/ target class, fewer than judge.realism.knn=%d (lower it, or give the judges more images)",
                    len(banks[0]), len(banks[1]), knn)
        return RealismScore(*aes)
    return RealismScore(*aes, bank_source=banks[0], bank_target=banks[1], k=knn)
