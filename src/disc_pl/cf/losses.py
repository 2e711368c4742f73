"""The terms of the DISC objective (paper eq. 5), each returning one value per query.

    total = lambda_sem * semantic + lambda_mc * manifold + lambda_fc * functional + prior

Every term maps a batch of b counterfactuals to a tensor ``[b]`` so the engine can sum
over queries for one backward pass while keeping per-query bookkeeping (early stopping,
divergence isolation, logging).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over all but the first dim: ``[b, ...] -> [b]``."""
    return (a - b).pow(2).flatten(1).mean(1)


class SemanticLoss(nn.Module):
    """Semantic preservation d(Phi(x'), Phi(x)) (paper eq. 3 / 5).

    ``space="lso"`` compares classifier activations at ``layers`` (indices into the list
    returned by ``forward_features``; default the four residual stages), MSE per layer,
    summed. ``space="iso"`` compares pixels.
    """

    def __init__(self, space: str = "lso", layers: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        if space not in ("lso", "iso"):
            raise ValueError(f"space={space!r} is not known; use 'lso' (latent) or 'iso' (pixels)")
        if space == "lso" and len(layers) == 0:
            raise ValueError("space=lso needs at least one feature layer (space.layers=[...]); "
                             "use space=iso to compare pixels instead")
        self.space = space
        self.layers = tuple(int(i) for i in layers)

    def reference(self, x: Tensor, feats: Sequence[Tensor]) -> list[Tensor]:
        """What the counterfactual is compared to, computed once per query batch."""
        if self.space == "iso":
            return [x.detach()]
        n = len(feats)
        bad = [i for i in self.layers if not -n <= i < n]
        if bad:
            raise ValueError(f"space.layers={list(self.layers)} but the classifier exposes {n} "
                             f"feature maps (valid indices 0..{n - 1})")
        return [feats[i].detach() for i in self.layers]

    def forward(self, x_cf: Tensor, feats_cf: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
        current = [x_cf] if self.space == "iso" else [feats_cf[i] for i in self.layers]
        return torch.stack([per_sample_mse(c, r) for c, r in zip(current, reference)]).sum(0)


class ManifoldLoss(Protocol):
    """L_mc: ``(x_cf, logits, feats, source, target) -> [b]``."""

    def __call__(self, x_cf: Tensor, logits: Tensor, feats: Sequence[Tensor],
                 source: Tensor, target: Tensor) -> Tensor: ...


class DEPManifold(nn.Module):
    """Direct error prediction (paper eq. 8): |s_hat(x') - s|.

    ``s_hat`` is the jointly trained loss predictor applied to the classifier's features of
    x'; ``s`` is the target loss level, the median predicted loss on the validation split
    (stored with the classifier as ``dep_target``). Pulling the predicted loss of x' to a
    typical in-distribution level keeps x' where the classifier's error is predictable.
    """

    def __init__(self, classifier: nn.Module, target_level: float | None = None) -> None:
        super().__init__()
        if not getattr(classifier, "has_loss_predictor", False):
            raise ValueError(
                "manifold=dep needs a classifier trained with a loss predictor (DEP head). "
                "Train one with model.use_dep=true (the default), or fit a post-hoc head for a "
                "bring-your-own classifier, or choose manifold=none|duq")
        level = target_level if target_level is not None else float(classifier.dep_target)
        if not torch.isfinite(torch.tensor(level)):
            raise ValueError("manifold=dep: the classifier has no calibrated dep_target (NaN); "
                             "retrain it or call calibrate_dep_target on a validation loader")
        self.classifier = classifier
        self.target_level = level

    def forward(self, x_cf, logits, feats, source, target) -> Tensor:
        s_hat = self.classifier.predict_loss(feats)
        return (s_hat - self.target_level).abs()


class DUQManifold(nn.Module):
    """DUQ kernel margin (paper eq. 9): max(K_src(x') - K_tgt(x') + delta, 0)."""

    def __init__(self, duq: nn.Module, margin: float = 0.5) -> None:
        super().__init__()
        self.duq = duq
        self.margin = float(margin)

    def forward(self, x_cf, logits, feats, source, target) -> Tensor:
        k = self.duq(x_cf)  # [b, K] kernel values in [0, 1]
        k_src = k.gather(1, source[:, None]).squeeze(1)
        k_tgt = k.gather(1, target[:, None]).squeeze(1)
        return F.relu(k_src - k_tgt + self.margin)


def functional_loss(logits: Tensor, target: Tensor) -> Tensor:
    """L_fc: cross entropy of F(x') to the target class, per query ``[b]``."""
    return F.cross_entropy(logits, target, reduction="none")
